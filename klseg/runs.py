"""The jobs behind the ``klseg`` commands, callable from Python.

Each command of the command line builds one config object and calls one
function here; a Python user can do the same::

    from klseg import runs

    result = runs.train(runs.TrainConfig(
        data="data/source/train", val_data="data/source/val",
        output="runs/source", epochs=10))
    result.metrics["val"]["mean_iou"]

A training run (``train``, ``finetune``) writes a *run folder*::

    OUTPUT/
      config.yaml        the resolved options (reusable with --config)
      model.keras        the best epoch's model by the monitored metric
      metrics.json       final metrics per validation domain
      history.csv        one row per epoch (keras.callbacks.CSVLogger)
      logs/              TensorBoard event files (train/, validation/)
      checkpoints/       last completed epochs: weights, optimizer state,
                         epoch, best-so-far and seed (for resume)
      report.md          the run report, with plots/*.png

Every file a later step relies on is written to a temporary name and renamed
into place, so an interruption leaves either the old or the new version.
``resume=True`` continues an interrupted run from its last completed epoch:
model weights, optimizer state (including its step counter), the epoch
counter, the best score so far and the history are restored.

TensorFlow and Keras are imported inside the functions.
"""

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import klseg
from klseg import errors

__all__ = [
    "TrainConfig",
    "FinetuneConfig",
    "EvaluateConfig",
    "PredictConfig",
    "ExportConfig",
    "SynthConfig",
    "DemoConfig",
    "RunResult",
    "SweepResult",
    "DemoResult",
    "train",
    "finetune",
    "evaluate",
    "predict",
    "export",
    "synth_data",
    "demo",
    "load_model",
    "evaluate_model",
    "format_metrics",
    "RunFolder",
]

STRATEGIES = ("default", "mirrored", "multi-worker")
MIXED_PRECISION = ("off", "auto", "float16", "bfloat16")
AUGMENT = ("none", "light", "strong")

# Fields that do not change what a run computes: a resumed run may differ
# from the saved config in these.
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "resume", "overwrite", "verbose", "output", "strategy", "jit"}
)
# Fields not written to config.yaml (how a run was invoked, not what it is).
_NOT_SAVED = frozenset({"resume", "overwrite", "verbose"})


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _fail(message):
    raise errors.InvalidArgumentError(message)


def _check_choice(name, value, choices):
    if value not in choices:
        _fail(
            f"{name} must be one of {', '.join(map(str, choices))}. "
            f"Received: {name}={value!r}"
        )


def _check_positive(name, value, *, allow_none=False, integer=True):
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        _fail(f"{name} must be {what}. Received: {name}={value!r}")


def _say(verbose, message):
    if verbose:
        print(message, flush=True)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean_json(value):
    """NaN/inf become None (JSON has no NaN); tuples become lists."""
    if isinstance(value, dict):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, data):
    """Write ``data`` as indented JSON (atomically); NaN is written as null."""
    text = json.dumps(_clean_json(data), indent=2, default=_json_default)
    return atomic_write_text(path, text + "\n")


def _yaml_dump(data):
    import yaml

    return yaml.safe_dump(_clean_json(data), sort_keys=False, default_flow_style=None)


def _read_yaml(path):
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


# --------------------------------------------------------------------------
# Config objects
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _RunOptions:
    """Options shared by the training jobs (``train``, ``finetune``)."""

    output: str | None = None
    image_size: int = 128
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float | None = None
    augment: str = "light"
    ignore_value: int = 255
    class_map: str | None = None
    monitor: str = "auto"
    seed: int = 0
    strategy: str = "default"
    jit: bool = False
    mixed_precision: str = "off"
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1

    def _check_run_options(self):
        if not self.output:
            _fail("output must name the run folder to write. Received: output=None")
        _check_positive("image_size", self.image_size)
        _check_positive("epochs", self.epochs)
        _check_positive("batch_size", self.batch_size)
        if self.learning_rate is not None:
            _check_positive("learning_rate", self.learning_rate, integer=False)
        _check_choice("augment", self.augment, AUGMENT)
        _check_choice("strategy", self.strategy, STRATEGIES)
        if self.mixed_precision is True:
            self.mixed_precision = "auto"
        elif self.mixed_precision in (False, None):
            self.mixed_precision = "off"
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if not 0 <= int(self.ignore_value) <= 255:
            _fail(
                "ignore_value must be in 0..255. "
                f"Received: ignore_value={self.ignore_value}"
            )
        if self.jit and self.strategy != "default":
            _fail(
                f"jit cannot be combined with strategy={self.strategy!r}: XLA "
                "compilation of a distributed training step fails on "
                "TensorFlow 2.21 (a resource on one device is read from "
                "another). Drop --jit, or use --strategy default. "
                f"Received: jit=True, strategy={self.strategy!r}"
            )
        if self.resume and self.overwrite:
            _fail("resume and overwrite exclude each other. Received both=True")

    def to_dict(self):
        """The options as saved in ``config.yaml`` (invocation flags left out)."""
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
            if k not in _NOT_SAVED
        }


@dataclasses.dataclass
class TrainConfig(_RunOptions):
    """Options of :func:`train` (``klseg train``).

    Attributes:
        data: labelled training folder (``images/`` + ``masks/``) or
            ``tfds:NAME[:SPLIT]``.
        val_data: labelled validation folder or spec.
        model: ``"unet"`` or ``"deeplabv3_plus"``.
        backbone, base_filters, depth: passed to the model builder when set.
        num_classes: number of classes; ``None`` reads it from the data
            (a ``classes.json`` in the data folder or above it, else the
            largest mask value + 1).
        class_names: names stored in the model; ``None`` reads them from a
            ``classes.json`` like ``num_classes``, else ``class_0``, ...
        learning_rate: Adam learning rate. ``None`` means 1e-3.
        monitor: history column whose highest value picks ``model.keras``;
            ``"auto"`` is ``val_mean_iou``.
        Others: see :class:`FinetuneConfig` and the command line help.
    """

    data: str | None = None
    val_data: str | None = None
    model: str = "unet"
    backbone: str | None = None
    base_filters: int | None = None
    depth: int | None = None
    num_classes: int | None = None
    class_names: tuple | None = None

    def __post_init__(self):
        self._check_run_options()
        if not self.data or not self.val_data:
            _fail(
                "train needs data and val_data. "
                f"Received: data={self.data!r}, val_data={self.val_data!r}"
            )
        _check_choice("model", self.model, ("unet", "deeplabv3_plus"))
        _check_positive("num_classes", self.num_classes, allow_none=True)
        _check_positive("base_filters", self.base_filters, allow_none=True)
        _check_positive("depth", self.depth, allow_none=True)
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)


@dataclasses.dataclass
class FinetuneConfig(_RunOptions):
    """Options of :func:`finetune` (``klseg finetune``).

    Attributes:
        source: the source model file (``.keras``).
        data: labelled target-domain training folder.
        val_data: labelled target-domain validation folder.
        unlabeled_data: unlabelled target-domain images; the KL term sees
            them, the task loss does not.
        source_val_data: labelled source-domain validation folder; gives the
            source-domain mIoU (what fine-tuning keeps or forgets).
        source_images: unlabelled source-domain images for the KL term.
        kl_weight: one weight, or several (a sweep: one run per weight in
            ``OUTPUT/kl_W/`` and a trade-off plot). ``0`` is plain
            fine-tuning. ``None`` uses the library default.
        temperature: softmax temperature of the KL term. ``None`` uses the
            library default.
        kl_inputs: ``"target"``, ``"source"``, ``"both"`` or ``"auto"``
            (``"source"`` when ``source_images`` is given, else
            ``"target"``).
        student_bn: ``"trainable"`` or ``"frozen"`` BatchNorm statistics.
        source_predictions: ``"live"`` (source model run each step) or
            ``"stored"`` (computed once).
        class_names: the fine-tuned model's classes when they differ from
            the source model's; the student gets a new head for them and
            the KL term maps the source classes onto them. ``None`` keeps
            the source model's classes (or, with ``source_class_map``,
            takes them from the target data's class map / ``classes.json``).
        source_class_map: JSON file ``{"merge": {source name: target name},
            "drop": [source names]}`` saying where the source classes that
            are not target classes go (see
            ``klseg.finetune.make_class_map``). When the classes change,
            ``class_map`` (mask values) applies to the target folders only;
            ``source_val_data`` is read in the source model's classes and
            mapped with this map (dropped classes are ignored).
        learning_rate: Adam learning rate. ``None`` means 1e-4.
        monitor: history column that picks ``model.keras``; ``"auto"`` is
            the target-domain validation mIoU.
    """

    source: str | None = None
    data: str | None = None
    val_data: str | None = None
    unlabeled_data: str | None = None
    source_val_data: str | None = None
    source_images: str | None = None
    kl_weight: tuple | float | None = None
    temperature: float | None = None
    kl_inputs: str = "auto"
    student_bn: str = "trainable"
    source_predictions: str = "live"
    class_names: tuple | None = None
    source_class_map: str | None = None

    def __post_init__(self):
        self._check_run_options()
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)
            if not self.class_names:
                _fail("class_names must not be empty. Received: class_names=()")
        if not self.source or not self.data or not self.val_data:
            _fail(
                "finetune needs source, data and val_data. Received: "
                f"source={self.source!r}, data={self.data!r}, "
                f"val_data={self.val_data!r}"
            )
        if self.kl_weight is not None:
            weights = (
                tuple(self.kl_weight)
                if isinstance(self.kl_weight, (list, tuple))
                else (self.kl_weight,)
            )
            for w in weights:
                if (
                    isinstance(w, bool)
                    or not isinstance(w, (int, float))
                    or not math.isfinite(w)
                    or w < 0
                ):
                    _fail(
                        "kl_weight must be a number >= 0 or a list of them. "
                        f"Received: kl_weight={self.kl_weight!r}"
                    )
            if not weights:
                _fail("kl_weight must not be an empty list. Received: kl_weight=()")
            self.kl_weight = tuple(float(w) for w in weights)
        if self.temperature is not None:
            _check_positive("temperature", self.temperature, integer=False)
        _check_choice("kl_inputs", self.kl_inputs, ("auto", "target", "source", "both"))
        if self.kl_inputs in ("source", "both") and not self.source_images:
            _fail(
                f"kl_inputs={self.kl_inputs!r} needs source_images (a folder of "
                "unlabelled source-domain images). Received: source_images=None"
            )
        _check_choice("student_bn", self.student_bn, ("trainable", "frozen"))
        _check_choice("source_predictions", self.source_predictions, ("live", "stored"))

    @property
    def is_sweep(self):
        return self.kl_weight is not None and len(self.kl_weight) > 1


@dataclasses.dataclass
class EvaluateConfig:
    """Options of :func:`evaluate` (``klseg evaluate``).

    ``model`` is a ``.keras`` path or a ``keras.Model``; ``image_size``
    ``None`` uses the training size saved next to the model (its run's
    ``config.yaml``), else 256. ``output`` optionally names a JSON file.
    """

    model: object = None
    data: str | None = None
    image_size: int | None = None
    batch_size: int = 8
    ignore_value: int = 255
    class_map: str | None = None
    output: str | None = None

    def __post_init__(self):
        if self.model is None or not self.data:
            _fail(
                "evaluate needs model and data. "
                f"Received: model={self.model!r}, data={self.data!r}"
            )
        _check_positive("image_size", self.image_size, allow_none=True)
        _check_positive("batch_size", self.batch_size)


@dataclasses.dataclass
class PredictConfig:
    """Options of :func:`predict` (``klseg predict``).

    ``image_size`` ``None`` predicts each image at its own size (padded to
    the model's size multiple inside and cropped back).
    """

    model: object = None
    images: str | None = None
    output: str | None = None
    overlay: bool = True
    alpha: float = 0.5
    image_size: int | None = None
    overwrite: bool = False
    verbose: int = 1

    def __post_init__(self):
        if self.model is None or not self.images or not self.output:
            _fail(
                "predict needs model, images and output. Received: "
                f"model={self.model!r}, images={self.images!r}, "
                f"output={self.output!r}"
            )
        _check_positive("image_size", self.image_size, allow_none=True)
        if not 0 <= self.alpha <= 1:
            _fail(f"alpha must be in [0, 1]. Received: alpha={self.alpha}")


@dataclasses.dataclass
class ExportConfig:
    """Options of :func:`export` (``klseg export``)."""

    model: object = None
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.model is None or not self.output:
            _fail(
                "export needs model and output. "
                f"Received: model={self.model!r}, output={self.output!r}"
            )


@dataclasses.dataclass
class SynthConfig:
    """Options of :func:`synth_data` (``klseg data synth``)."""

    output: str | None = None
    image_size: int = 64
    num_train: int = 160
    num_val: int = 64
    num_unlabeled: int = 160
    num_target_train: int | None = None
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        if not self.output:
            _fail("synth needs output. Received: output=None")
        _check_positive("image_size", self.image_size)
        _check_positive("num_train", self.num_train)
        _check_positive("num_val", self.num_val)
        _check_positive("num_target_train", self.num_target_train, allow_none=True)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        output: the run folder.
        model_path: ``OUTPUT/model.keras``.
        metrics: the content of ``metrics.json``.
        best_epoch: 1-based epoch of ``model.keras``.
        epochs: epochs completed.
    """

    output: Path
    model_path: Path
    metrics: dict
    best_epoch: int | None
    epochs: int

    def summary(self):
        lines = [f"Run folder: {self.output}", f"Best model: {self.model_path}"]
        if self.best_epoch:
            lines[-1] += f" (epoch {self.best_epoch} of {self.epochs})"
        for domain in ("val", "source", "target"):
            m = self.metrics.get(domain)
            if isinstance(m, dict) and m.get("mean_iou") is not None:
                lines.append(f"{domain} mean IoU: {100 * m['mean_iou']:.1f}")
        return "\n".join(lines)


@dataclasses.dataclass
class SweepResult:
    """A fine-tuning sweep over several KL weights.

    Attributes:
        output: the sweep folder (one ``kl_W`` run folder per weight).
        runs: ``{kl_weight: RunResult}``.
        table: rows ``{"kl_weight", "source", "target"}`` (mIoU in [0, 1]).
        tradeoff_plot: the PNG of source vs target mIoU.
    """

    output: Path
    runs: dict
    table: list
    tradeoff_plot: Path

    def summary(self):
        lines = [f"Sweep folder: {self.output}", _sweep_table_text(self.table)]
        lines.append(f"Trade-off plot: {self.tradeoff_plot}")
        return "\n".join(lines)


@dataclasses.dataclass
class DemoResult:
    """What :func:`demo` produced: the table, the folder and the wall time."""

    output: Path
    table: dict
    seconds: float
    export_path: Path | None

    def summary(self):
        lines = ["", format_domain_table(self.table), ""]
        lines.append(f"Report: {self.output / 'report.md'}")
        if self.export_path:
            lines.append(f"SavedModel: {self.export_path}")
        lines.append(f"Wall time: {self.seconds / 60:.1f} min")
        return "\n".join(lines)


def _sweep_table_text(rows):
    lines = ["kl_weight  source mIoU  target mIoU"]
    for row in rows:
        lines.append(
            f"{row['kl_weight']:>9g}  {_pct(row.get('source')):>11}  "
            f"{_pct(row.get('target')):>11}"
        )
    return "\n".join(lines)


def _pct(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.1f}"


def format_domain_table(table):
    """Plain-text table of ``{model: {"source": miou, "target": miou}}``."""
    width = max([len("model")] + [len(k) for k in table])
    lines = [
        f"{'model':<{width}}  source mIoU  target mIoU",
        f"{'-' * width}  -----------  -----------",
    ]
    for name, row in table.items():
        lines.append(
            f"{name:<{width}}  {_pct(row.get('source')):>11}  "
            f"{_pct(row.get('target')):>11}"
        )
    return "\n".join(lines)


def format_metrics(result):
    """Human-readable text of :func:`evaluate`'s result."""
    lines = [
        f"Model: {result.get('model')}",
        f"Data:  {result.get('data')} ({result.get('num_images')} images at "
        f"{result.get('image_size')}px)",
        f"mean IoU:       {_pct(result.get('mean_iou'))}",
        f"pixel accuracy: {_pct(result.get('pixel_accuracy'))}",
        "IoU per class:",
    ]
    per_class = result.get("per_class_iou") or {}
    width = max([5] + [len(k) for k in per_class])
    for name, value in per_class.items():
        shown = "absent" if value is None else _pct(value)
        lines.append(f"  {name:<{width}}  {shown:>6}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Run folders and checkpoints
# --------------------------------------------------------------------------


class RunFolder:
    """The files of one run (see the module docstring for the layout)."""

    def __init__(self, path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    model = property(lambda self: self.path / "model.keras")
    metrics = property(lambda self: self.path / "metrics.json")
    history = property(lambda self: self.path / "history.csv")
    logs = property(lambda self: self.path / "logs")
    checkpoints = property(lambda self: self.path / "checkpoints")
    plots = property(lambda self: self.path / "plots")
    report = property(lambda self: self.path / "report.md")

    def latest_checkpoint(self):
        """``(folder, state)`` of the last completed epoch, or ``None``."""
        pointer = self.checkpoints / "latest.json"
        if not pointer.is_file():
            return None
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
            folder = self.checkpoints / name
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError, KeyError) as e:
            raise errors.RunError(
                f"the checkpoint record in {self.checkpoints} is unreadable "
                f"({e}); start the run again without --resume."
            ) from None
        return folder, state


def _check_writable(path):
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise errors.RunError(f"output {path} exists and is not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise errors.RunError(
            f"cannot write to output folder {path}: {e.strerror or e}"
        ) from None


def _config_differences(saved, current):
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in _RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            diffs.append(f"{key}: saved {a!r}, now {b!r}")
    return diffs


def _abandoned(run):
    """A run folder whose run stopped before finishing its first epoch
    (bad data, a bad option found late, an interruption): nothing in it is
    worth keeping."""
    return (
        run.config.is_file()
        and not (run.checkpoints / "latest.json").exists()
        and not run.metrics.exists()
        and not run.model.exists()
        and not any(p.name.startswith("kl_") for p in run.path.iterdir())
    )


def _open_run(cfg, *, is_chief=True):
    """Prepare the run folder; returns ``(RunFolder, checkpoint or None)``.

    A new run needs an empty (or absent) folder, or ``overwrite`` of an
    earlier klseg run. ``resume`` needs the folder of an earlier run with
    the same settings (epochs may grow).
    """
    if not is_chief:
        # Other workers of a multi-worker run write to a private folder that
        # is removed at the end: the chief alone writes the run folder.
        return RunFolder(tempfile.mkdtemp(prefix="klseg-worker-")), None
    run = RunFolder(cfg.output)
    current = cfg.to_dict()
    if cfg.resume:
        if not run.config.is_file():
            raise errors.RunError(
                f"nothing to resume in {run.path}: it holds no klseg run "
                "(config.yaml is missing). Start it without --resume."
            )
        diffs = _config_differences(_read_yaml(run.config), current)
        if diffs:
            raise errors.RunError(
                f"cannot resume {run.path} with different settings: "
                + "; ".join(diffs)
                + ". Resume with the saved settings (only --epochs may change), "
                "or start a new run."
            )
        _check_writable(run.path)
        checkpoint = run.latest_checkpoint()
        atomic_write_text(run.config, _yaml_dump(current))
        return run, checkpoint
    if _abandoned(run):
        _say(
            cfg.verbose,
            f"Reusing {run.path}: its earlier run stopped before finishing an epoch.",
        )
        shutil.rmtree(run.path)
    if run.path.is_dir() and any(run.path.iterdir()):
        _replace_folder(run.path, run.config, cfg.overwrite, "run")
    _check_writable(run.path)
    atomic_write_text(run.config, _yaml_dump(current))
    return run, None


def _replace_folder(path, config_file, allowed, what):
    """Delete the non-empty output folder ``path`` if ``allowed``, else refuse.

    A folder that holds no klseg run (no ``config_file``) is never deleted.
    """
    if not allowed:
        raise errors.RunError(
            f"output folder {path} is not empty. Pass --resume to "
            f"continue the {what} in it, --overwrite to replace it, or choose "
            "another folder."
        )
    if not config_file.is_file():
        raise errors.RunError(
            f"refusing to overwrite {path}: it is not empty and holds "
            "no klseg run. Choose another folder."
        )
    shutil.rmtree(path)


def _save_checkpoint(run, model, optimizer, state, keep=2):
    """Write ``checkpoints/epoch_NNNN`` then point ``latest.json`` at it."""
    import numpy as np

    run.checkpoints.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{state['epoch']:04d}"
    final = run.checkpoints / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run.checkpoints))
    try:
        model.save_weights(tmp / "model.weights.h5")
        arrays = {
            f"v{i:05d}": np.asarray(_to_numpy(v))
            for i, v in enumerate(optimizer.variables)
        }
        np.savez(tmp / "optimizer.npz", **arrays)
        (tmp / "state.json").write_text(
            json.dumps(_clean_json(state), indent=2) + "\n", encoding="utf-8"
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(run.checkpoints / "latest.json", {"checkpoint": name})
    kept = sorted(p for p in run.checkpoints.glob("epoch_*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _to_numpy(variable):
    import keras

    return keras.ops.convert_to_numpy(variable.value)


def _restore_checkpoint(folder, model, optimizer):
    import numpy as np

    # Build the optimizer first: the weights file holds its variables too.
    optimizer.build(model.trainable_variables)
    try:
        model.load_weights(folder / "model.weights.h5")
    except Exception as e:
        raise errors.RunError(
            f"cannot restore the model weights from {folder}: {e}"
        ) from None
    with np.load(folder / "optimizer.npz") as saved:
        values = [saved[k] for k in sorted(saved.files)]
    variables = list(optimizer.variables)
    if len(values) != len(variables) or any(
        tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values)
    ):
        raise errors.RunError(
            f"the optimizer state in {folder} does not match this model "
            f"({len(values)} saved variables, {len(variables)} expected)."
        )
    for variable, value in zip(variables, values):
        variable.assign(value)


def _truncate_history(path, epochs_done):
    """Drop history rows of epochs that were not checkpointed."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    keep = [r for r in body if r and r[0].isdigit() and int(r[0]) < epochs_done]
    lines = [header, *keep]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(lines)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------


@functools.cache
def _callbacks_module():
    import keras

    class RunCheckpoint(keras.callbacks.Callback):
        """Best model by ``monitor`` plus a resumable checkpoint every epoch."""

        def __init__(self, run, monitor, *, save_model, state, seed):
            super().__init__()
            self.run = run
            self.monitor = monitor
            self.save_model = save_model
            self.best = state.get("best") if state else None
            self.best_epoch = state.get("best_epoch") if state else None
            self.seed = seed

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            if self.monitor not in logs:
                names = ", ".join(sorted(logs)) or "none"
                raise errors.RunError(
                    f"monitor {self.monitor!r} is not a history column. "
                    f"Columns: {names}."
                )
            value = float(logs[self.monitor])
            if _lower_is_better(self.monitor):
                better = self.best is None or value < self.best
            else:
                better = self.best is None or value > self.best
            if math.isfinite(value) and better:
                self.best, self.best_epoch = value, epoch + 1
                _save_model_atomic(self.save_model, self.run.model)
            state = {
                "epoch": epoch + 1,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "monitor": self.monitor,
                "seed": self.seed,
                "optimizer_iterations": int(_to_numpy(self.model.optimizer.iterations)),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            _save_checkpoint(self.run, self.model, self.model.optimizer, state)

    class EpochScalars(keras.callbacks.Callback):
        """Per-epoch TensorBoard scalars (``train/`` and ``validation/``).

        Written with ``tf.summary.write``, which needs no ``tensorboard``
        package (``pip install tensorboard`` to view the logs).
        """

        def __init__(self, log_dir):
            super().__init__()
            self.log_dir = Path(log_dir)
            self._writers = {}

        def _writer(self, name):
            import tensorflow as tf

            if name not in self._writers:
                self._writers[name] = tf.summary.create_file_writer(
                    str(self.log_dir / name)
                )
            return self._writers[name]

        def on_epoch_end(self, epoch, logs=None):
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            metadata = summary_pb2.SummaryMetadata()
            metadata.plugin_data.plugin_name = "scalars"
            for key, value in (logs or {}).items():
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    continue
                group, tag = (
                    ("validation", key[4:])
                    if key.startswith("val_")
                    else (
                        "train",
                        key,
                    )
                )
                with self._writer(group).as_default():
                    tf.summary.write(
                        f"epoch_{tag}",
                        tf.constant(value, tf.float32),
                        step=epoch,
                        metadata=metadata,
                    )
            for writer in self._writers.values():
                writer.flush()

        def on_train_end(self, logs=None):
            for writer in self._writers.values():
                writer.close()
            self._writers = {}

    class EpochValidation(keras.callbacks.Callback):
        """Validation loss, mean IoU and pixel accuracy after every epoch.

        Computed with :func:`evaluate_model` on each dataset (outside the
        training step, so Keras' validation graph is not built) and
        written to the epoch logs as ``val_{prefix}loss``,
        ``val_{prefix}mean_iou`` and ``val_{prefix}pixel_accuracy``. With a
        ``baseline`` (the source model's source-domain mean IoU) it adds
        ``val_forgetting`` = baseline - ``val_source_mean_iou``.
        """

        def __init__(
            self, datasets, *, eval_model, num_classes, ignore_value, baseline=None
        ):
            super().__init__()
            self.datasets = {k: v for k, v in datasets.items() if v is not None}
            self.eval_model = eval_model
            self.forward = inference_function(eval_model)
            self.num_classes = num_classes
            self.ignore_value = ignore_value
            self.baseline = baseline

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            for prefix, dataset in self.datasets.items():
                result = evaluate_model(
                    self.eval_model,
                    dataset,
                    num_classes=self.num_classes,
                    ignore_value=self.ignore_value,
                    forward=self.forward,
                )
                for key in ("loss", "mean_iou", "pixel_accuracy"):
                    logs[f"val_{prefix}{key}"] = result[key]
            if self.baseline is not None and "val_source_mean_iou" in logs:
                logs["val_forgetting"] = self.baseline - logs["val_source_mean_iou"]

    return RunCheckpoint, EpochScalars, EpochValidation


def _lower_is_better(monitor):
    """Losses and the forgetting improve downwards; everything else upwards."""
    return monitor.endswith("loss") or monitor.endswith("forgetting")


def _save_model_atomic(model, path):
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --------------------------------------------------------------------------
# Distribution and precision
# --------------------------------------------------------------------------


def _cluster_spec():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        _fail(
            "strategy='multi-worker' needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}). Received: TF_CONFIG unset'
        )
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        _fail(f"TF_CONFIG is not valid ({e}). Received: TF_CONFIG={raw!r}")
    return cluster, task_type, index


def make_strategy(name):
    """``(strategy, is_chief)`` for ``"default"``, ``"mirrored"`` or
    ``"multi-worker"`` (MultiWorkerMirroredStrategy from ``TF_CONFIG``).

    The chief is the ``chief`` task, or worker 0 when the cluster names no
    chief.
    """
    import tensorflow as tf

    _check_choice("strategy", name, STRATEGIES)
    if name == "default":
        return tf.distribute.get_strategy(), True
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(), True
    cluster, task_type, index = _cluster_spec()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    is_chief = task_type == "chief" or (
        task_type == "worker" and index == 0 and "chief" not in cluster
    )
    return strategy, is_chief


@contextlib.contextmanager
def _precision(mode, verbose=1):
    """Set the global Keras dtype policy for the duration of a run."""
    import keras

    if mode in (None, "off", False):
        yield None
        return
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    policy = {
        "auto": "mixed_float16" if gpu else "mixed_bfloat16",
        "float16": "mixed_float16",
        "bfloat16": "mixed_bfloat16",
    }[mode]
    if not gpu:
        warnings.warn(
            f"mixed precision ({policy}) on a CPU is slower than float32 "
            "(measured: about 1.5x for bfloat16, 6x for float16); it pays off "
            "on GPUs.",
            stacklevel=3,
        )
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield policy
    finally:
        keras.config.set_dtype_policy(previous)


def _optimizer(learning_rate, policy):
    import keras

    optimizer = keras.optimizers.Adam(learning_rate)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _jit(cfg):
    return True if cfg.jit else "auto"


# --------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------


def load_model(path_or_model):
    """Load a ``.keras`` model (uncompiled); a ``keras.Model`` passes through.

    Raises:
        klseg.errors.ModelError: the file is missing or not a loadable
            Keras model.
    """
    import keras

    if isinstance(path_or_model, keras.Model):
        return path_or_model
    path = Path(path_or_model)
    if not path.exists():
        raise errors.ModelError(f"model file {path} does not exist.")
    if path.is_dir() or path.suffix != ".keras":
        raise errors.ModelError(
            f"model {path} is not a .keras file (klseg reads models saved with "
            "model.save('NAME.keras'); a SavedModel folder is for serving only)."
        )
    try:
        return klseg.load_model(path, compile=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.ModelError(f"cannot load model {path}: {first}") from None


def _klseg_model_info(model, path):
    from klseg import models

    try:
        return models.num_classes(model), models.size_multiple(model)
    except errors.ModelError:
        raise errors.ModelError(
            f"model {path} is not a klseg segmentation model (no ClassLogits / "
            "ImagePreprocessing layer); build it with klseg.models."
        ) from None


def _load_split(spec, cfg, *, require_masks=True, name="data", remap=True):
    from klseg import data

    del name  # the data module's messages name the folder or file
    return data.load_split(
        spec,
        ignore_value=cfg.ignore_value,
        class_map=getattr(cfg, "class_map", None) if remap else None,
        require_masks=require_masks,
    )


def _num_images(split):
    return getattr(split, "num_images", None)


# Decode and resize small sets once and keep them in memory (augmentation
# still runs every epoch); larger sets stream from disk.
_CACHE_BYTES = 256 * 2**20


def _cache(split, image_size):
    count = _num_images(split)
    return count is not None and count * image_size * image_size * 4 <= _CACHE_BYTES


def _distribute_options(dataset):
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def _check_image_size(image_size, multiple, what="image_size"):
    if image_size % multiple:
        lower = max(multiple, image_size // multiple * multiple)
        upper = lower + multiple if lower < image_size else lower
        _fail(
            f"{what} must be a multiple of the model's size multiple {multiple}; "
            f"the nearest valid sizes are {lower} and {upper}. "
            f"Received: {what}={image_size}"
        )


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _update_confusion(confusion, masks, logits, ignore_value):
    """Add a batch to a (C, C) confusion matrix (rows: truth); return the
    batch's summed cross-entropy and valid pixel count."""
    import numpy as np

    num_classes = confusion.shape[0]
    logits = np.asarray(logits, dtype=np.float64)
    masks = np.asarray(masks).astype(np.int64)
    valid = (masks != ignore_value) & (masks >= 0) & (masks < num_classes)
    labels = masks[valid]
    scores = logits[valid]
    predicted = scores.argmax(axis=-1)
    confusion += np.bincount(
        labels * num_classes + predicted, minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    picked = shifted[np.arange(len(labels)), labels]
    return float((log_norm - picked).sum()), int(len(labels))


def inference_function(model):
    """``images -> logits`` in inference mode, as a ``tf.function``.

    One trace of the forward pass (a fraction of a second for the models
    here) makes evaluating many batches several times faster than eager
    calls. On other Keras backends the model is called as it is.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return lambda images: model(images, training=False)
    import tensorflow as tf

    return tf.function(
        lambda images: model(images, training=False), reduce_retracing=True
    )


def evaluate_model(
    model,
    dataset,
    *,
    num_classes,
    ignore_value=255,
    class_names=None,
    forward=None,
):
    """Loss, mean IoU, pixel accuracy and per-class IoU of ``model`` on ``dataset``.

    The counts are exact over the whole dataset (not averaged per batch):

    - ``mean_iou``: mean over classes with a non-empty union (in the masks
      or the predictions) of ``TP / (TP + FP + FN)``, as
      ``klseg.metrics.MeanIoU``;
    - ``pixel_accuracy``: correct / valid pixels;
    - ``loss``: cross-entropy, mean over valid pixels (equal to
      ``klseg.losses.SparseKLDivergence`` without label smoothing).

    Args:
        model: a model mapping images to per-pixel logits.
        dataset: yields ``(images, masks)`` batches (``images`` may be a
            dict with ``"images"``).
        num_classes: number of classes of the model.
        ignore_value: mask value left out. Defaults to 255.
        class_names: names for ``per_class_iou``. Defaults to ``class_i``.
        forward: ``images -> logits``. Defaults to
            ``inference_function(model)``.

    Returns:
        ``{"loss", "mean_iou", "pixel_accuracy", "per_class_iou": {name:
        iou, or None for a class absent from masks and predictions},
        "num_images"}``.
    """
    import keras
    import numpy as np

    forward = forward or inference_function(model)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, valid, count = 0.0, 0, 0
    for images, masks in dataset:
        if isinstance(images, dict):
            images = images["images"]
        logits = keras.ops.convert_to_numpy(forward(images))
        batch_loss, batch_valid = _update_confusion(
            confusion, keras.ops.convert_to_numpy(masks), logits, ignore_value
        )
        loss_sum += batch_loss
        valid += batch_valid
        count += int(logits.shape[0])
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    present = union > 0
    names = (
        list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    )
    return {
        "loss": loss_sum / valid if valid else float("nan"),
        "mean_iou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / valid) if valid else float("nan"),
        "per_class_iou": {
            n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, iou)
        },
        "num_images": count,
    }


def _first_batch(dataset, n):
    import numpy as np

    images, masks = [], []
    for x, y in dataset:
        if isinstance(x, dict):
            x = x["images"]
        images.append(np.asarray(x))
        masks.append(np.asarray(y))
        if sum(len(i) for i in images) >= n:
            break
    return np.concatenate(images)[:n], np.concatenate(masks)[:n]


def _predict_classes(model, images):
    import keras
    import numpy as np

    logits = model(images, training=False)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.argmax(logits, axis=-1)))


# --------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------


def _model_kwargs(cfg, num_classes, class_names):
    kwargs = {"num_classes": num_classes, "input_shape": (None, None, 3)}
    if class_names:
        kwargs["class_names"] = list(class_names)
    if cfg.backbone:
        kwargs["backbone"] = cfg.backbone
    if cfg.model == "unet":
        if cfg.base_filters:
            kwargs["base_filters"] = cfg.base_filters
        if cfg.depth:
            kwargs["depth"] = cfg.depth
    return kwargs


def _resolve_classes(cfg, split):
    """Class count and names: options, else the data (class map, classes.json)."""
    seen = int(getattr(split, "num_classes_seen", 0) or 0)
    num_classes = cfg.num_classes or getattr(split, "num_classes", None) or seen
    if not num_classes:
        raise errors.DataError(
            f"cannot tell the number of classes from {cfg.data}; pass --num-classes."
        )
    if seen > num_classes:
        raise errors.DataError(
            f"masks in {cfg.data} hold class values up to {seen - 1}, but "
            f"num_classes={num_classes}. Raise --num-classes or remap the values "
            "with --class-map."
        )
    names = cfg.class_names or getattr(split, "class_names", None)
    if names is not None and len(names) != num_classes:
        names = None
    return int(num_classes), names


def _fit(
    *,
    run,
    checkpoint,
    model,
    save_model,
    train_ds,
    steps,
    validation,
    cfg,
    monitor,
    callbacks,
):
    """``model.fit`` with validation, checkpoints, history, logs and resume.

    ``validation`` is an ``EpochValidation`` callback; it runs first, so the
    metrics it adds to the epoch logs reach the checkpoint, the history and
    TensorBoard. ``callbacks`` run after klseg's own.
    """
    import keras

    RunCheckpoint, EpochScalars, _ = _callbacks_module()
    state = checkpoint[1] if checkpoint else None
    initial_epoch = int(state["epoch"]) if state else 0
    if state is not None:
        if state.get("monitor") and state["monitor"] != monitor:
            raise errors.RunError(
                f"the run in {run.path} picked its best model by "
                f"{state['monitor']!r}, not {monitor!r}; resume with the same "
                "--monitor."
            )
        _truncate_history(run.history, initial_epoch)
    elif run.history.exists():
        run.history.unlink()
    if initial_epoch >= cfg.epochs:
        _say(
            cfg.verbose,
            f"{run.path}: all {cfg.epochs} epochs are done; nothing to train "
            "(raise --epochs to train longer).",
        )
        return state
    if initial_epoch:
        _say(cfg.verbose, f"Resuming {run.path} after epoch {initial_epoch}.")
    all_callbacks = [
        validation,
        RunCheckpoint(run, monitor, save_model=save_model, state=state, seed=cfg.seed),
        keras.callbacks.CSVLogger(str(run.history), append=True),
        EpochScalars(run.logs),
        *list(callbacks or []),
    ]
    if cfg.strategy == "multi-worker":
        _multi_worker_fit_fixes(model, train_ds)
    model.fit(
        train_ds,
        epochs=cfg.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        callbacks=all_callbacks,
        shuffle=False,  # the datasets shuffle themselves, with the run's seed
        verbose=1 if cfg.verbose else 0,
    )
    latest = run.latest_checkpoint()
    return latest[1] if latest else state


def _multi_worker_fit_fixes(model, dataset):
    """Work around two failures of Keras 3 ``fit`` under MultiWorkerMirroredStrategy.

    Seen with Keras 3.15 and TensorFlow 2.21 (tensorflow/tensorflow#72388):

    1. ``fit`` builds the metrics from the first batch after averaging it
       with ``strategy.reduce``, which fails for an ``(images, masks)``
       tuple ("Attempt to convert a value (PerReplica ...) to a Tensor").
       Here the model is built from the dataset's ``element_spec``.
    2. Each step's logs are averaged with ``strategy.reduce("MEAN", v,
       axis=0)``, which fails for scalars ("Invalid reduction dimension 0").
       Here the train function returns the first local replica's values
       instead. The per-step values on the progress bar are then this
       worker's; the epoch's values (history, checkpoints) are read from the
       metrics at the end of the epoch, summed over every replica.
    """
    import tensorflow as tf
    from keras import tree

    strategy = model.distribute_strategy
    with strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    @tf.function(reduce_retracing=True)
    def one_step(data):
        outputs = strategy.run(model.train_step, args=(data,))
        return tree.map_structure(first, outputs)

    def train_function(iterator):
        return one_step(next(iterator))

    model.train_function = train_function


def train(cfg, *, callbacks=None):
    """Train a segmentation model from scratch into a run folder.

    Args:
        cfg: a :class:`TrainConfig`.
        callbacks: extra Keras callbacks, run after klseg's own.

    Returns:
        A :class:`RunResult`.

    Raises:
        klseg.errors.DataError: unreadable or inconsistent data.
        klseg.errors.RunError: the output folder cannot be used or resumed.
        klseg.errors.InvalidArgumentError: an option does not fit the data
            or model (for example an image size that is not a multiple of
            the model's size multiple).
    """
    started = time.time()
    strategy, is_chief = make_strategy(cfg.strategy)
    run, checkpoint = _open_run(cfg, is_chief=is_chief)
    try:
        return _train(cfg, strategy, run, checkpoint, callbacks, started)
    finally:
        if not is_chief:
            shutil.rmtree(run.path, ignore_errors=True)


def _train(cfg, strategy, run, checkpoint, callbacks, started):
    import keras

    from klseg import data, losses, metrics, models

    state = checkpoint[1] if checkpoint else None
    initial_epoch = int(state["epoch"]) if state else 0
    keras.utils.set_random_seed(cfg.seed)
    train_split = _load_split(cfg.data, cfg, name="data")
    val_split = _load_split(cfg.val_data, cfg, name="val_data")
    num_classes, class_names = _resolve_classes(cfg, train_split)
    with _precision(cfg.mixed_precision, cfg.verbose) as policy:
        with strategy.scope():
            model = models.build(
                cfg.model, **_model_kwargs(cfg, num_classes, class_names)
            )
            _check_image_size(cfg.image_size, models.size_multiple(model))
            optimizer = _optimizer(cfg.learning_rate or 1e-3, policy)
            model.compile(
                optimizer=optimizer,
                loss=losses.SparseKLDivergence(ignore_class=cfg.ignore_value),
                metrics=[
                    metrics.MeanIoU(num_classes, ignore_class=cfg.ignore_value),
                    metrics.PixelAccuracy(ignore_class=cfg.ignore_value),
                ],
                jit_compile=_jit(cfg),
            )
            if checkpoint:
                _restore_checkpoint(checkpoint[0], model, optimizer)
        n_train = _num_images(train_split) or cfg.batch_size
        steps = max(1, math.ceil(n_train / cfg.batch_size))
        train_ds = data.make_dataset(
            train_split,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            augment=cfg.augment,
            shuffle=True,
            seed=cfg.seed + initial_epoch,
            repeat=True,
            drop_remainder=True,
            ignore_value=cfg.ignore_value,
            cache=_cache(train_split, cfg.image_size),
        )
        val_ds = data.make_dataset(
            val_split,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            ignore_value=cfg.ignore_value,
            cache=_cache(val_split, cfg.image_size),
        )
        train_ds = _distribute_options(train_ds)
        val_ds = _distribute_options(val_ds)
        monitor = "val_mean_iou" if cfg.monitor == "auto" else cfg.monitor
        _say(
            cfg.verbose,
            f"Training {cfg.model} ({num_classes} classes) on {cfg.data}: "
            f"{n_train} images, {steps} steps/epoch, {cfg.epochs} epochs "
            f"-> {run.path}",
        )
        final_state = _fit(
            run=run,
            checkpoint=checkpoint,
            model=model,
            save_model=model,
            train_ds=train_ds,
            steps=steps,
            validation=_callbacks_module()[2](
                {"": val_ds},
                eval_model=model,
                num_classes=num_classes,
                ignore_value=cfg.ignore_value,
            ),
            cfg=cfg,
            monitor=monitor,
            callbacks=callbacks,
        )
    best = load_model(run.model) if run.model.exists() else model
    names = models.get_class_names(best)
    val_metrics = evaluate_model(
        best,
        val_ds,
        num_classes=num_classes,
        ignore_value=cfg.ignore_value,
        class_names=names,
    )
    result_metrics = {
        "val": val_metrics,
        "best_epoch": (final_state or {}).get("best_epoch"),
        "epochs": cfg.epochs,
        "monitor": monitor,
        "seconds": round(time.time() - started, 1),
    }
    write_json(run.metrics, result_metrics)
    _write_train_report(run, cfg, best, val_ds, names, val_metrics)
    return RunResult(
        output=run.path,
        model_path=run.model,
        metrics=result_metrics,
        best_epoch=result_metrics["best_epoch"],
        epochs=cfg.epochs,
    )


def _write_train_report(run, cfg, model, val_ds, names, val_metrics):
    from klseg import report

    sections = []
    if run.history.is_file():
        rows = report.read_history(run.history)
        if rows:
            curves = report.plot_history(rows, run.plots / "training_curves.png")
            sections.append(("Training curves", curves))
    images, masks = _first_batch(val_ds, 4)
    preds = _predict_classes(model, images)
    overlays = report.plot_overlays(
        images,
        preds,
        run.plots / "overlays.png",
        masks=masks,
        class_names=names,
        ignore_value=cfg.ignore_value,
    )
    table = report.markdown_table(
        ["class", "IoU (%)"],
        [
            (n, "absent" if v is None else round(100 * v, 1))
            for n, v in val_metrics["per_class_iou"].items()
        ],
    )
    summary = (
        f"Validation data `{cfg.val_data}`: mean IoU "
        f"**{_pct(val_metrics['mean_iou'])}**, pixel accuracy "
        f"{_pct(val_metrics['pixel_accuracy'])} "
        f"({val_metrics['num_images']} images at {cfg.image_size}px).\n\n{table}"
    )
    sections.insert(0, ("Result", summary))
    sections.append(("Predictions on validation images", overlays))
    sections.append(("Settings", "```yaml\n" + _yaml_dump(cfg.to_dict()) + "```"))
    report.write_report(
        run.report, title=f"Training run {run.path.name}", sections=sections
    )


# --------------------------------------------------------------------------
# evaluate / predict / export / synth
# --------------------------------------------------------------------------


def _run_image_size(model_path):
    """The training image size saved next to a run's model, if any."""
    if not isinstance(model_path, (str, Path)):
        return None
    config = Path(model_path).parent / "config.yaml"
    if config.is_file():
        with contextlib.suppress(Exception):
            size = _read_yaml(config).get("image_size")
            if isinstance(size, int) and size > 0:
                return size
    return None


def evaluate(cfg):
    """Evaluate a model on a labelled folder.

    Returns:
        ``{"model", "data", "image_size", "num_images", "mean_iou",
        "pixel_accuracy", "per_class_iou"}``; also written to ``cfg.output``
        when set.
    """
    from klseg import data, models

    model = load_model(cfg.model)
    num_classes, multiple = _klseg_model_info(model, cfg.model)
    image_size = cfg.image_size or _run_image_size(cfg.model) or 256
    _check_image_size(image_size, multiple)
    split = _load_split(cfg.data, cfg, name="data")
    seen = getattr(split, "num_classes_seen", None)
    if seen and int(seen) > num_classes:
        raise errors.ModelError(
            f"masks in {cfg.data} hold class values up to {int(seen) - 1}, but "
            f"the model predicts {num_classes} classes. Use --class-map to map "
            "the mask values to the model's classes."
        )
    dataset = data.make_dataset(
        split,
        batch_size=cfg.batch_size,
        image_size=image_size,
        ignore_value=cfg.ignore_value,
        cache=_cache(split, image_size),
    )
    result = evaluate_model(
        model,
        dataset,
        num_classes=num_classes,
        ignore_value=cfg.ignore_value,
        class_names=models.get_class_names(model),
    )
    result = {
        "model": str(cfg.model) if isinstance(cfg.model, (str, Path)) else model.name,
        "data": str(cfg.data),
        "image_size": image_size,
        **result,
    }
    if cfg.output:
        write_json(cfg.output, result)
    return result


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _image_files(folder):
    folder = Path(folder)
    if not folder.exists():
        raise errors.DataError(f"image folder {folder} does not exist.")
    if not folder.is_dir():
        raise errors.DataError(f"{folder} is not a folder of images.")
    if (folder / "images").is_dir():
        folder = folder / "images"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise errors.DataError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {folder}.")
    return files


def _read_image(path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise errors.DataError(f"cannot read image {path}: {e}") from None


def _write_png(path, array, palette=None):
    from PIL import Image

    path = Path(path)
    image = Image.fromarray(array)
    if palette is not None:  # index mask: values stay, colours for viewers
        flat = [int(c) for rgb in palette for c in rgb]
        image.putpalette(flat + [0] * (768 - len(flat)))
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def predict_image(model, image, *, multiple=None):
    """Class indices (H, W) for one uint8 image (H, W, 3) of any size.

    The image is padded with zeros at the bottom and right to the model's
    size multiple (as the SavedModel export does), the logits are cropped
    back to the image's size.
    """
    import numpy as np

    from klseg import models

    multiple = multiple or models.size_multiple(model)
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    # predict_on_batch runs Keras' compiled predict function (traced once per
    # input shape, with relaxed shapes on TensorFlow): about 3x faster than
    # an eager call of the model on a 2-core CPU.
    logits = np.asarray(model.predict_on_batch(padded[None]))
    return np.argmax(logits[0, :height, :width], axis=-1).astype(np.uint8)


def predict(cfg):
    """Predict masks (and colour overlays) for a folder of images.

    Writes ``OUTPUT/masks/NAME.png`` (palette PNG of class indices, readable
    as a mask folder) and, when ``cfg.overlay``, ``OUTPUT/overlays/NAME.png``.

    Returns:
        ``{"output", "num_images", "masks", "overlays"}``.
    """
    import keras
    import numpy as np

    from klseg import models, report

    files = _image_files(cfg.images)
    model = load_model(cfg.model)
    num_classes, multiple = _klseg_model_info(model, cfg.model)
    out = Path(cfg.output)
    masks_dir, overlay_dir = out / "masks", out / "overlays"
    if masks_dir.is_dir() and any(masks_dir.iterdir()) and not cfg.overwrite:
        raise errors.RunError(
            f"{masks_dir} already holds masks; pass --overwrite to replace them "
            "or choose another folder."
        )
    _check_writable(out)
    masks_dir.mkdir(exist_ok=True)
    if cfg.overlay:
        overlay_dir.mkdir(exist_ok=True)
    colors = report.palette(num_classes)
    bar = keras.utils.Progbar(len(files), unit_name="image") if cfg.verbose else None
    for i, path in enumerate(files):
        image = _read_image(path)
        if cfg.image_size:
            from PIL import Image

            image = np.asarray(
                Image.fromarray(image).resize(
                    (cfg.image_size, cfg.image_size), Image.BILINEAR
                )
            )
        classes = predict_image(model, image, multiple=multiple)
        _write_png(masks_dir / f"{path.stem}.png", classes, palette=colors)
        if cfg.overlay:
            blended = report.overlay(image, classes, colors, alpha=cfg.alpha)
            _write_png(overlay_dir / f"{path.stem}.png", blended)
        if bar is not None:
            bar.update(i + 1)
    names = models.get_class_names(model)
    write_json(out / "classes.json", {"class_names": names, "palette": colors.tolist()})
    return _PredictResult(
        out, len(files), masks_dir, overlay_dir if cfg.overlay else None
    )


@dataclasses.dataclass
class _PredictResult:
    output: Path
    num_images: int
    masks: Path
    overlays: Path | None

    def summary(self):
        text = f"Wrote {self.num_images} masks to {self.masks}"
        if self.overlays:
            text += f" and overlays to {self.overlays}"
        return text


@dataclasses.dataclass
class _PathResult:
    path: Path
    message: str

    def summary(self):
        return f"{self.message}: {self.path}"


def export(cfg):
    """Export a ``.keras`` model as a SavedModel (see :mod:`klseg.export`).

    Returns:
        An object with ``.path`` (the SavedModel folder).
    """
    from klseg import export as export_lib
    from klseg import models

    model = load_model(cfg.model)
    _klseg_model_info(model, cfg.model)
    out = Path(cfg.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise errors.RunError(
            f"{out} already exists; pass --overwrite to replace it or choose "
            "another folder."
        )
    _check_writable(out.parent if out.parent != Path("") else Path("."))
    path = export_lib.export_saved_model(
        model, out, class_names=models.get_class_names(model)
    )
    return _PathResult(Path(path), "SavedModel written")


def synth_data(cfg):
    """Write the built-in two-domain benchmark (:mod:`klseg.data.synthetic`)."""
    from klseg.data import synthetic

    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise errors.RunError(f"output {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise errors.RunError(
            f"output folder {out} is not empty; pass --overwrite or choose another."
        )
    _check_writable(out.parent if str(out.parent) else Path("."))
    kwargs = {
        "image_size": cfg.image_size,
        "num_train": cfg.num_train,
        "num_val": cfg.num_val,
        "num_unlabeled": cfg.num_unlabeled,
        "seed": cfg.seed,
        "overwrite": cfg.overwrite,
    }
    if cfg.num_target_train is not None:
        kwargs["num_target_train"] = cfg.num_target_train
    path = synthetic.write_benchmark(out, **kwargs)
    return _PathResult(Path(path), "Benchmark written")


# --------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------


def _retype_config(config, policy):
    """Give every layer config (but the float32 head and inputs) ``policy``."""
    if isinstance(config, dict):
        if config.get("class_name") in ("ClassLogits", "InputLayer"):
            return
        inner = config.get("config")
        if isinstance(inner, dict) and isinstance(inner.get("dtype"), dict):
            dtype = inner["dtype"]
            if dtype.get("class_name") == "DTypePolicy":
                inner["dtype"] = {
                    **dtype,
                    "config": {**dtype.get("config", {}), "name": policy},
                }
        for value in config.values():
            _retype_config(value, policy)
    elif isinstance(config, list):
        for value in config:
            _retype_config(value, policy)


def make_student(source, *, policy=None):
    """A trainable copy of ``source`` (same weights), in ``policy`` if given.

    A saved model keeps the dtype policy it was built with; under mixed
    precision the copy's layers are rebuilt in the mixed policy (the logits
    head stays float32).
    """
    import keras

    if policy is None:
        student = keras.models.clone_model(source)
    else:
        config = keras.saving.serialize_keras_object(source)
        _retype_config(config, policy)
        student = keras.saving.deserialize_keras_object(config)
    student.set_weights(source.get_weights())
    student.trainable = True
    return student


def _resolve_kl_inputs(cfg):
    if cfg.kl_inputs != "auto":
        return cfg.kl_inputs
    return "source" if cfg.source_images else "target"


def _mix_unlabeled(labeled, unlabeled, batch_size, n_labeled, n_unlabeled, seed):
    """One stream of batches drawing images from both sets in proportion."""
    import tensorflow as tf

    total = n_labeled + n_unlabeled
    mixed = tf.data.Dataset.sample_from_datasets(
        [labeled.unbatch(), unlabeled.unbatch()],
        weights=[n_labeled / total, n_unlabeled / total],
        seed=seed,
    )
    return mixed.batch(batch_size, drop_remainder=True).prefetch(2)


def _stored_maps(source, split, image_size, verbose):
    from klseg import data, finetune

    images, _ = data.load_arrays(split, image_size)
    return {
        "source_probs": finetune.store_source_predictions(
            source, images, verbose=verbose
        )
    }


def _domain_metrics(model, datasets, num_classes, ignore_value, names, forward=None):
    return {
        domain: evaluate_model(
            model,
            ds,
            num_classes=num_classes,
            ignore_value=ignore_value,
            class_names=names,
            forward=forward,
        )
        for domain, ds in datasets.items()
        if ds is not None
    }


def finetune(cfg, *, callbacks=None):
    """Fine-tune a source model on a target domain with the KL term.

    One KL weight writes one run folder. Several weights (``kl_weight=(0,
    0.1, 0.3, 1)``) write ``OUTPUT/kl_W/`` per weight, ``OUTPUT/tradeoff.png``
    (source vs target mIoU), ``OUTPUT/metrics.json`` and
    ``OUTPUT/report.md``; with ``resume`` the finished weights are kept and
    the interrupted one continues.

    Args:
        cfg: a :class:`FinetuneConfig`.
        callbacks: extra Keras callbacks (each run).

    Returns:
        A :class:`RunResult`, or a :class:`SweepResult` for several weights.

    Raises:
        klseg.errors.ModelError: the source model is missing, not a klseg
            segmentation model, or predicts fewer classes than the masks
            hold.
        klseg.errors.DataError, klseg.errors.RunError: as for :func:`train`.
    """
    strategy, is_chief = make_strategy(cfg.strategy)
    if cfg.is_sweep:
        return _sweep(cfg, strategy, is_chief, callbacks)
    return _finetune_run(cfg, strategy, is_chief, callbacks)


def _finetune_run(cfg, strategy, is_chief, callbacks, baseline=None):
    started = time.time()
    run, checkpoint = _open_run(cfg, is_chief=is_chief)
    try:
        return _finetune(cfg, strategy, run, checkpoint, callbacks, baseline, started)
    finally:
        if not is_chief:
            shutil.rmtree(run.path, ignore_errors=True)


def _finetune_inputs(cfg):
    """Load and check every split before any model work."""
    splits = {
        "data": _load_split(cfg.data, cfg, name="data"),
        "val_data": _load_split(cfg.val_data, cfg, name="val_data"),
    }
    if cfg.unlabeled_data:
        splits["unlabeled_data"] = _load_split(
            cfg.unlabeled_data, cfg, require_masks=False, name="unlabeled_data"
        )
    if cfg.source_val_data:
        # With a class change the source-domain masks hold the source
        # model's classes; class_map (mask values) describes the target data.
        splits["source_val_data"] = _load_split(
            cfg.source_val_data,
            cfg,
            name="source_val_data",
            remap=not _changes_classes(cfg),
        )
    if cfg.source_images:
        splits["source_images"] = _load_split(
            cfg.source_images, cfg, require_masks=False, name="source_images"
        )
    return splits


def _changes_classes(cfg):
    return bool(cfg.class_names or cfg.source_class_map)


def _read_source_class_map(path):
    """``(merge, drop)`` from a ``{"merge": {...}, "drop": [...]}`` JSON file."""
    path = Path(path)
    if not path.is_file():
        raise errors.DataError(f"{path}: source class map file not found.")
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.DataError(
            f"{path}: source class map is not valid JSON ({e})."
        ) from None
    if not isinstance(content, dict) or set(content) - {"merge", "drop"}:
        got = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise errors.DataError(
            f'{path}: a source class map is an object {{"merge": {{source name: '
            'target name}, "drop": [source names]}. Received keys: '
            f"{got}"
        )
    merge, drop = content.get("merge", {}), content.get("drop", [])
    if not isinstance(merge, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in merge.items()
    ):
        raise errors.DataError(
            f'{path}: "merge" must map source class names to target class names. '
            f"Received: {merge!r}"
        )
    if not isinstance(drop, list) or not all(isinstance(n, str) for n in drop):
        raise errors.DataError(
            f'{path}: "drop" must be a list of source class names. Received: {drop!r}'
        )
    return merge, drop


def _target_classes(cfg, splits, source_names):
    """``(target class names, class_map or None)`` of a fine-tuning run."""
    from klseg import finetune as ft

    if not _changes_classes(cfg):
        return list(source_names), None
    names = list(cfg.class_names or getattr(splits["data"], "class_names", None) or [])
    if not names:
        _fail(
            f"source_class_map ({cfg.source_class_map}) needs the target classes: "
            "give class_names (--class-names), or a class map with class_names "
            f"or a classes.json for {cfg.data}."
        )
    merge, drop = ({}, [])
    if cfg.source_class_map:
        merge, drop = _read_source_class_map(cfg.source_class_map)
    if names == list(source_names) and not merge and not drop:
        return names, None
    try:
        class_map = ft.make_class_map(source_names, names, merge=merge, drop=drop)
    except errors.InvalidArgumentError as e:
        where = cfg.source_class_map or "no source_class_map given"
        raise errors.RunError(
            f"cannot map the classes of {cfg.source} onto the target classes "
            f"{names} ({where}): {e}"
        ) from None
    return names, class_map


def _label_lut(class_map, ignore_value):
    """A 256-entry table mapping source mask values to target classes."""
    import numpy as np

    from klseg import finetune as ft

    return ft.map_labels(np.arange(256), class_map, ignore_class=ignore_value)


def _mapped_forward(source, class_map, num_classes):
    """``images -> target-class log-probabilities`` of the source model."""
    import keras

    from klseg import finetune as ft

    base = inference_function(source)

    def forward(images):
        logits = keras.ops.convert_to_tensor(base(images), "float32")
        log_probs = keras.ops.log_softmax(logits, axis=-1)
        return ft.map_log_probs(log_probs, class_map, num_classes)

    return forward


def _check_classes(splits, cfg, num_classes, num_source_classes=None):
    for key in ("data", "val_data", "source_val_data"):
        split = splits.get(key)
        seen = getattr(split, "num_classes_seen", None) if split else None
        if key == "source_val_data" and num_source_classes is not None:
            if seen and int(seen) > num_source_classes:
                raise errors.ModelError(
                    f"masks in {cfg.source_val_data} hold class values up to "
                    f"{int(seen) - 1}, but the source model {cfg.source} predicts "
                    f"{num_source_classes} classes (source-domain masks are read "
                    "in the source model's classes when the classes change)."
                )
            continue
        if seen and int(seen) > num_classes:
            raise errors.ModelError(
                f"the source model {cfg.source} predicts {num_classes} classes, "
                f"but masks in {getattr(cfg, key)} hold class values up to "
                f"{int(seen) - 1}. Fine-tuning needs the source model's classes: "
                "map the mask values with --class-map, or fine-tune a source "
                "model trained with these classes."
            )


def _finetune(cfg, strategy, run, checkpoint, callbacks, baseline, started):
    import keras

    from klseg import data, losses, metrics, models
    from klseg import finetune as ft

    state = checkpoint[1] if checkpoint else None
    initial_epoch = int(state["epoch"]) if state else 0
    keras.utils.set_random_seed(cfg.seed)
    splits = _finetune_inputs(cfg)
    kl_inputs = _resolve_kl_inputs(cfg)
    kl_weight = cfg.kl_weight[0] if cfg.kl_weight else ft.DEFAULT_KL_WEIGHT
    if cfg.unlabeled_data and (kl_inputs == "source" or kl_weight == 0):
        _say(
            cfg.verbose,
            f"Note: unlabeled_data ({cfg.unlabeled_data}) is not used: unlabelled "
            "target images only feed the KL term on target images "
            f"(kl_inputs='target' or 'both'; here kl_inputs={kl_inputs!r}, "
            f"kl_weight={kl_weight:g}).",
        )
    temperature = cfg.temperature or ft.DEFAULT_TEMPERATURE
    batch = cfg.batch_size
    with _precision(cfg.mixed_precision, cfg.verbose) as policy:
        with strategy.scope():
            source = load_model(cfg.source)
            num_source_classes, multiple = _klseg_model_info(source, cfg.source)
            _check_image_size(cfg.image_size, multiple)
            names, class_map = _target_classes(
                cfg, splits, models.get_class_names(source)
            )
            num_classes = len(names)
            _check_classes(
                splits,
                cfg,
                num_classes,
                num_source_classes if _changes_classes(cfg) else None,
            )
            student = make_student(source, policy=policy)
            if class_map is not None:
                student = models.with_classes(student, names)
            model = ft.KLRegularizedModel(
                student,
                source,
                kl_weight=kl_weight,
                temperature=temperature,
                kl_inputs=kl_inputs,
                class_map=class_map,
                student_bn=cfg.student_bn,
                ignore_class=cfg.ignore_value,
            )
            optimizer = _optimizer(cfg.learning_rate or 1e-4, policy)
            model.compile(
                optimizer=optimizer,
                loss=losses.SparseKLDivergence(ignore_class=cfg.ignore_value),
                metrics=[
                    metrics.MeanIoU(
                        num_classes,
                        ignore_class=cfg.ignore_value,
                        name="target_mean_iou",
                    ),
                ],
                jit_compile=_jit(cfg),
            )
            if checkpoint:
                _restore_checkpoint(checkpoint[0], model, optimizer)
        stored = cfg.source_predictions == "stored" and kl_weight > 0

        def train_stream(split, seed, maps=None):
            return data.make_dataset(
                split,
                batch_size=batch,
                image_size=cfg.image_size,
                augment=cfg.augment,
                shuffle=True,
                seed=seed,
                repeat=True,
                drop_remainder=True,
                ignore_value=cfg.ignore_value,
                extra_maps=maps,
                cache=_cache(split, cfg.image_size),
            )

        seed = cfg.seed + initial_epoch
        n_labeled = _num_images(splits["data"]) or batch
        n_total = n_labeled
        uses_target = kl_inputs in ("target", "both") and kl_weight > 0

        def maps_for(key):
            if not stored:
                return None
            return _stored_maps(source, splits[key], cfg.image_size, cfg.verbose)

        train_ds = train_stream(
            splits["data"], seed, maps_for("data") if uses_target else None
        )
        # Unlabelled target images only feed the KL term on target images.
        if "unlabeled_data" in splits and uses_target:
            n_unlabeled = _num_images(splits["unlabeled_data"]) or batch
            unlabeled_ds = train_stream(
                splits["unlabeled_data"], seed + 1, maps_for("unlabeled_data")
            )
            train_ds = _mix_unlabeled(
                train_ds, unlabeled_ds, batch, n_labeled, n_unlabeled, seed
            )
            n_total += n_unlabeled
        if kl_weight > 0 and kl_inputs in ("source", "both"):
            source_ds = train_stream(
                splits["source_images"], seed + 2, maps_for("source_images")
            )
            import tensorflow as tf

            train_ds = tf.data.Dataset.zip((train_ds, source_ds)).map(ft.pair_batches)
        steps = max(1, math.ceil(n_total / batch))

        def eval_stream(split):
            if split is None:
                return None
            return _distribute_options(
                data.make_dataset(
                    split,
                    batch_size=batch,
                    image_size=cfg.image_size,
                    ignore_value=cfg.ignore_value,
                    cache=_cache(split, cfg.image_size),
                )
            )

        val_ds = eval_stream(splits["val_data"])
        source_val_ds = eval_stream(splits.get("source_val_data"))
        source_forward = None
        if class_map is not None:
            # Score in the target classes: source-domain masks mapped, the
            # source model's probabilities merged / dropped as the KL sees them.
            source_forward = _mapped_forward(source, class_map, num_classes)
            if source_val_ds is not None:
                import tensorflow as tf

                lut = tf.constant(_label_lut(class_map, cfg.ignore_value), tf.int32)
                source_val_ds = source_val_ds.map(
                    lambda images, masks: (images, tf.gather(lut, masks))
                )
        domains = {"target": val_ds, "source": source_val_ds}
        if baseline is None:
            baseline = _domain_metrics(
                source,
                domains,
                num_classes,
                cfg.ignore_value,
                names,
                forward=source_forward,
            )
        validation = _callbacks_module()[2](
            {"target_": val_ds, "source_": source_val_ds},
            eval_model=student,
            num_classes=num_classes,
            ignore_value=cfg.ignore_value,
            baseline=(baseline.get("source") or {}).get("mean_iou"),
        )
        monitor = "val_target_mean_iou" if cfg.monitor == "auto" else cfg.monitor
        _say(
            cfg.verbose,
            f"Fine-tuning {cfg.source} on {cfg.data}: kl_weight={kl_weight:g}, "
            f"temperature={temperature:g}, kl_inputs={kl_inputs}, "
            f"{steps} steps/epoch, {cfg.epochs} epochs -> {run.path}",
        )
        final_state = _fit(
            run=run,
            checkpoint=checkpoint,
            model=model,
            save_model=student,
            train_ds=_distribute_options(train_ds),
            steps=steps,
            validation=validation,
            cfg=cfg,
            monitor=monitor,
            callbacks=callbacks,
        )
    best = load_model(run.model) if run.model.exists() else student
    after = _domain_metrics(best, domains, num_classes, cfg.ignore_value, names)
    result_metrics = {
        **after,
        "source_model": baseline,
        "kl_weight": kl_weight,
        "temperature": temperature,
        "kl_inputs": kl_inputs,
        "class_map": _class_map_names(models.get_class_names(source), names, class_map),
        "best_epoch": (final_state or {}).get("best_epoch"),
        "epochs": cfg.epochs,
        "monitor": monitor,
        "seconds": round(time.time() - started, 1),
    }
    if "source" in after and "source" in baseline:
        result_metrics["forgetting"] = (
            baseline["source"]["mean_iou"] - after["source"]["mean_iou"]
        )
    write_json(run.metrics, result_metrics)
    _write_finetune_report(run, cfg, best, source, domains, names, result_metrics)
    return RunResult(
        output=run.path,
        model_path=run.model,
        metrics=result_metrics,
        best_epoch=result_metrics["best_epoch"],
        epochs=cfg.epochs,
    )


def _class_map_names(source_names, target_names, class_map):
    """``{source name: target name or None}``, or None without a class change."""
    if class_map is None:
        return None
    return {
        s: (None if t is None or t < 0 else target_names[t])
        for s, t in zip(source_names, class_map)
    }


def _miou_table(metrics):
    return {
        name: {d: m["mean_iou"] for d, m in block.items() if isinstance(m, dict)}
        for name, block in metrics.items()
    }


def _write_finetune_report(run, cfg, model, source, domains, names, metrics):
    from klseg import report

    sections = []
    label = f"fine-tuned (kl_weight={metrics['kl_weight']:g})"
    table = {
        "source model": {d: m["mean_iou"] for d, m in metrics["source_model"].items()},
        label: {
            d: metrics[d]["mean_iou"] for d in ("source", "target") if d in metrics
        },
    }
    rows = [
        (name, _pct(row.get("source")), _pct(row.get("target")))
        for name, row in table.items()
    ]
    text = report.markdown_table(["model", "source mIoU", "target mIoU"], rows)
    if "forgetting" in metrics:
        text += (
            f"\n\nForgetting (source mIoU lost): "
            f"{100 * metrics['forgetting']:.1f} points."
        )
    sections.append(("Result", text))
    bars = report.plot_domain_miou(table, run.plots / "domains.png")
    sections.append(("Mean IoU before and after", bars))
    if run.history.is_file():
        rows = report.read_history(run.history)
        if rows:
            sections.append(
                (
                    "Training curves",
                    report.plot_history(rows, run.plots / "training_curves.png"),
                )
            )
    for domain, ds in domains.items():
        if ds is None:
            continue
        images, masks = _first_batch(ds, 3)
        path = report.plot_overlays(
            images,
            _predict_classes(model, images),
            run.plots / f"overlays_{domain}.png",
            masks=masks,
            class_names=names,
            ignore_value=cfg.ignore_value,
            title=f"{domain}-domain validation images",
        )
        sections.append((f"Predictions on {domain}-domain images", path))
    sections.append(("Settings", "```yaml\n" + _yaml_dump(cfg.to_dict()) + "```"))
    report.write_report(
        run.report, title=f"Fine-tuning run {run.path.name}", sections=sections
    )


def _weight_folder(weight):
    return f"kl_{weight:g}"


def _sweep(cfg, strategy, is_chief, callbacks):
    from klseg import report

    started = time.time()
    top = RunFolder(cfg.output) if is_chief else None
    if is_chief:
        _open_sweep(cfg, top)
    results, baseline = {}, None
    for weight in cfg.kl_weight:
        sub = Path(cfg.output) / _weight_folder(weight)
        one = dataclasses.replace(
            cfg,
            kl_weight=(weight,),
            output=str(sub),
            resume=cfg.resume and (sub / "config.yaml").is_file(),
            overwrite=False,
        )
        done = _finished_run(sub, cfg.epochs) if cfg.resume else None
        if done is not None:
            _say(cfg.verbose, f"kl_weight={weight:g}: finished earlier in {sub}.")
            result = done
        else:
            _say(cfg.verbose, f"\n=== kl_weight={weight:g} ({sub}) ===")
            result = _finetune_run(
                one, strategy, is_chief, callbacks, baseline=baseline
            )
        baseline = result.metrics.get("source_model")
        results[weight] = result
    table = [
        {
            "kl_weight": w,
            "source": (r.metrics.get("source") or {}).get("mean_iou"),
            "target": (r.metrics.get("target") or {}).get("mean_iou"),
        }
        for w, r in results.items()
    ]
    if not is_chief:
        return SweepResult(Path(cfg.output), results, table, None)
    reference = None
    if baseline and "source" in baseline and "target" in baseline:
        reference = {d: baseline[d]["mean_iou"] for d in ("source", "target")}
    plot = None
    if all(row["source"] is not None for row in table):
        plot = report.plot_tradeoff(
            table, top.path / "tradeoff.png", reference=reference
        )
    write_json(
        top.metrics,
        {
            "runs": {_weight_folder(row["kl_weight"]): row for row in table},
            "source_model": baseline,
            "seconds": round(time.time() - started, 1),
        },
    )
    rows = [
        (
            f"[{row['kl_weight']:g}]({_weight_folder(row['kl_weight'])}/report.md)",
            _pct(row["source"]),
            _pct(row["target"]),
        )
        for row in table
    ]
    if reference:
        rows.insert(
            0, ("source model", _pct(reference["source"]), _pct(reference["target"]))
        )
    sections = [
        (
            "Source and target mean IoU per KL weight",
            report.markdown_table(["kl_weight", "source mIoU", "target mIoU"], rows),
        ),
    ]
    if plot is None:
        sections.append(
            (
                "Trade-off plot",
                "Not drawn: give --source-val-data to measure the source-domain mIoU.",
            )
        )
    else:
        sections.append(("Trade-off", plot))
    report.write_report(top.report, title="KL-weight sweep", sections=sections)
    return SweepResult(top.path, results, table, plot)


def _open_sweep(cfg, top):
    current = cfg.to_dict()
    if cfg.resume:
        if not top.config.is_file():
            raise errors.RunError(
                f"nothing to resume in {top.path}: it holds no klseg sweep."
            )
        diffs = _config_differences(_read_yaml(top.config), current)
        if diffs:
            raise errors.RunError(
                f"cannot resume {top.path} with different settings: " + "; ".join(diffs)
            )
    elif top.path.is_dir() and any(top.path.iterdir()):
        allowed = cfg.overwrite or _abandoned_sweep(top)
        _replace_folder(top.path, top.config, allowed, "sweep")
    _check_writable(top.path)
    atomic_write_text(top.config, _yaml_dump(current))


def _abandoned_sweep(top):
    """A sweep folder none of whose runs finished an epoch."""
    if not top.config.is_file() or top.metrics.exists():
        return False
    subs = [p for p in top.path.iterdir() if p.is_dir() and p.name.startswith("kl_")]
    return all(_abandoned(RunFolder(p)) for p in subs)


def _finished_run(path, epochs):
    """A :class:`RunResult` for a run folder that finished ``epochs``."""
    run = RunFolder(path)
    if not run.metrics.is_file() or not run.model.is_file():
        return None
    latest = run.latest_checkpoint()
    if latest is None or int(latest[1].get("epoch", 0)) < epochs:
        return None
    metrics = json.loads(run.metrics.read_text())
    if metrics.get("epochs") != epochs:
        return None
    return RunResult(run.path, run.model, metrics, metrics.get("best_epoch"), epochs)


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------

#: Demo settings. "full" is the README's demo (minutes on 2 CPU cores);
#: "quick" checks the set-up in seconds (its numbers mean nothing).
DEMO_PRESETS = {
    "full": {
        "image_size": 64,
        "num_train": 192,
        "num_target_train": 32,
        "num_val": 48,
        "num_unlabeled": 128,
        "base_filters": 16,
        "depth": 3,
        "batch_size": 16,
        "source_epochs": 12,
        "source_learning_rate": 2e-3,
        "finetune_batch_size": 8,
        "finetune_epochs": 20,
        "finetune_learning_rate": 1e-3,
        "kl_weight": 0.3,
        "temperature": 2.0,
    },
    "quick": {
        "image_size": 32,
        "num_train": 8,
        "num_target_train": 4,
        "num_val": 4,
        "num_unlabeled": 8,
        "base_filters": 4,
        "depth": 2,
        "batch_size": 4,
        "source_epochs": 1,
        "source_learning_rate": 2e-3,
        "finetune_batch_size": 4,
        "finetune_epochs": 1,
        "finetune_learning_rate": 1e-3,
        "kl_weight": 0.3,
        "temperature": 2.0,
    },
}


@dataclasses.dataclass
class DemoConfig:
    """Options of :func:`demo` (``klseg demo``).

    Attributes:
        output: folder for the data, the runs, the report and the export.
        quick: the tiny preset (seconds; checks the set-up only).
        image_size, num_train, source_epochs, finetune_epochs, kl_weight:
            override the preset (see ``DEMO_PRESETS``).
        seed: seed of the data and the training runs.
        overwrite: replace an earlier demo in ``output``.
        verbose: 0 for no progress bars.
    """

    output: str = "klseg-demo"
    quick: bool = False
    image_size: int | None = None
    num_train: int | None = None
    source_epochs: int | None = None
    finetune_epochs: int | None = None
    kl_weight: float | None = None
    seed: int = 0
    overwrite: bool = False
    verbose: int = 1

    def __post_init__(self):
        if not self.output:
            _fail("demo needs output. Received: output=None")
        for name in ("image_size", "num_train", "source_epochs", "finetune_epochs"):
            _check_positive(name, getattr(self, name), allow_none=True)
        if self.kl_weight is not None and not self.kl_weight >= 0:
            _fail(f"kl_weight must be >= 0. Received: kl_weight={self.kl_weight}")

    def settings(self):
        """The preset with this config's overrides applied."""
        settings = dict(DEMO_PRESETS["quick" if self.quick else "full"])
        for name in (
            "image_size",
            "num_train",
            "source_epochs",
            "finetune_epochs",
            "kl_weight",
        ):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        return settings


def _open_demo(cfg):
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise errors.RunError(f"output {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise errors.RunError(
                f"output folder {out} is not empty; pass --overwrite to replace "
                "an earlier demo, or choose another folder."
            )
        if not (out / "demo.json").is_file():
            raise errors.RunError(
                f"refusing to overwrite {out}: it is not empty and holds no klseg "
                "demo. Choose another folder."
            )
        shutil.rmtree(out)
    _check_writable(out)
    return out


def demo(cfg):
    """Train a source model, fine-tune it without and with the KL term.

    On the built-in two-domain benchmark (:mod:`klseg.data.synthetic`):

    1. write the data to ``OUTPUT/data``;
    2. train a U-Net on the source domain (``OUTPUT/source``);
    3. fine-tune it on the few labelled target images with ``kl_weight=0``
       (``OUTPUT/finetune-plain``) and with the KL term on unlabelled
       source-domain images (``OUTPUT/finetune-kl``);
    4. write both domains' validation mIoU of the three models to
       ``OUTPUT/metrics.json`` and ``OUTPUT/report.md`` (with plots), and the
       KL model as a SavedModel to ``OUTPUT/export``.

    Returns:
        A :class:`DemoResult`; its ``summary()`` is the printed table.
    """
    from klseg.data import synthetic

    started = time.time()
    settings = cfg.settings()
    out = _open_demo(cfg)
    write_json(out / "demo.json", {"settings": settings, "seed": cfg.seed})
    say = functools.partial(_say, cfg.verbose)
    data_dir = out / "data"
    say(f"[1/5] Writing the two-domain benchmark to {data_dir}")
    synthetic.write_benchmark(
        data_dir,
        image_size=settings["image_size"],
        num_train=settings["num_train"],
        num_val=settings["num_val"],
        num_unlabeled=settings["num_unlabeled"],
        num_target_train=settings["num_target_train"],
        seed=cfg.seed,
    )
    common = {
        "image_size": settings["image_size"],
        "batch_size": settings["batch_size"],
        "augment": "light",
        "seed": cfg.seed,
        "verbose": cfg.verbose,
    }
    say("[2/5] Training the source model on the source domain")
    source_run = train(
        TrainConfig(
            data=str(data_dir / "source" / "train"),
            val_data=str(data_dir / "source" / "val"),
            output=str(out / "source"),
            model="unet",
            base_filters=settings["base_filters"],
            depth=settings["depth"],
            epochs=settings["source_epochs"],
            learning_rate=settings["source_learning_rate"],
            **common,
        )
    )
    tuning = {
        "source": str(source_run.model_path),
        "data": str(data_dir / "target" / "train"),
        "val_data": str(data_dir / "target" / "val"),
        "source_val_data": str(data_dir / "source" / "val"),
        "epochs": settings["finetune_epochs"],
        "learning_rate": settings["finetune_learning_rate"],
        "temperature": settings["temperature"],
        **{**common, "batch_size": settings["finetune_batch_size"]},
    }
    strategy, _ = make_strategy("default")
    say("[3/5] Fine-tuning on the target domain without the KL term")
    plain = _finetune_run(
        FinetuneConfig(output=str(out / "finetune-plain"), kl_weight=(0.0,), **tuning),
        strategy,
        True,
        None,
    )
    weight = settings["kl_weight"]
    say(f"[4/5] Fine-tuning with the KL term (kl_weight={weight:g}, on source images)")
    kl = _finetune_run(
        FinetuneConfig(
            output=str(out / "finetune-kl"),
            kl_weight=(weight,),
            kl_inputs="source",
            source_images=str(data_dir / "source" / "unlabeled"),
            **tuning,
        ),
        strategy,
        True,
        None,
        baseline=plain.metrics["source_model"],
    )
    say("[5/5] Writing the report and the SavedModel export")
    baseline = plain.metrics["source_model"]
    table = {
        "source model": {d: baseline[d]["mean_iou"] for d in ("source", "target")},
        "plain fine-tuning": {
            d: plain.metrics[d]["mean_iou"] for d in ("source", "target")
        },
        f"KL fine-tuning (w={weight:g})": {
            d: kl.metrics[d]["mean_iou"] for d in ("source", "target")
        },
    }
    export_path = export(
        ExportConfig(model=str(kl.model_path), output=str(out / "export"))
    ).path
    seconds = time.time() - started
    write_json(
        out / "metrics.json",
        {
            "mean_iou": table,
            "forgetting": {
                "plain fine-tuning": plain.metrics.get("forgetting"),
                "KL fine-tuning": kl.metrics.get("forgetting"),
            },
            "settings": settings,
            "seconds": round(seconds, 1),
        },
    )
    _write_demo_report(
        out, table, settings, seconds, [source_run, plain, kl], data_dir, weight
    )
    return DemoResult(out, table, seconds, export_path)


def _demo_overlays(out, runs_, data_dir, image_size, weight):
    """Validation images of both domains with each model's predictions."""
    import numpy as np

    from klseg import data, models, report

    labelled = {}
    for domain in ("target", "source"):
        images, masks = data.load_arrays(
            str(data_dir / domain / "val"), image_size, require_masks=True
        )
        labelled[domain] = (images[:2], masks[:2])
    images = np.concatenate([labelled[d][0] for d in labelled])
    masks = np.concatenate([labelled[d][1] for d in labelled])
    titles = ("source model", "plain fine-tuning", f"KL (w={weight:g})")
    predictions = {}
    for title, run in zip(titles, runs_):
        model = load_model(run.model_path)
        predictions[title] = _predict_classes(model, images)
    return report.plot_overlays(
        images,
        predictions,
        out / "plots" / "overlays.png",
        masks=masks,
        class_names=models.get_class_names(model),
        title="Rows 1-2: target-domain images; rows 3-4: source-domain images",
    )


def _write_demo_report(out, table, settings, seconds, runs_, data_dir, weight):
    from klseg import report

    rows = [
        (name, _pct(row["source"]), _pct(row["target"])) for name, row in table.items()
    ]
    text = report.markdown_table(["model", "source val mIoU", "target val mIoU"], rows)
    text += (
        f"\n\nWall time {seconds / 60:.1f} min. Images {settings['image_size']}px; "
        f"{settings['num_train']} labelled source images, "
        f"{settings['num_target_train']} labelled target images, "
        f"{settings['num_unlabeled']} unlabelled source images for the KL term, "
        f"{settings['num_val']} validation images per domain."
    )
    bars = report.plot_domain_miou(table, out / "plots" / "domains.png")
    overlays = _demo_overlays(out, runs_, data_dir, settings["image_size"], weight)
    links = "\n".join(f"- [{r.output.name}]({r.output.name}/report.md)" for r in runs_)
    report.write_report(
        out / "report.md",
        title="klseg demo: fine-tuning with and without the KL term",
        sections=[
            ("Validation mean IoU per domain", text),
            ("Before and after", bars),
            ("Predictions", overlays),
            ("Runs", links),
            ("SavedModel", "`export/` (serve with `tf.saved_model.load`)."),
        ],
    )
