"""What the ``klseg`` commands share: option blocks, error handling, set-up.

Choices and defaults come from :mod:`klseg.registry` (and the inference
options' from :mod:`klseg.inference`), which load without the run layer's
configs; this module keeps no copy of them. The commands build the configs
(:mod:`klseg.runs.configs`) only when they run.
"""

import dataclasses
import functools
import os
import warnings
from pathlib import Path

import click

from klseg import errors
from klseg.inference import MAX_TILE_OVERLAP, TTA_MODES, InferenceOptions
from klseg.registry import (
    AUGMENT,
    DEFAULT_LEARNING_RATE,
    LIMITS,
    MIXED_PRECISION,
    RUN_DEFAULTS,
    STRATEGIES,
)

from .types import FilePath, FiniteFloat, ImageSize, MixedPrecision, TileSize

__all__ = [
    "FILE",
    "PATH",
    "bounded",
    "build",
    "config_option",
    "default",
    "default_option",
    "option_block",
    "echo_result",
    "inference_options",
    "prepare_runtime",
    "require",
    "run_errors",
    "run_job",
    "run_options",
    "saved_run_config",
]


def default(config_class, name):
    """The default of a config field: the library owns every default."""
    for field in dataclasses.fields(config_class):
        if field.name == name:
            return field.default
    raise KeyError(name)


def default_option(defaults, *param_decls, **attrs):
    """A ``click.option`` whose default is the job's, shown in ``--help``.

    Args:
        defaults: the job's defaults, ``{name: value}`` (a table of
            :mod:`klseg.registry`); the option's name picks the entry
            (``--kl-inputs`` or ``--jit/--no-jit``: ``kl_inputs``, ``jit``).
        *param_decls, **attrs: as ``click.option``.
    """
    name = param_decls[0].split("/")[0].lstrip("-").replace("-", "_")
    return click.option(
        *param_decls, default=defaults[name], show_default=True, **attrs
    )


def option_block(*options):
    """One decorator for several options; ``--help`` lists them in this order."""

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _short_float(value):
    """``1e-3`` for 0.001, as the help texts write small numbers."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


PATH = click.Path(path_type=str)
#: A path that must be a regular file when it exists (not a folder or a
#: device such as /dev/zero).
FILE = FilePath()


def bounded(name, *, minimum=None):
    """``click.IntRange`` of the integer option ``name`` from
    ``klseg.registry.LIMITS`` (the configs check the same range);
    ``minimum`` raises the lowest value for one option."""
    low, high = LIMITS[name]
    return click.IntRange(low if minimum is None else max(low, minimum), high)


# --------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------


def prepare_runtime():
    """Quieter TensorFlow start-up; only when a command actually runs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # No CUDA-probe lines when the command first imports TensorFlow.
    from .startup import quiet_imports

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
        from klseg.runs.runtime import interrupt_handler

        from .interrupts import take_interrupt

        try:
            with interrupt_handler():
                if take_interrupt():
                    raise KeyboardInterrupt
                return fn(*args, **kwargs)
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
        import shlex

        return (
            f" Continue it with: klseg {ctx.info_name} "
            f"--output {shlex.quote(str(values['output']))} --resume"
        )
    return " No epoch was completed, so there is nothing to --resume; start it again."


def config_option(fn):
    return click.option(
        "--config",
        type=FILE,
        help="YAML, TOML or JSON file with option values; options given on "
        "the command line override it.",
    )(fn)


def run_options(fn):
    """Options every training command (train, finetune, distill) shares."""
    return option_block(
        click.option("--output", "-o", type=PATH, help="Run folder to write."),
        *_size_options(),
        *_schedule_options(),
        *_label_options(),
        default_option(
            RUN_DEFAULTS,
            "--monitor",
            help="History column that picks the best epoch for model.keras "
            "(lowest for *loss and val_forgetting, else highest), or 'auto' "
            "(val_mean_iou for train, val_target_mean_iou for finetune).",
        ),
        default_option(RUN_DEFAULTS, "--seed", type=bounded("seed")),
        *_device_options(),
        *_invocation_options(),
    )(fn)


def _size_options():
    return (
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
    )


def _schedule_options():
    """Epochs, steps, validation, batch size and learning rate."""
    rates = DEFAULT_LEARNING_RATE
    return (
        default_option(RUN_DEFAULTS, "--epochs", type=bounded("epochs")),
        click.option(
            "--steps-per-epoch",
            type=bounded("steps_per_epoch"),
            help="Optimizer steps per epoch (an epoch is then a fixed number of "
            "batches, not a pass over the data)  [default: one pass over the "
            "training images].",
        ),
        default_option(
            RUN_DEFAULTS,
            "--val-every",
            type=bounded("val_every"),
            help="Validate every N epochs and after the last one; model.keras "
            "is the best validated epoch.",
        ),
        default_option(
            RUN_DEFAULTS,
            "--batch-size",
            type=bounded("batch_size"),
            help="Global batch size (split across replicas).",
        ),
        click.option(
            "--learning-rate",
            type=FiniteFloat(min=0, min_open=True),
            help=f"Adam learning rate  [default: {_short_float(rates['train'])} "
            f"train, {_short_float(rates['finetune'])} finetune].",
        ),
    )


def _label_options():
    """Augmentation of the training images and the reading of their masks."""
    return (
        default_option(
            RUN_DEFAULTS,
            "--augment",
            type=click.Choice(AUGMENT),
            help="Augmentation preset for the training images.",
        ),
        default_option(
            RUN_DEFAULTS,
            "--ignore-value",
            type=bounded("ignore_value"),
            help="Mask value of pixels without a label.",
        ),
        click.option(
            "--class-map",
            type=FILE,
            help="JSON file mapping mask values to class indices.",
        ),
    )


def _device_options():
    """Distribution, XLA and mixed precision."""
    return (
        default_option(
            RUN_DEFAULTS,
            "--strategy",
            type=click.Choice(STRATEGIES),
            help="One device, all GPUs of this machine (mirrored; on the JAX "
            "backend keras.distribution.DataParallel over the local devices), "
            "or several machines configured by TF_CONFIG (multi-worker, "
            "TensorFlow only).",
        ),
        default_option(
            RUN_DEFAULTS,
            "--jit/--no-jit",
            help="Compile the training step with XLA (not with mirrored or "
            "multi-worker).",
        ),
        default_option(
            RUN_DEFAULTS,
            "--mixed-precision",
            type=MixedPrecision(MIXED_PRECISION),
            is_flag=False,
            flag_value="auto",
            help="Compute in float16/bfloat16 with float32 variables; a bare "
            "flag means auto (float16 on GPU, bfloat16 on CPU).",
        ),
    )


def _invocation_options():
    """How the run is invoked: resume, overwrite, quiet."""
    return (
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
    )


def inference_options(fn):
    """Windows and test-time augmentation (evaluate, predict)."""
    defaults = {f.name: f.default for f in dataclasses.fields(InferenceOptions)}
    return option_block(
        click.option(
            "--tile-size",
            type=TileSize(),
            help="Predict in windows of HxW pixels (or N for NxN), each side a "
            "multiple of the model's size multiple; larger than the image "
            "means the whole image  [default: whole images].",
        ),
        default_option(
            defaults,
            "--tile-overlap",
            type=FiniteFloat(0, MAX_TILE_OVERLAP),
            help="Fraction of a window shared with its neighbour; overlaps "
            "are blended with linear weights.",
        ),
        default_option(
            defaults,
            "--tta",
            type=click.Choice(TTA_MODES),
            help="Test-time augmentation: 'flip' averages with the "
            "horizontally flipped image.",
        ),
    )(fn)


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


def run_job(ctx, job, config_class, *required, resumable=False, mode_keys=()):
    """What a command does once its options are parsed.

    Merges the options with ``--config`` (and, for a ``resumable`` job, the
    saved config of the run being resumed), checks that the ``required``
    ones are set, builds ``klseg.runs.CONFIG_CLASS`` and calls
    ``klseg.runs.JOB`` with it, then prints the result's summary.

    ``mode_keys`` are options whose default depends on the run's mode: left
    at their command-line default, they reach the config as ``None`` (the
    config picks the mode's value). A resumed run whose ``config.yaml``
    predates the mode defaults (``mode_defaults`` came from no layer, not
    even that file) keeps the job's defaults it was made with.
    """
    from .config_files import resolve_options

    saved = saved_run_config if resumable else None
    values, origins = resolve_options(ctx, saved_config_for=saved)
    if mode_keys:
        resumed = resumable and saved_run_config(values) is not None
        if resumed and origins["mode_defaults"] == "default":
            values["mode_defaults"] = False
        else:
            values.update({k: None for k in mode_keys if origins[k] == "default"})
    require(values, *required)
    prepare_runtime()
    from klseg import runs

    result = getattr(runs, job)(build(getattr(runs, config_class), values))
    echo_result(result)


def echo_result(result):
    if result is not None and getattr(result, "summary", None):
        click.echo(result.summary())
