"""The commands that train a model: ``train``, ``finetune``, ``distill``.

Each parses its options, merges them with ``--config`` and calls one job of
:mod:`klseg.runs`; the options every training command shares are
:func:`klseg.cli.options.run_options`.
"""

import click

from klseg.registry import (
    BACKBONES,
    DISTILL_DEFAULTS,
    DISTILL_KL_TYPES,
    DISTILL_TEMPERATURE,
    FINETUNE_DEFAULTS,
    FINETUNE_KL_WEIGHT,
    FINETUNE_RECIPES,
    FINETUNE_TEMPERATURE,
    KL_INPUTS,
    MIX_MODES,
    MODELS,
    SOURCE_PREDICTIONS,
    STUDENT_BN,
    STYLES,
    TEMPERATURE_RANGE,
    TRAIN_DEFAULTS,
)

from .options import (
    FILE,
    PATH,
    bounded,
    config_option,
    default_option,
    option_block,
    run_errors,
    run_job,
    run_options,
)
from .types import FiniteFloat, FloatList, NameList

__all__ = ["distill", "finetune", "train"]

#: Temperatures of the KL terms (finetune, distill).
_TEMPERATURE = FiniteFloat(min=TEMPERATURE_RANGE[0], max=TEMPERATURE_RANGE[1])


class _ModelName(click.Choice):
    """A registry name, or ``keras-hub:PRESET_OR_DIR``.

    The KerasHub spec's rules (:mod:`klseg.runs.hub`) load when this type is
    first shown or used, not when the command line is imported.
    """

    def get_metavar(self, param, ctx=None):
        from klseg.runs.hub import HUB_PREFIX

        return f"[{'|'.join(self.choices)}|{HUB_PREFIX}PRESET_OR_DIR]"

    def convert(self, value, param, ctx):
        from klseg.runs.hub import HUB_PREFIX, is_hub_spec

        if is_hub_spec(value) or value in self.choices:
            return value
        self.fail(
            f"{value!r} is not a model: choose one of {', '.join(self.choices)}, "
            f"or {HUB_PREFIX}PRESET_OR_DIR (a KerasHub image segmenter).",
            param,
            ctx,
        )


def _architecture_options(who=""):
    """``--backbone``, ``--base-filters``, ``--depth`` of a model built here
    (``who``: ``"Student "`` for the student of ``distill``)."""
    return option_block(
        click.option(
            "--backbone",
            type=click.Choice(BACKBONES),
            help=f"{(who + 'encoder').capitalize()}  [default: plain for unet, "
            "resnet50 for deeplabv3_plus].",
        ),
        click.option(
            "--base-filters",
            type=bounded("base_filters"),
            help=f"{who}U-Net filters at the first level  [default: 32].",
        ),
        click.option(
            "--depth",
            type=bounded("depth"),
            help=f"{who}U-Net levels  [default: 4].",
        ),
    )


@click.command()
@config_option
@click.option(
    "--data",
    type=PATH,
    help="Training folder (images/ + masks/), tfds:NAME or a data set spec "
    "(cityscapes:PATH, gta5:PATH, ...: docs/data.md).",
)
@click.option(
    "--val-data",
    type=PATH,
    help="Validation folder, tfds:NAME:SPLIT or a data set spec (cityscapes:PATH:val).",
)
@default_option(
    TRAIN_DEFAULTS,
    "--model",
    type=_ModelName(MODELS),
    help="Architecture, or keras-hub:PRESET_OR_DIR for a KerasHub image "
    "segmenter (a preset name, or a folder saved with save_to_preset; needs "
    'pip install "klseg[hub]").',
)
@_architecture_options()
@click.option(
    "--num-classes",
    type=bounded("num_classes"),
    help="Number of classes  [default: from classes.json beside --data, else "
    "the largest mask value + 1].",
)
@click.option(
    "--class-names",
    type=NameList(),
    help="Comma-separated class names stored in the model  [default: from "
    "classes.json beside --data, else class_0, class_1, ...].",
)
@default_option(
    TRAIN_DEFAULTS,
    "--style",
    type=click.Choice(STYLES),
    help="Restyle every training image before augmentation: towards a "
    "--style-references image (fda, histogram, pda) or with random colours "
    "(random-colour; docs/adapt.md).",
)
@click.option(
    "--style-references",
    type=PATH,
    help="Target-domain images (a folder with images/) that --style fda, "
    "histogram or pda follows.",
)
@run_options
@click.pass_context
@run_errors
def train(ctx, **_):
    """Train a segmentation model from scratch (a source model).

    Writes to --output: model.keras (best epoch by the validation metric),
    metrics.json, history.csv, logs/ (TensorBoard), checkpoints/,
    config.yaml (the resolved options) and report.md with plots/.

    \b
    Example:
      klseg train --data data/source/train --val-data data/source/val \\
          --epochs 10 --output runs/source
    """
    run_job(ctx, "train", "TrainConfig", "data", "val_data", "output", resumable=True)


def _finetune_inputs():
    """The models and folders a fine-tuning run reads."""
    return option_block(
        click.option(
            "--source",
            type=PATH,
            help="Source model to start from: a .keras file, or "
            "keras-hub:PRESET_OR_DIR.",
        ),
        click.option(
            "--data", type=PATH, help="Labelled target-domain training folder."
        ),
        click.option(
            "--unlabeled-data",
            type=PATH,
            help="Unlabelled target-domain images (folder with images/); used by the "
            "KL term on target images, or by the consistency term when "
            "--consistency-weight is given.",
        ),
        click.option("--val-data", type=PATH, help="Target-domain validation folder."),
        click.option(
            "--source-val-data",
            type=PATH,
            help="Source-domain validation folder: reports how much source mIoU "
            "is kept.",
        ),
        click.option(
            "--source-images",
            type=PATH,
            help="Unlabelled source-domain images for the KL term (rehearsal).",
        ),
    )


def _text(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def _few(key):
    """``V in the few-label mode`` for an option the mode sets."""
    return f"{_text(FINETUNE_RECIPES['few-label'][key])} in the few-label mode"


#: The few-label mode's defaults as options (the --consistency-weight help).
_FEW_LABEL = " ".join(
    f"--{k.replace('_', '-')} {_text(v)}"
    for k, v in FINETUNE_RECIPES["few-label"].items()
)
#: The options the command line leaves to the config when not given.
_MODE_KEYS = tuple(sorted({k for r in FINETUNE_RECIPES.values() for k in r}))


def _kl_options():
    """The KL term to the source model."""
    return option_block(
        click.option(
            "--kl-weight",
            type=FloatList(),
            help="Weight of the KL term; 0 is plain fine-tuning. A list such as "
            "0,0.1,0.3,1 runs one fine-tune per weight into subfolders and plots "
            "the source-vs-target trade-off.  [default: "
            f"{FINETUNE_KL_WEIGHT:g}; {_few('kl_weight')}]",
        ),
        click.option(
            "--temperature",
            type=_TEMPERATURE,
            help="Softmax temperature of the KL term.  "
            f"[default: {FINETUNE_TEMPERATURE:g}]",
        ),
        default_option(
            FINETUNE_DEFAULTS,
            "--kl-inputs",
            type=click.Choice(KL_INPUTS),
            help="Images the KL term sees: target images, --source-images, or "
            "both; auto is 'source' when --source-images is given, else 'target'.",
        ),
        default_option(
            FINETUNE_DEFAULTS,
            "--student-bn",
            type=click.Choice(STUDENT_BN),
            help="BatchNorm statistics of the fine-tuned model: learned, frozen at "
            "the source model's, or learned and synchronised across replicas "
            f"(mirrored); {_few('student_bn')}.",
        ),
        default_option(
            FINETUNE_DEFAULTS,
            "--source-predictions",
            type=click.Choice(SOURCE_PREDICTIONS),
            help="Run the source model every step (live), or store its "
            "predictions once in float16 (stored); auto stores them when they "
            "fit in half the available memory and says which it chose.",
        ),
    )


def _class_options():
    """Target classes that differ from the source model's."""
    return option_block(
        click.option(
            "--class-names",
            type=NameList(),
            help="Comma-separated classes of the fine-tuned model when they differ "
            "from the source model's: the model gets a new head for them  "
            "[default: the source model's classes].",
        ),
        click.option(
            "--source-class-map",
            type=FILE,
            help='JSON file {"merge": {source: target}, "drop": [source, ...]} for '
            "the source classes that are not target classes (with --class-names, "
            "or with class names in the target data's class map or classes.json).",
        ),
    )


def _consistency_options():
    """The mean teacher's consistency term on unlabelled target images."""
    return option_block(
        click.option(
            "--consistency-weight",
            type=FloatList(),
            help="Weight of the KL consistency to an EMA teacher on "
            "--unlabeled-data (mean teacher; needs --unlabeled-data). model.keras "
            "is then the EMA teacher, picked by its target mIoU. A list runs one "
            "fine-tune per weight (a grid with a --kl-weight list). Above 0 "
            "(in any run of a list) it is the few-label mode, whose defaults "
            "are the measured recipe: " + _FEW_LABEL + " (docs/finetune.md); "
            "an option given explicitly wins.  [default: off]",
        ),
        default_option(
            FINETUNE_DEFAULTS,
            "--ema-decay",
            type=FiniteFloat(min=0, max=1, max_open=True),
            help="Decay of the teacher's exponential moving average of the "
            f"weights; {_few('ema_decay')}.",
        ),
        default_option(
            FINETUNE_DEFAULTS,
            "--consistency-threshold",
            type=FiniteFloat(min=0, max=1),
            help="Teacher confidence a pixel needs to count in the consistency term.",
        ),
        default_option(
            FINETUNE_DEFAULTS,
            "--consistency-rampup",
            type=bounded("consistency_rampup"),
            help="Optimizer steps of the sigmoid ramp-up of the consistency "
            f"weight; {_few('consistency_rampup')}.",
        ),
        click.option(
            "--mode-defaults/--no-mode-defaults",
            default=True,
            show_default=True,
            help="Options not given take the defaults of the run's mode (the "
            "few-label recipe with --consistency-weight); --no-mode-defaults "
            "takes the [default: ...] values shown here.",
        ),
        default_option(
            FINETUNE_DEFAULTS,
            "--consistency-mix",
            type=click.Choice(MIX_MODES),
            help="Mixing of the student's strong view of the unlabelled images.",
        ),
    )


@click.command()
@config_option
@_finetune_inputs()
@_kl_options()
@_class_options()
@_consistency_options()
@run_options
@click.pass_context
@run_errors
def finetune(ctx, **_):
    """Fine-tune a source model on a target domain with a KL term.

    The KL term keeps the fine-tuned model's per-pixel predictions close to
    the frozen source model's, which keeps source-domain accuracy.

    \b
    Example:
      klseg finetune --source runs/source/model.keras \\
          --data data/target/train --val-data data/target/val \\
          --source-val-data data/source/val \\
          --source-images data/source/unlabeled \\
          --kl-weight 0,0.1,0.3,1 --output runs/finetune

    \b
    Few labels, many unlabelled target images (mean teacher; model.keras is
    the EMA teacher):
      klseg finetune --source runs/source/model.keras \\
          --data data/target/train --unlabeled-data data/target/unlabeled \\
          --val-data data/target/val --source-images data/source/unlabeled \\
          --consistency-weight 1 --output runs/fewlabel
    """
    run_job(
        ctx,
        "finetune",
        "FinetuneConfig",
        "source",
        "data",
        "val_data",
        "output",
        resumable=True,
        mode_keys=_MODE_KEYS,
    )


def _student_options():
    """The teacher and the student built from scratch."""
    return option_block(
        click.option(
            "--teacher",
            type=PATH,
            help="Trained teacher model: a .keras file or keras-hub:PRESET_OR_DIR.",
        ),
        default_option(
            DISTILL_DEFAULTS,
            "--model",
            help=f"Student architecture: {', '.join(MODELS)}, or "
            "keras-hub:PRESET_OR_DIR.",
        ),
        _architecture_options("Student "),
        click.option(
            "--num-classes",
            type=bounded("num_classes"),
            help="Number of classes; must equal the teacher's  [default: the "
            "teacher's].",
        ),
    )


def _distill_terms():
    """The data and the KL term of distillation."""
    return option_block(
        click.option("--data", type=PATH, help="Labelled training folder."),
        click.option(
            "--unlabeled-data",
            type=PATH,
            help="Unlabelled training images (folder with images/); used by the "
            "KL term only.",
        ),
        click.option("--val-data", type=PATH, help="Labelled validation folder."),
        default_option(
            DISTILL_DEFAULTS,
            "--kl-weight",
            type=FiniteFloat(min=0),
            help="Weight of the KL term; 0 trains the student on the labels alone.",
        ),
        click.option(
            "--temperature",
            type=_TEMPERATURE,
            help="Softmax temperature of the KL term  [default: "
            + ", ".join(f"{t:g} for {k}" for k, t in DISTILL_TEMPERATURE.items())
            + "].",
        ),
        default_option(
            DISTILL_DEFAULTS,
            "--kl-type",
            type=click.Choice(DISTILL_KL_TYPES),
            help="pixel: KL between the class distributions of each pixel; "
            "channel: KL between the spatial distributions of each class channel "
            "(Shu et al. 2021).",
        ),
    )


@click.command()
@config_option
@_student_options()
@_distill_terms()
@run_options
@click.pass_context
@run_errors
def distill(ctx, **_):
    """Distil a teacher model into a smaller student model.

    The student (built from scratch for the teacher's classes) learns from
    the labels of --data and from the frozen teacher's predictions on every
    training image, labelled or not (--unlabeled-data). Writes the run folder
    as train does; model.keras is the best student, and metrics.json and
    report.md compare teacher and student (mIoU, parameters, images/s).

    \b
    Example:
      klseg distill --teacher runs/teacher/model.keras --model unet \\
          --base-filters 8 --data data/train --unlabeled-data data/unlabeled \\
          --val-data data/val --kl-type channel --output runs/student
    """
    run_job(
        ctx,
        "distill",
        "DistillConfig",
        "teacher",
        "data",
        "val_data",
        "output",
        resumable=True,
    )
