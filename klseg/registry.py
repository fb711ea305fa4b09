"""The names and shared constants klseg knows, in one place.

Standard library only, so the command line can offer them as choices (and
print their defaults) without importing Keras. Every other module takes
these values from here: ``klseg.models`` builds its registry from the model
names (a test checks that every name has a builder and every builder a
name), the losses check temperatures against ``TEMPERATURE_RANGE``, and the
run layer's configs check their choices against the tuples below.
"""

__all__ = [
    "BACKBONES",
    "DISTILL_KL_TYPES",
    "DISTILL_KL_WEIGHT",
    "DISTILL_TEMPERATURE",
    "EXPORT_FORMATS",
    "FINETUNE_KL_WEIGHT",
    "FINETUNE_TEMPERATURE",
    "MIX_MODES",
    "MODELS",
    "QUANTIZATIONS",
    "TEMPERATURE_RANGE",
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
