"""Entry point of the ``klseg`` command.

Heavy imports (Keras, TensorFlow) happen inside the commands, so
``klseg --help`` and ``klseg --version`` answer at once.

Each command parses its options, merges them with ``--config`` (see
:mod:`klseg.cli.config` for the order), builds the matching config object
of :mod:`klseg.runs` and calls one function there. Mistakes in options exit
with status 2, failed runs (bad data, missing or incompatible files) with
status 1, an interrupted run with 130; none of them prints a traceback.
"""

import dataclasses
import functools
import json
import os
import shlex
import warnings
from pathlib import Path

import click

from klseg import errors
from klseg._version import __version__
from klseg.registry import BACKBONES, MODELS
from klseg.runs import config as run_config
from klseg.runs.config import (
    AUGMENT,
    KL_INPUTS,
    MIXED_PRECISION,
    SOURCE_PREDICTIONS,
    STRATEGIES,
    STUDENT_BN,
    TEMPERATURE_RANGE,
)

from .config import resolve_options
from .types import FiniteFloat, FloatList, MixedPrecision, NameList

__all__ = ["cli", "main"]


def _default(config_class, name):
    """The default of a config field: the library owns every default."""
    for field in dataclasses.fields(config_class):
        if field.name == name:
            return field.default
    raise KeyError(name)


_TRAIN = run_config.TrainConfig

_PATH = click.Path(path_type=str)


# --------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------


def _prepare_runtime():
    """Quieter TensorFlow start-up; only when a command actually runs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # klseg's warnings are meant for the user: one line, no source location.
    if warnings.formatwarning is not _format_warning:
        global _python_formatwarning
        _python_formatwarning = warnings.formatwarning
        warnings.formatwarning = _format_warning


_python_formatwarning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None):
    if "klseg" in str(filename).replace("\\", "/").split("/"):
        return f"Warning: {message}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


def _run_errors(fn):
    """Turn klseg's errors into exit codes without tracebacks.

    A Ctrl-C (``KeyboardInterrupt``, or any error raised once one was
    caught: an interrupted import can surface as another exception) prints
    one line, ``Interrupted.`` with the resume hint, and exits 130. A Ctrl-C
    held since start-up (:mod:`klseg.cli.entry`) stops the command before
    it starts.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from klseg.runs.runtime import interrupt_handler, was_interrupted

        from .entry import take_interrupt

        try:
            try:
                with interrupt_handler():
                    if take_interrupt():
                        raise KeyboardInterrupt
                    return fn(*args, **kwargs)
            except Exception:
                if was_interrupted():
                    raise KeyboardInterrupt from None
                raise
        except click.ClickException:
            raise
        except errors.InvalidArgumentError as e:
            raise click.UsageError(str(e)) from None
        except errors.KlsegError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            ctx = click.get_current_context()
            click.echo(f"\nInterrupted.{_resume_hint(ctx)}", err=True)
            raise click.exceptions.Exit(130) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None

    return wrapper


def _resume_hint(ctx):
    """How to continue an interrupted run, when there is something to resume:
    a completed epoch saved in the run folder (or in a sweep's runs)."""
    values = ctx.meta.get("klseg.values") or ctx.params
    if "resume" not in values or not values.get("output"):
        return ""
    out = Path(values["output"])
    saved = [out / "checkpoints" / "latest.json"]
    saved += [p / "checkpoints" / "latest.json" for p in out.glob("kl_*")]
    if any(p.is_file() for p in saved):
        return (
            f" Continue it with: klseg {ctx.info_name} "
            f"--output {shlex.quote(str(values['output']))} --resume"
        )
    return " No epoch was completed, so there is nothing to --resume; start it again."


def _config_option(fn):
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=str),
        help="YAML, TOML or JSON file with option values; options given on "
        "the command line override it.",
    )(fn)


def _run_options(fn):
    """Options every training command (train, finetune) shares."""
    options = [
        click.option("--output", "-o", type=_PATH, help="Run folder to write."),
        click.option(
            "--image-size",
            type=click.IntRange(min=8),
            default=_default(_TRAIN, "image_size"),
            show_default=True,
            help="Training crop/resize size in pixels (square).",
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=_default(_TRAIN, "epochs"),
            show_default=True,
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=_default(_TRAIN, "batch_size"),
            show_default=True,
            help="Global batch size (split across replicas).",
        ),
        click.option(
            "--learning-rate",
            type=FiniteFloat(min=0, min_open=True),
            help="Adam learning rate  [default: 1e-3 train, 1e-4 finetune].",
        ),
        click.option(
            "--augment",
            type=click.Choice(AUGMENT),
            default=_default(_TRAIN, "augment"),
            show_default=True,
            help="Augmentation preset for the training images.",
        ),
        click.option(
            "--ignore-value",
            type=click.IntRange(0, 255),
            default=_default(_TRAIN, "ignore_value"),
            show_default=True,
            help="Mask value of pixels without a label.",
        ),
        click.option(
            "--class-map",
            type=_PATH,
            help="JSON file mapping mask values to class indices.",
        ),
        click.option(
            "--monitor",
            default=_default(_TRAIN, "monitor"),
            show_default=True,
            help="History column that picks the best epoch for model.keras "
            "(lowest for *loss and val_forgetting, else highest), or 'auto' "
            "(val_mean_iou for train, val_target_mean_iou for finetune).",
        ),
        click.option(
            "--seed", type=int, default=_default(_TRAIN, "seed"), show_default=True
        ),
        click.option(
            "--strategy",
            type=click.Choice(STRATEGIES),
            default=_default(_TRAIN, "strategy"),
            show_default=True,
            help="tf.distribute strategy: one device, all GPUs of this machine "
            "(mirrored), or several machines configured by TF_CONFIG "
            "(multi-worker).",
        ),
        click.option(
            "--jit/--no-jit",
            default=False,
            show_default=True,
            help="Compile the training step with XLA (not with mirrored or "
            "multi-worker).",
        ),
        click.option(
            "--mixed-precision",
            type=MixedPrecision(MIXED_PRECISION),
            default=_default(_TRAIN, "mixed_precision"),
            is_flag=False,
            flag_value="auto",
            show_default=True,
            help="Compute in float16/bfloat16 with float32 variables; a bare "
            "flag means auto (float16 on GPU, bfloat16 on CPU).",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue the interrupted run in --output from its last "
            "completed epoch.",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace an existing run in --output.",
        ),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _require(values, *names):
    missing = [n for n in names if values.get(n) in (None, "", ())]
    if missing:
        listed = ", ".join(f"'--{n.replace('_', '-')}'" for n in missing)
        raise click.UsageError(
            f"Missing option {listed} (give it on the command line or in the "
            "--config file)."
        )


def _saved_run_config(values):
    """The saved config of the run being resumed (a layer under --config)."""
    if not values.get("resume") or not values.get("output"):
        return None
    path = Path(values["output"]) / "config.yaml"
    return path if path.is_file() else None


def _build(config_class, values, drop=()):
    """Config object from resolved values; bad combinations exit 2."""
    kwargs = {k: v for k, v in values.items() if k not in {"config", *drop}}
    if "quiet" in kwargs:
        kwargs["verbose"] = 0 if kwargs.pop("quiet") else 1
    try:
        return config_class(**kwargs)
    except errors.InvalidArgumentError as e:
        raise click.UsageError(str(e)) from None


def _echo_result(result):
    if result is not None and getattr(result, "summary", None):
        click.echo(result.summary())


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
@_config_option
@click.option(
    "--data", type=_PATH, help="Training folder (images/ + masks/) or tfds:NAME."
)
@click.option("--val-data", type=_PATH, help="Validation folder or tfds:NAME:SPLIT.")
@click.option(
    "--model",
    type=click.Choice(MODELS),
    default=_default(_TRAIN, "model"),
    show_default=True,
    help="Architecture.",
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
@_run_options
@click.pass_context
@_run_errors
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
    values, _ = resolve_options(ctx, saved_config_for=_saved_run_config)
    _require(values, "data", "val_data", "output")
    _prepare_runtime()
    from klseg import runs

    result = runs.train(_build(runs.TrainConfig, values))
    _echo_result(result)


@cli.command()
@_config_option
@click.option("--source", type=_PATH, help="Source model (.keras) to start from.")
@click.option("--data", type=_PATH, help="Labelled target-domain training folder.")
@click.option(
    "--unlabeled-data",
    type=_PATH,
    help="Unlabelled target-domain images (folder with images/); used by the "
    "KL term only.",
)
@click.option("--val-data", type=_PATH, help="Target-domain validation folder.")
@click.option(
    "--source-val-data",
    type=_PATH,
    help="Source-domain validation folder: reports how much source mIoU is kept.",
)
@click.option(
    "--source-images",
    type=_PATH,
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
    default=_default(run_config.FinetuneConfig, "kl_inputs"),
    show_default=True,
    help="Images the KL term sees: target images, --source-images, or both; "
    "auto is 'source' when --source-images is given, else 'target'.",
)
@click.option(
    "--student-bn",
    type=click.Choice(STUDENT_BN),
    default=_default(run_config.FinetuneConfig, "student_bn"),
    show_default=True,
    help="BatchNorm statistics of the fine-tuned model.",
)
@click.option(
    "--source-predictions",
    type=click.Choice(SOURCE_PREDICTIONS),
    default=_default(run_config.FinetuneConfig, "source_predictions"),
    show_default=True,
    help="Run the source model every step, or store its predictions once.",
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
    type=_PATH,
    help='JSON file {"merge": {source: target}, "drop": [source, ...]} for the '
    "source classes that are not target classes (with --class-names, or with "
    "class names in the target data's class map or classes.json).",
)
@_run_options
@click.pass_context
@_run_errors
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
    """
    values, _ = resolve_options(ctx, saved_config_for=_saved_run_config)
    _require(values, "source", "data", "val_data", "output")
    _prepare_runtime()
    from klseg import runs

    result = runs.finetune(_build(runs.FinetuneConfig, values))
    _echo_result(result)


@cli.command()
@_config_option
@click.option("--model", type=_PATH, help="Model file (.keras).")
@click.option("--data", type=_PATH, help="Labelled folder (images/ + masks/).")
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    help="Resize to this size  [default: the run's training size].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_default(run_config.EvaluateConfig, "batch_size"),
    show_default=True,
)
@click.option(
    "--ignore-value",
    type=click.IntRange(0, 255),
    default=_default(run_config.EvaluateConfig, "ignore_value"),
    show_default=True,
)
@click.option("--class-map", type=_PATH, help="JSON file mapping mask values.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--output", "-o", type=_PATH, help="Also write the metrics to this file.")
@click.pass_context
@_run_errors
def evaluate(ctx, **_):
    """Evaluate a model: mean IoU, pixel accuracy and per-class IoU.

    \b
    Example:
      klseg evaluate --model runs/finetune/model.keras --data data/target/val
    """
    values, _ = resolve_options(ctx)
    _require(values, "model", "data")
    as_json = values.pop("as_json")
    _prepare_runtime()
    from klseg import runs

    result = runs.evaluate(_build(runs.EvaluateConfig, values))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(runs.format_metrics(result))


@cli.command()
@_config_option
@click.option("--model", type=_PATH, help="Model file (.keras).")
@click.option("--images", type=_PATH, help="Folder of images (or its images/).")
@click.option("--output", "-o", type=_PATH, help="Folder for masks/ and overlays/.")
@click.option(
    "--overlay/--no-overlay",
    default=True,
    show_default=True,
    help="Also write colour overlays a person can look at.",
)
@click.option(
    "--alpha",
    type=FiniteFloat(0, 1),
    default=_default(run_config.PredictConfig, "alpha"),
    show_default=True,
    help="Opacity of the overlay colours.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    help="Resize before predicting  [default: each image's own size].",
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
@_run_errors
def predict(ctx, **_):
    """Predict class masks for a folder of images.

    Writes masks/NAME.png (class index per pixel, the format --data reads)
    and, with --overlay, overlays/NAME.png.
    """
    values, _ = resolve_options(ctx)
    _require(values, "model", "images", "output")
    _prepare_runtime()
    from klseg import runs

    result = runs.predict(_build(runs.PredictConfig, values))
    _echo_result(result)


@cli.command()
@_config_option
@click.option("--model", type=_PATH, help="Model file (.keras).")
@click.option("--output", "-o", type=_PATH, help="SavedModel folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@click.pass_context
@_run_errors
def export(ctx, **_):
    """Export a model as a TensorFlow SavedModel for serving.

    The 'serving_default' signature takes uint8 images (B, H, W, 3) of any
    size and returns 'classes' (B, H, W) and 'probabilities' (B, H, W, C).
    """
    values, _ = resolve_options(ctx)
    _require(values, "model", "output")
    _prepare_runtime()
    from klseg import runs

    result = runs.export(_build(runs.ExportConfig, values))
    _echo_result(result)


@cli.group()
def data():
    """Data sets."""


@data.command()
@_config_option
@click.option("--output", "-o", type=_PATH, help="Folder to write.")
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    default=_default(run_config.SynthConfig, "image_size"),
    show_default=True,
)
@click.option(
    "--num-train",
    type=click.IntRange(min=1),
    default=_default(run_config.SynthConfig, "num_train"),
    show_default=True,
)
@click.option(
    "--num-val",
    type=click.IntRange(min=1),
    default=_default(run_config.SynthConfig, "num_val"),
    show_default=True,
)
@click.option(
    "--num-unlabeled",
    type=click.IntRange(min=0),
    default=_default(run_config.SynthConfig, "num_unlabeled"),
    show_default=True,
)
@click.option(
    "--seed",
    type=int,
    default=_default(run_config.SynthConfig, "seed"),
    show_default=True,
)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder.")
@click.pass_context
@_run_errors
def synth(ctx, **_):
    """Write the built-in two-domain benchmark as image folders.

    \b
    Layout:
      OUTPUT/{source,target}/{train,val}/{images,masks}/
      OUTPUT/{source,target}/unlabeled/images/
    """
    values, _ = resolve_options(ctx)
    _require(values, "output")
    _prepare_runtime()
    from klseg import runs

    result = runs.synth_data(_build(runs.SynthConfig, values))
    _echo_result(result)


@cli.command()
@_config_option
@click.option(
    "--output",
    "-o",
    type=_PATH,
    default=_default(run_config.DemoConfig, "output"),
    show_default=True,
    help="Folder for the data, runs, report and export.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny version that finishes in seconds (checks the set-up; the "
    "numbers mean nothing).",
)
@click.option("--image-size", type=click.IntRange(min=16), help="Image size.")
@click.option("--num-train", type=click.IntRange(min=1), help="Training images.")
@click.option("--source-epochs", type=click.IntRange(min=1), help="Source epochs.")
@click.option(
    "--finetune-epochs", type=click.IntRange(min=1), help="Fine-tuning epochs."
)
@click.option("--kl-weight", type=FiniteFloat(min=0), help="KL weight of the KL run.")
@click.option(
    "--seed",
    type=int,
    default=_default(run_config.DemoConfig, "seed"),
    show_default=True,
)
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
@_run_errors
def demo(ctx, **_):
    """Show the method end to end on built-in two-domain data.

    Writes the data, trains a source model, fine-tunes it on the target
    domain without and with the KL term, prints both domains' mIoU for the
    three models, and writes report.md and a SavedModel export.
    """
    values, _ = resolve_options(ctx)
    _prepare_runtime()
    from klseg import runs

    cfg = _build(runs.DemoConfig, values)
    result = runs.demo(cfg)
    _echo_result(result)


def main():
    cli()


if __name__ == "__main__":
    main()
