"""Config objects of the jobs that do not train: evaluate, predict, export,
synth and demo.

Standard library only, like :mod:`klseg.runs.configs` (which re-exports
them); their choices and the defaults the command line shows come from
:mod:`klseg.registry`.
"""

import dataclasses

from klseg import inference
from klseg.registry import (
    DEMO_DEFAULTS,
    EVALUATE_DEFAULTS,
    EXPORT_DEFAULTS,
    EXPORT_FORMATS,
    PREDICT_DEFAULTS,
    QUANTIZATIONS,
    SYNTH_DEFAULTS,
)
from klseg.runs.checks import (
    check_choice,
    check_flag,
    check_int,
    check_model_source,
    check_number,
    check_path,
    check_size,
    fail,
)
from klseg.runs.configs.bounds import (
    check_bounded,
    check_bounded_number,
    check_side_limit,
)

__all__ = [
    "DEMO_PRESETS",
    "DemoConfig",
    "EvaluateConfig",
    "ExportConfig",
    "PredictConfig",
    "SynthConfig",
]


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
    batch_size: int = EVALUATE_DEFAULTS["batch_size"]
    ignore_value: int = EVALUATE_DEFAULTS["ignore_value"]
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
        check_side_limit("image_size", self.image_size)
        check_side_limit("tile_size", self.tile_size)
        check_bounded("batch_size", self.batch_size)
        check_bounded("ignore_value", self.ignore_value)


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
    overlay: bool = PREDICT_DEFAULTS["overlay"]
    alpha: float = PREDICT_DEFAULTS["alpha"]
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
        check_side_limit("image_size", self.image_size)
        check_side_limit("tile_size", self.tile_size)
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
    takes any size unless it is given (for models that cannot be traced at
    an unknown size, such as KerasHub's DeepLabV3).
    """

    model: object = None
    output: str | None = None
    format: str = EXPORT_DEFAULTS["format"]
    quantize: str = EXPORT_DEFAULTS["quantize"]
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
        check_side_limit("image_size", self.image_size)
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


@dataclasses.dataclass
class SynthConfig:
    """Options of :func:`synth_data` (``klseg data synth``)."""

    output: str | None = None
    image_size: int = SYNTH_DEFAULTS["image_size"]
    num_train: int = SYNTH_DEFAULTS["num_train"]
    num_val: int = SYNTH_DEFAULTS["num_val"]
    num_unlabeled: int = SYNTH_DEFAULTS["num_unlabeled"]
    num_target_train: int | None = None
    seed: int = SYNTH_DEFAULTS["seed"]
    overwrite: bool = False

    def __post_init__(self):
        if not self.output:
            fail("synth needs output. Received: output=None")
        check_path("output", self.output)
        check_bounded("image_size", self.image_size, limit="image_side", minimum=16)
        check_bounded("num_train", self.num_train)
        check_bounded("num_val", self.num_val)
        check_bounded("num_unlabeled", self.num_unlabeled)
        check_bounded("num_target_train", self.num_target_train, allow_none=True)
        check_bounded("seed", self.seed)
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

    output: str = DEMO_DEFAULTS["output"]
    quick: bool = False
    image_size: int | tuple | None = None
    num_train: int | None = None
    source_epochs: int | None = None
    finetune_epochs: int | None = None
    kl_weight: float | None = None
    seed: int = DEMO_DEFAULTS["seed"]
    overwrite: bool = False
    verbose: int = 1

    def __post_init__(self):
        if not self.output:
            fail("demo needs output. Received: output=None")
        check_path("output", self.output)
        self.image_size = check_size("image_size", self.image_size, minimum=16)
        check_side_limit("image_size", self.image_size)
        for name in ("num_train", "source_epochs", "finetune_epochs"):
            check_bounded(name, getattr(self, name), allow_none=True)
        check_bounded_number("kl_weight", self.kl_weight, allow_none=True)
        check_bounded("seed", self.seed)
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
