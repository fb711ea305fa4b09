"""Entry point of the ``klseg`` command.

Heavy imports (Keras, TensorFlow) happen inside the commands, so
``klseg --help`` and ``klseg --version`` answer at once.

The shared option blocks and error handling live in :mod:`klseg.cli.options`.
Each command parses its options, merges them with ``--config`` (see
:mod:`klseg.cli.config_files` for the order), builds the matching config object
of :mod:`klseg.runs` and calls one function there. Mistakes in options exit
with status 2, failed runs (bad data, missing or incompatible files) with
status 1, an interrupted run with 130; none of them prints a traceback.
"""

import json

import click

from klseg._version import __version__
from klseg.registry import BACKBONES, MODELS
from klseg.runs import configs as run_config
from klseg.runs.configs import (
    CONSISTENCY_MIX,
    DISTILL_KL_TYPES,
    DISTILL_TEMPERATURE,
    KL_INPUTS,
    SOURCE_PREDICTIONS,
    STUDENT_BN,
    TEMPERATURE_RANGE,
)
from klseg.runs.hub import HUB_PREFIX, is_hub_spec

from .config_files import resolve_options
from .options import (
    PATH,
    TRAIN,
    build,
    config_option,
    default,
    echo_result,
    inference_options,
    prepare_runtime,
    require,
    run_errors,
    run_options,
    saved_run_config,
)
from .types import FiniteFloat, FloatList, ImageSize, NameList

__all__ = ["cli", "main"]


class _ModelName(click.Choice):
    """A registry name, or ``keras-hub:PRESET_OR_DIR``."""

    def get_metavar(self, param, ctx=None):
        return f"[{'|'.join(self.choices)}|{HUB_PREFIX}PRESET_OR_DIR]"

    def convert(self, value, param, ctx):
        if is_hub_spec(value) or value in self.choices:
            return value
        self.fail(
            f"{value!r} is not a model: choose one of {', '.join(self.choices)}, "
            f"or {HUB_PREFIX}PRESET_OR_DIR (a KerasHub image segmenter).",
            param,
            ctx,
        )


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="klseg")
def cli():
    """Stable KL-divergence tools for semantic segmentation.

    Train a source model, fine-tune it on a new domain with a KL term that
    keeps it close to the source model, evaluate both domains, predict,
    export a SavedModel. `klseg demo` runs all of it on built-in data.
    """


@cli.command()
@config_option
@click.option(
    "--data", type=PATH, help="Training folder (images/ + masks/) or tfds:NAME."
)
@click.option("--val-data", type=PATH, help="Validation folder or tfds:NAME:SPLIT.")
@click.option(
    "--model",
    type=_ModelName(MODELS),
    default=default(TRAIN, "model"),
    show_default=True,
    help="Architecture, or keras-hub:PRESET_OR_DIR for a KerasHub image "
    "segmenter (a preset name, or a folder saved with save_to_preset; needs "
    'pip install "klseg[hub]").',
)
@click.option(
    "--backbone",
    type=click.Choice(BACKBONES),
    help="Encoder  [default: plain for unet, resnet50 for deeplabv3_plus].",
)
@click.option(
    "--base-filters",
    type=click.IntRange(min=1),
    help="U-Net filters at the first level  [default: 32].",
)
@click.option("--depth", type=click.IntRange(1, 6), help="U-Net levels  [default: 4].")
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    help="Number of classes  [default: from classes.json beside --data, else "
    "the largest mask value + 1].",
)
@click.option(
    "--class-names",
    type=NameList(),
    help="Comma-separated class names stored in the model  [default: from "
    "classes.json beside --data, else class_0, class_1, ...].",
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
    values, _ = resolve_options(ctx, saved_config_for=saved_run_config)
    require(values, "data", "val_data", "output")
    prepare_runtime()
    from klseg import runs

    result = runs.train(build(runs.TrainConfig, values))
    echo_result(result)


@cli.command()
@config_option
@click.option(
    "--source",
    type=PATH,
    help="Source model to start from: a .keras file, or keras-hub:PRESET_OR_DIR.",
)
@click.option("--data", type=PATH, help="Labelled target-domain training folder.")
@click.option(
    "--unlabeled-data",
    type=PATH,
    help="Unlabelled target-domain images (folder with images/); used by the "
    "KL term on target images, or by the consistency term when "
    "--consistency-weight is given.",
)
@click.option("--val-data", type=PATH, help="Target-domain validation folder.")
@click.option(
    "--source-val-data",
    type=PATH,
    help="Source-domain validation folder: reports how much source mIoU is kept.",
)
@click.option(
    "--source-images",
    type=PATH,
    help="Unlabelled source-domain images for the KL term (rehearsal).",
)
@click.option(
    "--kl-weight",
    type=FloatList(),
    help="Weight of the KL term; 0 is plain fine-tuning. A list such as "
    "0,0.1,0.3,1 runs one fine-tune per weight into subfolders and plots "
    "the source-vs-target trade-off.  [default: 0.3]",
)
@click.option(
    "--temperature",
    type=FiniteFloat(min=TEMPERATURE_RANGE[0], max=TEMPERATURE_RANGE[1]),
    help="Softmax temperature of the KL term.  [default: 2]",
)
@click.option(
    "--kl-inputs",
    type=click.Choice(KL_INPUTS),
    default=default(run_config.FinetuneConfig, "kl_inputs"),
    show_default=True,
    help="Images the KL term sees: target images, --source-images, or both; "
    "auto is 'source' when --source-images is given, else 'target'.",
)
@click.option(
    "--student-bn",
    type=click.Choice(STUDENT_BN),
    default=default(run_config.FinetuneConfig, "student_bn"),
    show_default=True,
    help="BatchNorm statistics of the fine-tuned model: learned, frozen at the "
    "source model's, or learned and synchronised across replicas (mirrored).",
)
@click.option(
    "--source-predictions",
    type=click.Choice(SOURCE_PREDICTIONS),
    default=default(run_config.FinetuneConfig, "source_predictions"),
    show_default=True,
    help="Run the source model every step (live), or store its predictions "
    "once in float16 (stored); auto stores them when they fit in half the "
    "available memory and says which it chose.",
)
@click.option(
    "--class-names",
    type=NameList(),
    help="Comma-separated classes of the fine-tuned model when they differ from "
    "the source model's: the model gets a new head for them  [default: the "
    "source model's classes].",
)
@click.option(
    "--source-class-map",
    type=PATH,
    help='JSON file {"merge": {source: target}, "drop": [source, ...]} for the '
    "source classes that are not target classes (with --class-names, or with "
    "class names in the target data's class map or classes.json).",
)
@click.option(
    "--consistency-weight",
    type=FloatList(),
    help="Weight of the KL consistency to an EMA teacher on --unlabeled-data "
    "(mean teacher; needs --unlabeled-data). model.keras is then the EMA "
    "teacher, picked by its target mIoU. A list runs one fine-tune per "
    "weight (a grid with a --kl-weight list).  [default: off]",
)
@click.option(
    "--ema-decay",
    type=FiniteFloat(min=0, max=1, max_open=True),
    default=default(run_config.FinetuneConfig, "ema_decay"),
    show_default=True,
    help="Decay of the teacher's exponential moving average of the weights.",
)
@click.option(
    "--consistency-threshold",
    type=FiniteFloat(min=0, max=1),
    default=default(run_config.FinetuneConfig, "consistency_threshold"),
    show_default=True,
    help="Teacher confidence a pixel needs to count in the consistency term.",
)
@click.option(
    "--consistency-rampup",
    type=click.IntRange(min=0),
    default=default(run_config.FinetuneConfig, "consistency_rampup"),
    show_default=True,
    help="Optimizer steps of the sigmoid ramp-up of the consistency weight.",
)
@click.option(
    "--consistency-mix",
    type=click.Choice(CONSISTENCY_MIX),
    default=default(run_config.FinetuneConfig, "consistency_mix"),
    show_default=True,
    help="Mixing of the student's strong view of the unlabelled images.",
)
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
          --kl-weight 0.1 --consistency-weight 1 --output runs/fewlabel
    """
    values, _ = resolve_options(ctx, saved_config_for=saved_run_config)
    require(values, "source", "data", "val_data", "output")
    prepare_runtime()
    from klseg import runs

    result = runs.finetune(build(runs.FinetuneConfig, values))
    echo_result(result)


@cli.command()
@config_option
@click.option(
    "--teacher",
    type=PATH,
    help="Trained teacher model: a .keras file or keras-hub:PRESET_OR_DIR.",
)
@click.option(
    "--model",
    default=default(run_config.DistillConfig, "model"),
    show_default=True,
    help=f"Student architecture: {', '.join(MODELS)}, or keras-hub:PRESET_OR_DIR.",
)
@click.option(
    "--backbone",
    type=click.Choice(BACKBONES),
    help="Student encoder  [default: plain for unet, resnet50 for deeplabv3_plus].",
)
@click.option(
    "--base-filters",
    type=click.IntRange(min=1),
    help="Student U-Net filters at the first level  [default: 32].",
)
@click.option(
    "--depth", type=click.IntRange(1, 6), help="Student U-Net levels  [default: 4]."
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    help="Number of classes; must equal the teacher's  [default: the teacher's].",
)
@click.option("--data", type=PATH, help="Labelled training folder.")
@click.option(
    "--unlabeled-data",
    type=PATH,
    help="Unlabelled training images (folder with images/); used by the KL term only.",
)
@click.option("--val-data", type=PATH, help="Labelled validation folder.")
@click.option(
    "--kl-weight",
    type=FiniteFloat(min=0),
    default=default(run_config.DistillConfig, "kl_weight"),
    show_default=True,
    help="Weight of the KL term; 0 trains the student on the labels alone.",
)
@click.option(
    "--temperature",
    type=FiniteFloat(min=TEMPERATURE_RANGE[0], max=TEMPERATURE_RANGE[1]),
    help="Softmax temperature of the KL term  [default: "
    + ", ".join(f"{t:g} for {k}" for k, t in DISTILL_TEMPERATURE.items())
    + "].",
)
@click.option(
    "--kl-type",
    type=click.Choice(DISTILL_KL_TYPES),
    default=default(run_config.DistillConfig, "kl_type"),
    show_default=True,
    help="pixel: KL between the class distributions of each pixel; channel: KL "
    "between the spatial distributions of each class channel (Shu et al. 2021).",
)
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
    values, _ = resolve_options(ctx, saved_config_for=saved_run_config)
    require(values, "teacher", "data", "val_data", "output")
    prepare_runtime()
    from klseg import runs

    result = runs.distill(build(runs.DistillConfig, values))
    echo_result(result)


@cli.command()
@config_option
@click.option("--model", type=PATH, help="Model file (.keras).")
@click.option("--data", type=PATH, help="Labelled folder (images/ + masks/).")
@click.option(
    "--image-size",
    type=ImageSize(minimum=8),
    help="Resize to HxW (or N for NxN)  [default: the model's training size, "
    "else the images' own size].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=default(run_config.EvaluateConfig, "batch_size"),
    show_default=True,
)
@click.option(
    "--ignore-value",
    type=click.IntRange(0, 255),
    default=default(run_config.EvaluateConfig, "ignore_value"),
    show_default=True,
)
@click.option("--class-map", type=PATH, help="JSON file mapping mask values.")
@inference_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--output", "-o", type=PATH, help="Also write the metrics to this file.")
@click.option(
    "--plot",
    type=PATH,
    help="Also draw the confusion matrix (rows normalised) to this PNG file.",
)
@click.pass_context
@run_errors
def evaluate(ctx, **_):
    """Evaluate a model: mean IoU, pixel accuracy, per-class IoU, precision
    and recall, and the confusion counts (rows: true class, columns:
    predicted class).

    With --tile-size / --tta the (resized) images are predicted in
    overlapping windows and/or with the flip; the scores come from the same
    confusion counts.

    \b
    Example:
      klseg evaluate --model runs/finetune/model.keras --data data/target/val
      klseg evaluate --model m.keras --data val --tile-size 128 --tile-overlap 0.5
      klseg evaluate --model m.keras --data val --json --plot confusion.png
    """
    values, _ = resolve_options(ctx)
    require(values, "model", "data")
    as_json = values.pop("as_json")
    prepare_runtime()
    from klseg import runs

    result = runs.evaluate(build(runs.EvaluateConfig, values))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(runs.format_metrics(result))


@cli.command()
@config_option
@click.option("--model", type=PATH, help="Model file (.keras).")
@click.option("--images", type=PATH, help="Folder of images (or its images/).")
@click.option("--output", "-o", type=PATH, help="Folder for masks/ and overlays/.")
@click.option(
    "--overlay/--no-overlay",
    default=True,
    show_default=True,
    help="Also write colour overlays a person can look at.",
)
@click.option(
    "--alpha",
    type=FiniteFloat(0, 1),
    default=default(run_config.PredictConfig, "alpha"),
    show_default=True,
    help="Opacity of the overlay colours.",
)
@click.option(
    "--image-size",
    type=ImageSize(minimum=8),
    help="Resize to HxW (or N for NxN) before predicting  [default: each "
    "image's own size].",
)
@inference_options
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
@run_errors
def predict(ctx, **_):
    """Predict class masks for a folder of images.

    Writes masks/NAME.png (class index per pixel, the format --data reads)
    and, with --overlay, overlays/NAME.png. Large images: --tile-size 512
    --tile-overlap 0.25 predicts them in blended windows.
    """
    values, _ = resolve_options(ctx)
    require(values, "model", "images", "output")
    prepare_runtime()
    from klseg import runs

    result = runs.predict(build(runs.PredictConfig, values))
    echo_result(result)


@cli.command()
@config_option
@click.option("--model", type=PATH, help="Model file (.keras).")
@click.option("--output", "-o", type=PATH, help="Export folder to write.")
@click.option(
    "--format",
    type=click.Choice(run_config.EXPORT_FORMATS),
    default=default(run_config.ExportConfig, "format"),
    show_default=True,
    help="SavedModel folder, LiteRT model.tflite or model.onnx.",
)
@click.option(
    "--quantize",
    type=click.Choice(run_config.QUANTIZATIONS),
    default=default(run_config.ExportConfig, "quantize"),
    show_default=True,
    help="TFLite weights: float32, float16, or full-integer int8 (needs "
    "--representative-data).",
)
@click.option(
    "--image-size",
    type=ImageSize(),
    help="Fixed input size HxW (or N): tflite/onnx [default: the model's "
    "training size]; saved_model [default: any size].",
)
@click.option(
    "--representative-data",
    type=PATH,
    help="Folder of typical images (or with images/) to calibrate int8 on.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@click.pass_context
@run_errors
def export(ctx, **_):
    """Export a model for serving: SavedModel, LiteRT (TFLite) or ONNX.

    saved_model: the 'serving_default' signature takes uint8 images
    (B, H, W, 3) of any size (of the --image-size when given) and returns
    'classes' (B, H, W) and 'probabilities' (B, H, W, C). tflite / onnx:
    OUTPUT/model.tflite or OUTPUT/model.onnx takes uint8 images (1, H, W, 3)
    of the --image-size (onnx: any batch) and returns the int32 class map (1, H, W).
    OUTPUT/export.json describes the export.
    """
    values, _ = resolve_options(ctx)
    require(values, "model", "output")
    prepare_runtime()
    from klseg import runs

    result = runs.export(build(runs.ExportConfig, values))
    echo_result(result)


@cli.group()
def data():
    """Data sets."""


@data.command()
@config_option
@click.option("--output", "-o", type=PATH, help="Folder to write.")
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    default=default(run_config.SynthConfig, "image_size"),
    show_default=True,
)
@click.option(
    "--num-train",
    type=click.IntRange(min=1),
    default=default(run_config.SynthConfig, "num_train"),
    show_default=True,
)
@click.option(
    "--num-val",
    type=click.IntRange(min=1),
    default=default(run_config.SynthConfig, "num_val"),
    show_default=True,
)
@click.option(
    "--num-unlabeled",
    type=click.IntRange(min=0),
    default=default(run_config.SynthConfig, "num_unlabeled"),
    show_default=True,
)
@click.option(
    "--seed",
    type=int,
    default=default(run_config.SynthConfig, "seed"),
    show_default=True,
)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder.")
@click.pass_context
@run_errors
def synth(ctx, **_):
    """Write the built-in two-domain benchmark as image folders.

    \b
    Layout:
      OUTPUT/{source,target}/{train,val}/{images,masks}/
      OUTPUT/{source,target}/unlabeled/images/
    """
    values, _ = resolve_options(ctx)
    require(values, "output")
    prepare_runtime()
    from klseg import runs

    result = runs.synth_data(build(runs.SynthConfig, values))
    echo_result(result)


@cli.command()
@config_option
@click.option(
    "--output",
    "-o",
    type=PATH,
    default=default(run_config.DemoConfig, "output"),
    show_default=True,
    help="Folder for the data, runs, report and export.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny version that finishes in seconds (checks the set-up; the "
    "numbers mean nothing).",
)
@click.option(
    "--image-size",
    type=ImageSize(minimum=16),
    help="Training size HxW (or N); the data is written as squares of the longer side.",
)
@click.option("--num-train", type=click.IntRange(min=1), help="Training images.")
@click.option("--source-epochs", type=click.IntRange(min=1), help="Source epochs.")
@click.option(
    "--finetune-epochs", type=click.IntRange(min=1), help="Fine-tuning epochs."
)
@click.option("--kl-weight", type=FiniteFloat(min=0), help="KL weight of the KL run.")
@click.option(
    "--seed",
    type=int,
    default=default(run_config.DemoConfig, "seed"),
    show_default=True,
)
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
@run_errors
def demo(ctx, **_):
    """Show the method end to end on built-in two-domain data.

    Writes the data, trains a source model, fine-tunes it on the target
    domain without and with the KL term, prints both domains' mIoU for the
    three models, and writes report.md and a SavedModel export.
    """
    values, _ = resolve_options(ctx)
    prepare_runtime()
    from klseg import runs

    cfg = build(runs.DemoConfig, values)
    result = runs.demo(cfg)
    echo_result(result)


def main():
    cli()


if __name__ == "__main__":
    main()
