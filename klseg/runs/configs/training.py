"""Config objects of the jobs, their choices and defaults.

Standard library only. The choices and the defaults the command line shows
come from :mod:`klseg.registry` (re-exported here), so that the command line
reads them without importing this module. Every field is checked when the
object is made: a value of the wrong type, a non-finite or out-of-range
number or an unknown choice raises ``klseg.errors.InvalidArgumentError``
naming the field and the value.
"""

import dataclasses
import math

from klseg.registry import (
    AUGMENT,
    BACKBONES,
    DEFAULT_LEARNING_RATE,
    DISTILL_DEFAULTS,
    DISTILL_KL_TYPES,
    DISTILL_KL_WEIGHT,
    DISTILL_TEMPERATURE,
    EXPORT_FORMATS,
    FINETUNE_DEFAULTS,
    FINETUNE_RECIPES,
    KL_INPUTS,
    LIMITS,
    MIXED_PRECISION,
    MODELS,
    QUANTIZATIONS,
    REFERENCE_STYLES,
    RUN_DEFAULTS,
    SOURCE_PREDICTIONS,
    STRATEGIES,
    STUDENT_BN,
    STYLES,
    TEMPERATURE_RANGE,
    TRAIN_DEFAULTS,
)
from klseg.registry import MIX_MODES as CONSISTENCY_MIX
from klseg.runs.checks import (
    check_choice,
    check_crop_fits,
    check_flag,
    check_int,
    check_model_name,
    check_model_source,
    check_names,
    check_number,
    check_path,
    check_size,
    fail,
)
from klseg.runs.configs.bounds import (
    check_bounded,
    check_bounded_number,
    check_side_limit,
    check_weight_folders,
    mode_defaults_text,
    weight_text,
)
from klseg.runs.hub import is_hub_spec

__all__ = [
    "AUGMENT",
    "BACKBONES",
    "CONSISTENCY_MIX",
    "DEFAULT_LEARNING_RATE",
    "DISTILL_KL_TYPES",
    "DISTILL_KL_WEIGHT",
    "DISTILL_TEMPERATURE",
    "EXPORT_FORMATS",
    "KL_INPUTS",
    "MIXED_PRECISION",
    "MODELS",
    "QUANTIZATIONS",
    "RESUMABLE_CHANGES",
    "SOURCE_PREDICTIONS",
    "STRATEGIES",
    "STUDENT_BN",
    "TEMPERATURE_RANGE",
    "DistillConfig",
    "FinetuneConfig",
    "TrainConfig",
]

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
    epochs: int = RUN_DEFAULTS["epochs"]
    steps_per_epoch: int | None = None
    val_every: int = RUN_DEFAULTS["val_every"]
    batch_size: int = RUN_DEFAULTS["batch_size"]
    learning_rate: float | None = None
    augment: str = RUN_DEFAULTS["augment"]
    ignore_value: int = RUN_DEFAULTS["ignore_value"]
    class_map: str | None = None
    monitor: str = RUN_DEFAULTS["monitor"]
    seed: int = RUN_DEFAULTS["seed"]
    strategy: str = RUN_DEFAULTS["strategy"]
    jit: bool = RUN_DEFAULTS["jit"]
    mixed_precision: str = RUN_DEFAULTS["mixed_precision"]
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1

    def _check_run_options(self):
        if not self.output:
            fail("output must name the run folder to write. Received: output=None")
        check_path("output", self.output)
        self.image_size = check_size("image_size", self.image_size, minimum=8)
        self.crop_size = check_size("crop_size", self.crop_size, minimum=8)
        check_side_limit("image_size", self.image_size)
        check_side_limit("crop_size", self.crop_size)
        if self.image_size is not None and self.crop_size is not None:
            check_crop_fits(self.crop_size, self.image_size)
        check_bounded("epochs", self.epochs)
        check_bounded("steps_per_epoch", self.steps_per_epoch, allow_none=True)
        check_bounded("val_every", self.val_every)
        check_bounded("batch_size", self.batch_size)
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
        check_bounded("seed", self.seed)
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
        check_bounded("ignore_value", self.ignore_value)
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


#: The options every training job shares, for configs defined elsewhere
#: (:mod:`klseg.runs.configs.adaptation`).
RunOptions = _RunOptions


@dataclasses.dataclass
class TrainConfig(_RunOptions):
    """Options of :func:`train` (``klseg train``).

    Attributes:
        data: labelled training folder (``images/`` + ``masks/``) or
            ``tfds:NAME[:SPLIT]``.
        val_data: labelled validation folder or spec.
        model: ``"unet"`` or ``"deeplabv3_plus"``, or
            ``"keras-hub:PRESET_OR_DIR"`` (a KerasHub image segmenter; its
            head is re-created when ``num_classes`` differs from the
            preset's).
        backbone, base_filters, depth: passed to the model builder when set
            (not with a KerasHub model).
        num_classes: number of classes; ``None`` reads it from the data
            (a ``classes.json`` in the data folder or above it, else the
            largest mask value + 1).
        class_names: names stored in the model; ``None`` reads them from a
            ``classes.json`` like ``num_classes``, else ``class_0``, ...
        style, style_references: restyle every training image towards the
            images of ``style_references`` (target-domain images) before
            augmentation: ``"fda"``, ``"histogram"`` or ``"pda"``
            (``klseg.data.style``); ``"random-colour"`` randomises each
            image's colours (no references); ``"none"`` (the default)
            leaves them.
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
    model: str = TRAIN_DEFAULTS["model"]
    backbone: str | None = None
    base_filters: int | None = None
    depth: int | None = None
    num_classes: int | None = None
    class_names: tuple | None = None
    style: str = TRAIN_DEFAULTS["style"]
    style_references: str | None = None

    def __post_init__(self):
        self._check_run_options()
        self._check_style()
        if not self.data or not self.val_data:
            fail(
                "train needs data and val_data. "
                f"Received: data={self.data!r}, val_data={self.val_data!r}"
            )
        check_path("data", self.data)
        check_path("val_data", self.val_data)
        check_model_name("model", self.model, MODELS)
        if is_hub_spec(self.model):
            for name in ("backbone", "base_filters", "depth"):
                if getattr(self, name) is not None:
                    fail(
                        f"{name} does not apply to a KerasHub model (the preset "
                        f"defines the architecture). Received: model="
                        f"{self.model!r}, {name}={getattr(self, name)!r}"
                    )
        if self.backbone is not None:
            check_choice("backbone", self.backbone, BACKBONES)
        check_bounded("num_classes", self.num_classes, allow_none=True)
        check_bounded("base_filters", self.base_filters, allow_none=True)
        check_bounded("depth", self.depth, allow_none=True)
        self.class_names = check_names("class_names", self.class_names)

    def _check_style(self):
        check_choice("style", self.style, STYLES)
        check_path("style_references", self.style_references)
        needs = self.style in REFERENCE_STYLES
        if needs != (self.style_references is not None):
            fail(
                "style_references go with style fda, histogram or pda: they "
                "restyle the training images towards the style_references "
                "images (a folder of target-domain images); none and "
                "random-colour take no references. Received: "
                f"style={self.style!r}, style_references={self.style_references!r}"
            )


@dataclasses.dataclass
class FinetuneConfig(_RunOptions):
    """Options of :func:`finetune` (``klseg finetune``).

    Some defaults depend on the run's mode (:attr:`mode`): with the
    consistency term on ("few-label"), the options left ``None``
    (``kl_weight``, ``student_bn``, ``ema_decay``, ``consistency_rampup``,
    ``learning_rate``, ``epochs``, ``steps_per_epoch``) take the measured
    recipe's values (``klseg.registry.FINETUNE_RECIPES``; docs/finetune.md,
    "Defaults"); in the other modes the job's defaults. After ``__init__``
    the fields hold the values used (``config.yaml``) and :attr:`applied`
    says which came from the mode. ``mode_defaults=False`` turns the mode's
    values off (a run made before they existed resumes with it).

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
            (trainable, batch statistics over all replicas) BatchNorm;
            ``None``: the mode's (frozen in the few-label mode, else
            trainable).
        source_predictions: ``"live"`` (source model run each step),
            ``"stored"`` (computed once, float16) or ``"auto"``: stored when
            the images that need them have a known count and their
            predictions plus images fit in half the memory available at the
            start, live otherwise; the run says which and why.
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
        consistency_weight: weight of the KL consistency term to an EMA
            teacher on ``unlabeled_data`` (``klseg.consistency.
            MeanTeacherModel``), one number or a list (a sweep, like
            ``kl_weight``; both lists give a grid). ``None`` or ``0`` is
            off; on, ``unlabeled_data`` is required, its images come in a
            stream of their own (one unlabelled batch beside each labelled
            batch) and ``model.keras`` holds the EMA teacher.
        ema_decay: decay of the teacher's exponential moving average, in
            [0, 1); ``None``: the mode's (0.97 few-label, else 0.99).
        consistency_threshold: teacher confidence (max probability) a pixel
            needs to count in the consistency term, in [0, 1].
        consistency_rampup: optimizer steps of the sigmoid ramp-up of the
            consistency weight (0: none); ``None``: the mode's (100
            few-label, else 0).
        mode_defaults: whether options left ``None`` take the mode's
            values (see above).
        consistency_mix: mixing of the student's strong view:
            ``"classmix"``, ``"cutmix"`` or ``"none"``.
        learning_rate: Adam learning rate. ``None`` means 1e-4.
        monitor: history column that picks ``model.keras``; ``"auto"`` is
            the target-domain validation mIoU (of the EMA teacher,
            ``val_ema_target_mean_iou``, with the consistency term on).
    """

    source: str | None = None
    data: str | None = None
    val_data: str | None = None
    unlabeled_data: str | None = None
    source_val_data: str | None = None
    source_images: str | None = None
    kl_weight: tuple | float | None = None
    temperature: float | None = None
    kl_inputs: str = FINETUNE_DEFAULTS["kl_inputs"]
    student_bn: str | None = None
    source_predictions: str = FINETUNE_DEFAULTS["source_predictions"]
    class_names: tuple | None = None
    source_class_map: str | None = None
    consistency_weight: tuple | float | None = None
    ema_decay: float | None = None
    consistency_threshold: float = FINETUNE_DEFAULTS["consistency_threshold"]
    consistency_rampup: int | None = None
    consistency_mix: str = FINETUNE_DEFAULTS["consistency_mix"]
    epochs: int | None = None
    # A run saved before the mode defaults existed ran without them.
    mode_defaults: bool = dataclasses.field(default=True, metadata={"predating": False})

    def __post_init__(self):
        self._apply_recipe()
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
        self.kl_weight = _weights("kl_weight", self.kl_weight)
        self._check_consistency()
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

    def _check_consistency(self):
        self.consistency_weight = _weights(
            "consistency_weight", self.consistency_weight
        )
        check_number("ema_decay", self.ema_decay, minimum=0, maximum=1)
        if self.ema_decay == 1:
            fail(
                "ema_decay must be below 1 (at 1 the teacher never moves from "
                "the source model). Received: ema_decay=1"
            )
        check_number(
            "consistency_threshold", self.consistency_threshold, minimum=0, maximum=1
        )
        check_bounded("consistency_rampup", self.consistency_rampup)
        check_choice("consistency_mix", self.consistency_mix, CONSISTENCY_MIX)
        if self.uses_consistency and not self.unlabeled_data:
            fail(
                "consistency_weight > 0 needs unlabeled_data (a folder of "
                "unlabelled target-domain images for the EMA teacher). "
                f"Received: consistency_weight={_text(self.consistency_weight)}, "
                "unlabeled_data=None"
            )

    def _apply_recipe(self):
        """Fill the options left unset (``None``) with the mode's values
        (``klseg.registry.FINETUNE_RECIPES``), the rest with the job's
        defaults; :attr:`applied` says which came from the mode, and
        ``config.yaml`` records every value used."""
        check_flag("mode_defaults", self.mode_defaults)
        self.consistency_weight = _weights(
            "consistency_weight", self.consistency_weight
        )
        self.applied = {}
        if self.mode_defaults:
            for key, value in FINETUNE_RECIPES.get(self.mode, {}).items():
                if getattr(self, key) is None:
                    setattr(self, key, (value,) if key == "kl_weight" else value)
                    self.applied[key] = value
        for key in ("student_bn", "ema_decay", "consistency_rampup"):
            if getattr(self, key) is None:
                setattr(self, key, FINETUNE_DEFAULTS[key])
        if self.epochs is None:
            self.epochs = RUN_DEFAULTS["epochs"]

    @property
    def mode(self):
        """``"few-label"`` (the consistency term on in any run of the
        config), ``"plain"`` (every KL weight 0) or ``"kl"``."""
        if self.uses_consistency:
            return "few-label"
        weights = self.kl_weight
        if weights is not None and not isinstance(weights, (list, tuple)):
            weights = (weights,)
        return "plain" if weights and not any(weights) else "kl"

    def recipe_note(self):
        """``[defaults of the few-label mode: ...]`` for the options the
        mode filled in, or ``None``."""
        if not self.applied:
            return None
        length = ""
        if {"epochs", "steps_per_epoch"} & set(self.applied) and self.steps_per_epoch:
            length = f" ({self.epochs * self.steps_per_epoch} optimizer steps)"
        text = mode_defaults_text(self.mode, self.applied)
        return f"[{text}{length}; docs/finetune.md]"

    @property
    def uses_consistency(self):
        """Whether any run of this config has the consistency term on."""
        return any(w > 0 for w in self.consistency_weight or ())

    @property
    def is_sweep(self):
        return any(
            w is not None and len(w) > 1
            for w in (self.kl_weight, self.consistency_weight)
        )


def _text(weights):
    return ",".join(weight_text(w) for w in weights)


def _weights(name, value):
    """One weight or a list of them (each a finite number in
    ``LIMITS[name]``) as a tuple of floats; None stays None. A list must not
    repeat a value, nor hold two values whose sweep folders would share a
    name (:func:`~klseg.runs.configs.bounds.check_weight_folders`)."""
    if value is None:
        return None
    weights = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    low, high = LIMITS[name]
    for w in weights:
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not math.isfinite(w)
            or not low <= w <= high
        ):
            fail(
                f"{name} must be a number >= {low} and <= {high:,} or a list "
                f"of them. Received: {name}={value!r}"
            )
    if not weights:
        fail(f"{name} must not be an empty list. Received: {name}=()")
    weights = tuple(float(w) for w in weights)
    check_weight_folders(name, weights)
    return weights


@dataclasses.dataclass
class DistillConfig(_RunOptions):
    """Options of :func:`distill` (``klseg distill``).

    Attributes:
        teacher: the trained teacher: a ``.keras`` file, or a
            ``keras-hub:PRESET_OR_DIR`` spec.
        model: the student's architecture, a registry name (``"unet"``,
            ``"deeplabv3_plus"``) or a ``keras-hub:PRESET_OR_DIR`` spec.
        backbone, base_filters, depth: passed to the student's builder when
            set.
        num_classes: optional; must equal the teacher's number of classes
            (the student always predicts the teacher's classes, named as the
            teacher names them).
        data: labelled training folder.
        unlabeled_data: unlabelled training images; the KL term sees them,
            the task loss does not.
        val_data: labelled validation folder; the teacher and the student
            are scored on it.
        kl_weight: weight of the KL term (>= 0; 0 trains the student on the
            labels alone). Defaults to 1.
        temperature: softmax temperature of the KL term. ``None`` is 1 for
            ``kl_type="pixel"``, 4 for ``"channel"``.
        kl_type: ``"pixel"`` (KL between the class distributions of each
            pixel) or ``"channel"`` (KL between the spatial distributions of
            each class channel, Shu et al. 2021).
        image_size: ``None`` takes the teacher's training size, else the
            training images' size.
        learning_rate: Adam learning rate. ``None`` means 1e-3 (the student
            starts from scratch, as in ``train``).
        monitor: history column that picks ``model.keras``; ``"auto"`` is
            the student's ``val_mean_iou``.
    """

    teacher: str | None = None
    model: str = DISTILL_DEFAULTS["model"]
    backbone: str | None = None
    base_filters: int | None = None
    depth: int | None = None
    num_classes: int | None = None
    data: str | None = None
    unlabeled_data: str | None = None
    val_data: str | None = None
    kl_weight: float = DISTILL_DEFAULTS["kl_weight"]
    temperature: float | None = None
    kl_type: str = DISTILL_DEFAULTS["kl_type"]

    def __post_init__(self):
        self._check_run_options()
        if not self.teacher or not self.data or not self.val_data:
            fail(
                "distill needs teacher, data and val_data. Received: "
                f"teacher={self.teacher!r}, data={self.data!r}, "
                f"val_data={self.val_data!r}"
            )
        check_model_source("teacher", self.teacher)
        for name in ("data", "unlabeled_data", "val_data"):
            check_path(name, getattr(self, name))
        check_model_name("model", self.model, MODELS)
        if self.backbone is not None:
            check_choice("backbone", self.backbone, BACKBONES)
        check_bounded("num_classes", self.num_classes, allow_none=True)
        check_bounded("base_filters", self.base_filters, allow_none=True)
        check_bounded("depth", self.depth, allow_none=True)
        check_bounded_number("kl_weight", self.kl_weight)
        self.kl_weight = float(self.kl_weight)
        check_number(
            "temperature",
            self.temperature,
            minimum=TEMPERATURE_RANGE[0],
            maximum=TEMPERATURE_RANGE[1],
            allow_none=True,
        )
        check_choice("kl_type", self.kl_type, DISTILL_KL_TYPES)

    @property
    def resolved_temperature(self):
        """``temperature``, or the default of ``kl_type``."""
        if self.temperature is not None:
            return float(self.temperature)
        return DISTILL_TEMPERATURE[self.kl_type]
