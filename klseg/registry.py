"""The names and shared constants klseg knows, in one place.

Standard library only, so the command line can offer them as choices (and
print their defaults) without importing Keras. Every other module takes
these values from here: ``klseg.models`` builds its registry from the model
names (a test checks that every name has a builder and every builder a
name), the losses check temperatures against ``TEMPERATURE_RANGE``, and the
run layer's configs check their choices against the tuples below and take
their defaults from the ``*_DEFAULTS`` tables (the command line shows them
in ``--help``).
"""

__all__ = [
    "ADAPT_DEFAULTS",
    "ADAPT_LEARNING_RATE",
    "ADAPT_METHODS",
    "ADAPT_RECIPES",
    "AUGMENT",
    "BACKBONES",
    "DEFAULT_LEARNING_RATE",
    "DEMO_DEFAULTS",
    "DISTILL_DEFAULTS",
    "DISTILL_KL_TYPES",
    "DISTILL_KL_WEIGHT",
    "DISTILL_TEMPERATURE",
    "EVALUATE_DEFAULTS",
    "EXPORT_DEFAULTS",
    "EXPORT_FORMATS",
    "FINETUNE_DEFAULTS",
    "FINETUNE_RECIPES",
    "FINETUNE_KL_WEIGHT",
    "FINETUNE_TEMPERATURE",
    "IMAGE_PIXELS_VARIABLE",
    "KL_INPUTS",
    "LIMITS",
    "MAX_IMAGE_PIXELS",
    "MIXED_PRECISION",
    "MIX_MODES",
    "MODELS",
    "PREDICT_DEFAULTS",
    "QUANTIZATIONS",
    "REFERENCE_STYLES",
    "RUN_DEFAULTS",
    "SOURCE_PREDICTIONS",
    "STRATEGIES",
    "STUDENT_BN",
    "STYLES",
    "SYNTH_DEFAULTS",
    "TEMPERATURE_RANGE",
    "TRAIN_DEFAULTS",
]

#: Architectures ``klseg.models.build`` accepts.
MODELS = ("unet", "deeplabv3_plus")

#: Encoders of both architectures: klseg's own ``"plain"`` blocks, or a
#: ``keras.applications`` network.
BACKBONES = ("plain", "resnet50", "mobilenetv2")

#: Accepted temperatures of every KL term, both ends included: at ``T`` in
#: this range every intermediate (``z / T``, ``T^2``, gradients ``~ T``)
#: stays finite.
TEMPERATURE_RANGE = (1e-3, 1e3)

#: Default weight and temperature of the fine-tuning KL term
#: (``klseg.finetune.KLRegularizedModel``, ``klseg finetune``).
FINETUNE_KL_WEIGHT = 0.3
FINETUNE_TEMPERATURE = 2.0

#: Mixing augmentations of the consistency term's strong view
#: (``klseg.consistency``).
MIX_MODES = ("classmix", "cutmix", "none")

#: The KL terms of distillation (``klseg.distill.DistillationModel``), the
#: default weight (see docs/distill.md for the measurement) and the default
#: temperature of each term: 1 for the per-pixel term (as Liu et al. 2019
#: distil per pixel; it also beat 2 in benchmarks/bench_distill.py), 4 for
#: the channel-wise term (Shu et al. 2021 use 4 on Cityscapes).
DISTILL_KL_TYPES = ("pixel", "channel")
DISTILL_KL_WEIGHT = 1.0
DISTILL_TEMPERATURE = {"pixel": 1.0, "channel": 4.0}

#: What ``klseg export --format`` writes: a SavedModel folder, a ``.tflite``
#: file (LiteRT) or an ``.onnx`` file.
EXPORT_FORMATS = ("saved_model", "tflite", "onnx")

#: TFLite quantisations: float32 weights and maths, float16 weights, or
#: full-integer int8 (weights and activations) calibrated on sample images.
QUANTIZATIONS = ("none", "float16", "int8")

# --------------------------------------------------------------------------
# The jobs' choices and defaults (klseg.runs.configs, the command line)
# --------------------------------------------------------------------------

#: ``tf.distribute`` strategies of the training jobs.
STRATEGIES = ("default", "mirrored", "multi-worker")
#: Mixed-precision modes (``"auto"``: float16 on GPU, bfloat16 on CPU).
MIXED_PRECISION = ("off", "auto", "float16", "bfloat16")
#: Augmentation presets of the training images (``klseg.data.augment``).
AUGMENT = ("none", "light", "strong")
#: Images the fine-tuning KL term sees.
KL_INPUTS = ("auto", "target", "source", "both")
#: BatchNorm statistics of the fine-tuned model.
STUDENT_BN = ("trainable", "frozen", "synchronized")
#: Whether the source model's predictions are computed live or stored once.
SOURCE_PREDICTIONS = ("auto", "live", "stored")
#: Adam learning rate of each job when none is given.
DEFAULT_LEARNING_RATE = {"train": 1e-3, "finetune": 1e-4, "adapt": 1e-4}
#: How ``klseg adapt`` adapts (docs/adapt.md).
ADAPT_METHODS = ("self-training", "bn-stats", "tent")
#: Restyling of source images (klseg.data.style): towards target images
#: (fda, histogram, pda: they need references) or randomised colours.
STYLES = ("none", "fda", "histogram", "pda", "random-colour")
#: The styles that follow reference images.
REFERENCE_STYLES = ("fda", "histogram", "pda")
#: The defaults of ``klseg adapt`` that depend on the mode (docs/adapt.md,
#: "Defaults"): measured with benchmarks/bench_adapt.py. An option given
#: explicitly wins; a mode's entry fills the options left unset, the rest
#: come from ADAPT_DEFAULTS.
ADAPT_RECIPES = {
    "unsupervised": {
        "kl_weight": 1.0,
        "ema_decay": 0.99,
        "consistency_threshold": 0.968,
        "consistency_rampup": 100,
        "style": "none",
    },
    "source-free": {
        "kl_weight": 1.0,
        "ema_decay": 0.97,
        "consistency_threshold": 0.9,
        "consistency_rampup": 100,
    },
    "tent": {"kl_weight": 0.0},
}
#: The Adam learning rate of each trained adaptation method when none is
#: given (TENT: Wang et al. 2021 train the BatchNorm affine parameters at 1e-3).
ADAPT_LEARNING_RATE = {"self-training": 1e-4, "tent": 1e-3}

#: Defaults of the options every training job shares (train, finetune,
#: distill).
RUN_DEFAULTS = {
    "epochs": 20,
    "val_every": 1,
    "batch_size": 8,
    "augment": "light",
    "ignore_value": 255,
    "monitor": "auto",
    "seed": 0,
    "strategy": "default",
    "jit": False,
    "mixed_precision": "off",
}
#: Defaults of the options of each job, beside ``RUN_DEFAULTS``.
TRAIN_DEFAULTS = {"model": "unet", "style": "none"}
FINETUNE_DEFAULTS = {
    "kl_inputs": "auto",
    "student_bn": "trainable",
    "source_predictions": "auto",
    "ema_decay": 0.99,
    "consistency_threshold": 0.9,
    "consistency_rampup": 0,
    "consistency_mix": "classmix",
}
#: The defaults of ``klseg finetune`` that depend on the mode
#: (docs/finetune.md, "Defaults"): "few-label" is the consistency term on
#: (a consistency weight above 0; in a sweep, any), measured with
#: benchmarks/bench_fewlabel.py (8 labelled target images, 1800 steps: the
#: EMA teacher reaches plain fine-tuning with 48 labels on the target and
#: keeps the source). An option given explicitly wins; the rest come from
#: FINETUNE_DEFAULTS, RUN_DEFAULTS and FINETUNE_KL_WEIGHT.
FINETUNE_RECIPES = {
    "few-label": {
        "kl_weight": 1.0,
        "student_bn": "frozen",
        "ema_decay": 0.97,
        "consistency_rampup": 100,
        "learning_rate": 3e-3,
        "epochs": 72,
        "steps_per_epoch": 25,
    },
}
ADAPT_DEFAULTS = {
    "method": "self-training",
    "kl_weight": 0.0,
    "temperature": 2.0,
    "consistency_weight": 1.0,
    "ema_decay": 0.99,
    "consistency_threshold": 0.9,
    "consistency_rampup": 0,
    "consistency_mix": "classmix",
    "balance_weight": 0.0,
    "entropy_weight": 1.0,
    "student_bn": "trainable",
    "style": "none",
}
DISTILL_DEFAULTS = {"model": "unet", "kl_weight": DISTILL_KL_WEIGHT, "kl_type": "pixel"}
EVALUATE_DEFAULTS = {"batch_size": 8, "ignore_value": 255}
PREDICT_DEFAULTS = {"overlay": True, "alpha": 0.5}
EXPORT_DEFAULTS = {"format": "saved_model", "quantize": "none"}
SYNTH_DEFAULTS = {
    "image_size": 64,
    "num_train": 160,
    "num_val": 64,
    "num_unlabeled": 160,
    "seed": 0,
}
DEMO_DEFAULTS = {"output": "klseg-demo", "seed": 0}

# --------------------------------------------------------------------------
# Bounds (docs/cli.md, "Bounds")
# --------------------------------------------------------------------------

#: The range of every integer option and of the weights, both ends included:
#: ``{name: (lowest, highest)}``. The configs check their fields against it
#: (so Python calls, the command line and config files meet the same bounds)
#: and the command line's option types take their ranges from it. The limits
#: are far above any real run; they exist so that a typo (a seed of -1, a
#: batch of 10**20, a million epochs too many) stops before any work.
#: ``image_side`` bounds each side of ``image_size``, ``crop_size`` and
#: ``tile_size`` (the training sizes also need at least 8 pixels a side, the
#: synthetic benchmark's at least 16).
LIMITS = {
    "seed": (0, 2**32 - 1),
    "epochs": (1, 1_000_000),
    "steps_per_epoch": (1, 100_000_000),
    "val_every": (1, 1_000_000),
    "batch_size": (1, 65_536),
    "image_side": (1, 16_384),
    "num_classes": (2, 65_536),
    "base_filters": (1, 4_096),
    "depth": (1, 6),
    "ignore_value": (0, 255),
    "consistency_rampup": (0, 100_000_000),
    "num_train": (1, 1_000_000),
    "num_val": (1, 1_000_000),
    "num_unlabeled": (0, 1_000_000),
    "num_target_train": (1, 1_000_000),
    "source_epochs": (1, 1_000_000),
    "finetune_epochs": (1, 1_000_000),
    "kl_weight": (0, 1_000_000),
    "consistency_weight": (0, 1_000_000),
    "balance_weight": (0, 1_000_000),
    "entropy_weight": (0, 1_000_000),
}

#: Images with more pixels than this are refused, naming the file, before
#: their pixels are decoded (Pillow's own hard limit, its
#: ``2 * Image.MAX_IMAGE_PIXELS``). The environment variable
#: ``IMAGE_PIXELS_VARIABLE`` raises or lowers it.
MAX_IMAGE_PIXELS = 178_956_970
IMAGE_PIXELS_VARIABLE = "KLSEG_MAX_IMAGE_PIXELS"
