"""What the ``klseg`` commands share: option blocks, error handling, set-up.

Defaults and choices come from the run layer (:mod:`klseg.runs.configs`) and
:mod:`klseg.registry`; this module keeps no copy of them.
"""

import dataclasses
import functools
import os
import shlex
import warnings
from pathlib import Path

import click

from klseg import errors
from klseg.inference import MAX_TILE_OVERLAP, TTA_MODES
from klseg.runs import configs as run_config
from klseg.runs.configs import (
    AUGMENT,
    MIXED_PRECISION,
    STRATEGIES,
)

from .types import FiniteFloat, ImageSize, MixedPrecision, TileSize

__all__ = [
    "PATH",
    "build",
    "config_option",
    "default",
    "echo_result",
    "inference_options",
    "prepare_runtime",
    "require",
    "run_errors",
    "run_options",
    "saved_run_config",
]


def default(config_class, name):
    """The default of a config field: the library owns every default."""
    for field in dataclasses.fields(config_class):
        if field.name == name:
            return field.default
    raise KeyError(name)


TRAIN = run_config.TrainConfig

PATH = click.Path(path_type=str)


# --------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------


def prepare_runtime():
    """Quieter TensorFlow start-up; only when a command actually runs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # No CUDA-probe lines when the command first imports TensorFlow.
    from .entry import quiet_imports

    quiet_imports()
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


def run_errors(fn):
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


def config_option(fn):
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=str),
        help="YAML, TOML or JSON file with option values; options given on "
        "the command line override it.",
    )(fn)


def run_options(fn):
    """Options every training command (train, finetune) shares."""
    options = [
        click.option("--output", "-o", type=PATH, help="Run folder to write."),
        click.option(
            "--image-size",
            type=ImageSize(minimum=8),
            help="Training and validation size HxW (or N for NxN); images are "
            "resized to it  [default: train: the training images' size (one for "
            "all); finetune: the source model's training size].",
        ),
        click.option(
            "--crop-size",
            type=ImageSize(minimum=8),
            help="Train on random HxW crops of the images at --image-size; "
            "validation sees whole images  [default: no crop].",
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=default(TRAIN, "epochs"),
            show_default=True,
        ),
        click.option(
            "--steps-per-epoch",
            type=click.IntRange(min=1),
            help="Optimizer steps per epoch (an epoch is then a fixed number of "
            "batches, not a pass over the data)  [default: one pass over the "
            "training images].",
        ),
        click.option(
            "--val-every",
            type=click.IntRange(min=1),
            default=default(TRAIN, "val_every"),
            show_default=True,
            help="Validate every N epochs and after the last one; model.keras "
            "is the best validated epoch.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=default(TRAIN, "batch_size"),
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
            default=default(TRAIN, "augment"),
            show_default=True,
            help="Augmentation preset for the training images.",
        ),
        click.option(
            "--ignore-value",
            type=click.IntRange(0, 255),
            default=default(TRAIN, "ignore_value"),
            show_default=True,
            help="Mask value of pixels without a label.",
        ),
        click.option(
            "--class-map",
            type=PATH,
            help="JSON file mapping mask values to class indices.",
        ),
        click.option(
            "--monitor",
            default=default(TRAIN, "monitor"),
            show_default=True,
            help="History column that picks the best epoch for model.keras "
            "(lowest for *loss and val_forgetting, else highest), or 'auto' "
            "(val_mean_iou for train, val_target_mean_iou for finetune).",
        ),
        click.option(
            "--seed", type=int, default=default(TRAIN, "seed"), show_default=True
        ),
        click.option(
            "--strategy",
            type=click.Choice(STRATEGIES),
            default=default(TRAIN, "strategy"),
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
            default=default(TRAIN, "mixed_precision"),
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


def inference_options(fn):
    """Windows and test-time augmentation (evaluate, predict)."""
    options = [
        click.option(
            "--tile-size",
            type=TileSize(),
            help="Predict in windows of HxW pixels (or N for NxN), each side a "
            "multiple of the model's size multiple; larger than the image "
            "means the whole image  [default: whole images].",
        ),
        click.option(
            "--tile-overlap",
            type=FiniteFloat(0, MAX_TILE_OVERLAP),
            default=default(run_config.PredictConfig, "tile_overlap"),
            show_default=True,
            help="Fraction of a window shared with its neighbour; overlaps "
            "are blended with linear weights.",
        ),
        click.option(
            "--tta",
            type=click.Choice(TTA_MODES),
            default=default(run_config.PredictConfig, "tta"),
            show_default=True,
            help="Test-time augmentation: 'flip' averages with the "
            "horizontally flipped image.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def require(values, *names):
    missing = [n for n in names if values.get(n) in (None, "", ())]
    if missing:
        listed = ", ".join(f"'--{n.replace('_', '-')}'" for n in missing)
        raise click.UsageError(
            f"Missing option {listed} (give it on the command line or in the "
            "--config file)."
        )


def saved_run_config(values):
    """The saved config of the run being resumed (a layer under --config)."""
    if not values.get("resume") or not values.get("output"):
        return None
    path = Path(values["output"]) / "config.yaml"
    return path if path.is_file() else None


def build(config_class, values, drop=()):
    """Config object from resolved values; bad combinations exit 2."""
    kwargs = {k: v for k, v in values.items() if k not in {"config", *drop}}
    if "quiet" in kwargs:
        kwargs["verbose"] = 0 if kwargs.pop("quiet") else 1
    try:
        return config_class(**kwargs)
    except errors.InvalidArgumentError as e:
        raise click.UsageError(str(e)) from None


def echo_result(result):
    if result is not None and getattr(result, "summary", None):
        click.echo(result.summary())
