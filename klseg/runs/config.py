"""Config objects of the jobs, their choices and defaults.

Standard library only: the command line reads its choices and defaults from
here (and from :mod:`klseg.registry`) without importing Keras or TensorFlow.
Every field is checked when the object is made: a value of the wrong type,
a non-finite or out-of-range number or an unknown choice raises
``klseg.errors.InvalidArgumentError`` naming the field and the value.
"""

import dataclasses
import math

from klseg import inference
from klseg.export import FORMATS as EXPORT_FORMATS
from klseg.export import QUANTIZATIONS
from klseg.registry import BACKBONES, MODELS
from klseg.runs.checks import (
    check_choice,
    check_crop_fits,
    check_flag,
    check_int,
    check_model_source,
    check_names,
    check_number,
    check_path,
    check_positive,
    check_size,
    fail,
)

__all__ = [
    "AUGMENT",
    "BACKBONES",
    "DEMO_PRESETS",
    "EXPORT_FORMATS",
    "KL_INPUTS",
    "MIXED_PRECISION",
    "MODELS",
    "QUANTIZATIONS",
    "SOURCE_PREDICTIONS",
    "STRATEGIES",
    "STUDENT_BN",
    "DemoConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FinetuneConfig",
    "PredictConfig",
    "SynthConfig",
    "TrainConfig",
]

STRATEGIES = ("default", "mirrored", "multi-worker")
MIXED_PRECISION = ("off", "auto", "float16", "bfloat16")
AUGMENT = ("none", "light", "strong")
KL_INPUTS = ("auto", "target", "source", "both")
STUDENT_BN = ("trainable", "frozen", "synchronized")
SOURCE_PREDICTIONS = ("live", "stored")

#: Temperatures of the KL term a run accepts (both ends included): the
#: losses' range, klseg.ops.TEMPERATURE_RANGE (a test checks they agree).
TEMPERATURE_RANGE = (1e-3, 1e3)

#: Adam learning rate of each job when none is given.
DEFAULT_LEARNING_RATE = {"train": 1e-3, "finetune": 1e-4}

# Fields that do not change what a run computes: a resumed run may differ
# from the saved config in these.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "resume", "overwrite", "verbose", "output", "strategy", "jit"}
)
# Fields not written to config.yaml (how a run was invoked, not what it is).
_NOT_SAVED = frozenset({"resume", "overwrite", "verbose"})


@dataclasses.dataclass
class _RunOptions:
    """Options shared by the training jobs (``train``, ``finetune``).

    ``steps_per_epoch``: optimizer steps per epoch; ``None`` is one pass over
    the training images (``ceil(images / batch_size)``). ``val_every``:
    validate after every ``val_every``-th epoch and after the last one; a
    checkpoint is written after every epoch, and ``model.keras`` is chosen
    among the validated epochs.
    """

    output: str | None = None
    image_size: int | tuple | None = None
    crop_size: int | tuple | None = None
    epochs: int = 20
    steps_per_epoch: int | None = None
    val_every: int = 1
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
            fail("output must name the run folder to write. Received: output=None")
        check_path("output", self.output)
        self.image_size = check_size("image_size", self.image_size, minimum=8)
        self.crop_size = check_size("crop_size", self.crop_size, minimum=8)
        if self.image_size is not None and self.crop_size is not None:
            check_crop_fits(self.crop_size, self.image_size)
        check_positive("epochs", self.epochs)
        check_positive("steps_per_epoch", self.steps_per_epoch, allow_none=True)
        check_positive("val_every", self.val_every)
        check_positive("batch_size", self.batch_size)
        check_number(
            "learning_rate",
            self.learning_rate,
            minimum=0,
            open_min=True,
            maximum=10,
            allow_none=True,
        )
        check_path("class_map", self.class_map)
        if not isinstance(self.monitor, str) or not self.monitor:
            fail(f"monitor must be a history column name. Received: {self.monitor!r}")
        check_int("seed", self.seed)
        check_int("verbose", self.verbose, minimum=0)
        for name in ("jit", "resume", "overwrite"):
            check_flag(name, getattr(self, name))
        check_choice("augment", self.augment, AUGMENT)
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.mixed_precision is True:
            self.mixed_precision = "auto"
        elif self.mixed_precision in (False, None):
            self.mixed_precision = "off"
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_int("ignore_value", self.ignore_value, minimum=0, maximum=255)
        if self.jit and self.strategy != "default":
            fail(
                f"jit cannot be combined with strategy={self.strategy!r}: XLA "
                "compilation of a distributed training step fails on "
                "TensorFlow 2.21 (a resource on one device is read from "
                "another). Drop --jit, or use --strategy default. "
                f"Received: jit=True, strategy={self.strategy!r}"
            )
        if self.resume and self.overwrite:
            fail("resume and overwrite exclude each other. Received both=True")

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
        image_size: training and validation size, ``N``, ``(H, W)`` or
            ``"HxW"`` (stored as an int for a square, else ``(H, W)``);
            images are resized to it. ``None`` takes the size of the
            training images (they must all have one size) and, for
            :class:`FinetuneConfig`, the source model's training size.
        crop_size: train on random crops of this size taken from the images
            at ``image_size`` (validation still sees whole images at
            ``image_size``); ``None`` trains on whole images.
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
            fail(
                "train needs data and val_data. "
                f"Received: data={self.data!r}, val_data={self.val_data!r}"
            )
        check_path("data", self.data)
        check_path("val_data", self.val_data)
        check_choice("model", self.model, MODELS)
        if self.backbone is not None:
            check_choice("backbone", self.backbone, BACKBONES)
        check_int("num_classes", self.num_classes, minimum=2, allow_none=True)
        check_positive("base_filters", self.base_filters, allow_none=True)
        check_int("depth", self.depth, minimum=1, maximum=6, allow_none=True)
        self.class_names = check_names("class_names", self.class_names)


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
        student_bn: ``"trainable"``, ``"frozen"`` or ``"synchronized"``
            (trainable, batch statistics over all replicas) BatchNorm.
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
        self.class_names = check_names("class_names", self.class_names)
        if not self.source or not self.data or not self.val_data:
            fail(
                "finetune needs source, data and val_data. Received: "
                f"source={self.source!r}, data={self.data!r}, "
                f"val_data={self.val_data!r}"
            )
        check_model_source("source", self.source)
        for name in (
            "data",
            "val_data",
            "unlabeled_data",
            "source_val_data",
            "source_images",
            "source_class_map",
        ):
            check_path(name, getattr(self, name))
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
                    fail(
                        "kl_weight must be a number >= 0 or a list of them. "
                        f"Received: kl_weight={self.kl_weight!r}"
                    )
            if not weights:
                fail("kl_weight must not be an empty list. Received: kl_weight=()")
            self.kl_weight = tuple(float(w) for w in weights)
        check_number(
            "temperature",
            self.temperature,
            minimum=TEMPERATURE_RANGE[0],
            maximum=TEMPERATURE_RANGE[1],
            allow_none=True,
        )
        check_choice("kl_inputs", self.kl_inputs, KL_INPUTS)
        if self.kl_inputs in ("source", "both") and not self.source_images:
            fail(
                f"kl_inputs={self.kl_inputs!r} needs source_images (a folder of "
                "unlabelled source-domain images). Received: source_images=None"
            )
        check_choice("student_bn", self.student_bn, STUDENT_BN)
        check_choice("source_predictions", self.source_predictions, SOURCE_PREDICTIONS)

    @property
    def is_sweep(self):
        return self.kl_weight is not None and len(self.kl_weight) > 1


@dataclasses.dataclass
class EvaluateConfig(inference.InferenceOptions):
    """Options of :func:`evaluate` (``klseg evaluate``).

    ``model`` is a ``.keras`` path or a ``keras.Model``; ``image_size``
    (``N``, ``(H, W)`` or ``"HxW"``) ``None`` uses the model's training size
    (stored in the model by ``klseg train`` / ``finetune``, else its run's
    ``config.yaml``), else the data's own size (all images must have one
    size). ``output`` optionally names a JSON file, ``plot`` a PNG file for
    the row-normalised confusion matrix.
    Tiles and TTA (``tile_size``, ...): ``klseg.inference.InferenceOptions``.
    """

    model: object = None
    data: str | None = None
    image_size: int | tuple | None = None
    batch_size: int = 8
    ignore_value: int = 255
    class_map: str | None = None
    output: str | None = None
    plot: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.model is None or not self.data:
            fail(
                "evaluate needs model and data. "
                f"Received: model={self.model!r}, data={self.data!r}"
            )
        check_model_source("model", self.model)
        check_path("data", self.data)
        check_path("class_map", self.class_map)
        check_path("output", self.output)
        check_path("plot", self.plot)
        if self.plot is not None and not str(self.plot).lower().endswith(".png"):
            fail(f"plot must name a .png file. Received: plot={str(self.plot)!r}")
        self.image_size = check_size("image_size", self.image_size, minimum=8)
        check_positive("batch_size", self.batch_size)
        check_int("ignore_value", self.ignore_value, minimum=0, maximum=255)


@dataclasses.dataclass
class PredictConfig(inference.InferenceOptions):
    """Options of :func:`predict` (``klseg predict``).

    ``image_size`` (``N``, ``(H, W)`` or ``"HxW"``) resizes every image
    first; ``None`` predicts each image at its own size (padded to the
    model's size multiple inside and cropped back). Tiles and TTA
    (``tile_size``, ...): ``klseg.inference.InferenceOptions``.
    """

    model: object = None
    images: str | None = None
    output: str | None = None
    overlay: bool = True
    alpha: float = 0.5
    image_size: int | tuple | None = None
    overwrite: bool = False
    verbose: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.model is None or not self.images or not self.output:
            fail(
                "predict needs model, images and output. Received: "
                f"model={self.model!r}, images={self.images!r}, "
                f"output={self.output!r}"
            )
        check_model_source("model", self.model)
        check_path("images", self.images)
        check_path("output", self.output)
        self.image_size = check_size("image_size", self.image_size, minimum=8)
        check_number("alpha", self.alpha, minimum=0, maximum=1)
        check_flag("overlay", self.overlay)
        check_flag("overwrite", self.overwrite)
        check_int("verbose", self.verbose, minimum=0)


@dataclasses.dataclass
class ExportConfig:
    """Options of :func:`export` (``klseg export``).

    ``format``: one of ``EXPORT_FORMATS``. ``quantize`` (one of
    ``QUANTIZATIONS``) applies to ``"tflite"``; ``"int8"`` calibrates on
    the images of ``representative_data`` (a folder). ``image_size`` (``N``,
    ``(H, W)`` or ``"HxW"``) is the fixed input size of ``"tflite"`` and
    ``"onnx"`` (default: the model's recorded training size); a SavedModel
    takes any size.
    """

    model: object = None
    output: str | None = None
    format: str = "saved_model"
    quantize: str = "none"
    image_size: int | tuple | None = None
    representative_data: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.model is None or not self.output:
            fail(
                "export needs model and output. "
                f"Received: model={self.model!r}, output={self.output!r}"
            )
        check_model_source("model", self.model)
        check_path("output", self.output)
        check_choice("format", self.format, EXPORT_FORMATS)
        check_choice("quantize", self.quantize, QUANTIZATIONS)
        self.image_size = check_size("image_size", self.image_size)
        check_path("representative_data", self.representative_data)
        check_flag("overwrite", self.overwrite)
        if self.quantize != "none" and self.format != "tflite":
            fail(
                "quantize applies to format='tflite' only. "
                f"Received: quantize={self.quantize!r}, format={self.format!r}"
            )
        if self.quantize == "int8" and self.representative_data is None:
            fail(
                "quantize='int8' needs representative_data, a folder of typical "
                "images to calibrate on. Received: representative_data=None"
            )
        if self.representative_data is not None and self.quantize != "int8":
            fail(
                "representative_data is used only with quantize='int8'. "
                f"Received: quantize={self.quantize!r}"
            )
        if self.image_size is not None and self.format == "saved_model":
            fail(
                "image_size applies to format='tflite' or 'onnx'; a SavedModel "
                f"takes any size. Received: image_size={self.image_size!r}"
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
            fail("synth needs output. Received: output=None")
        check_path("output", self.output)
        check_int("image_size", self.image_size, minimum=16)
        check_positive("num_train", self.num_train)
        check_positive("num_val", self.num_val)
        check_int("num_unlabeled", self.num_unlabeled, minimum=0)
        check_positive("num_target_train", self.num_target_train, allow_none=True)
        check_int("seed", self.seed)
        check_flag("overwrite", self.overwrite)


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
            override the preset (see ``DEMO_PRESETS``). ``image_size`` may
            be ``(H, W)`` or ``"HxW"``: the benchmark is written as squares
            of the longer side and the runs resize it to ``H x W``.
        seed: seed of the data and the training runs.
        overwrite: replace an earlier demo in ``output``.
        verbose: 0 for no progress bars.
    """

    output: str = "klseg-demo"
    quick: bool = False
    image_size: int | tuple | None = None
    num_train: int | None = None
    source_epochs: int | None = None
    finetune_epochs: int | None = None
    kl_weight: float | None = None
    seed: int = 0
    overwrite: bool = False
    verbose: int = 1

    def __post_init__(self):
        if not self.output:
            fail("demo needs output. Received: output=None")
        check_path("output", self.output)
        self.image_size = check_size("image_size", self.image_size, minimum=16)
        for name in ("num_train", "source_epochs", "finetune_epochs"):
            check_positive(name, getattr(self, name), allow_none=True)
        check_number("kl_weight", self.kl_weight, minimum=0, allow_none=True)
        check_int("seed", self.seed)
        for name in ("quick", "overwrite"):
            check_flag(name, getattr(self, name))
        check_int("verbose", self.verbose, minimum=0)

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
