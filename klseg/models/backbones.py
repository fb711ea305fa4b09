"""Encoders for the segmentation models.

``"plain"`` encoders are built from klseg's own blocks (no pretrained
weights). ``"resnet50"`` and ``"mobilenetv2"`` wrap ``keras.applications``
models: ``weights=None`` (random, the default), ``"imagenet"`` (passed
through to Keras, which downloads the file on first use) or the path of a
local weights file for the ``include_top=False`` application (for example
the ``*_notop.h5`` file Keras keeps in ``~/.keras/models``, or a file written
by ``backbone.save_weights(...)``).

Each encoder returns feature maps keyed by their stride (2, 4, 8, ...). For
DeepLabV3+ the last stages are dilated instead of strided so the deepest
feature map has the requested output stride.
"""

import os

import keras

from klseg.errors import InvalidArgumentError, ModelError
from klseg.models.layers import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "BACKBONES",
    "APPLICATION_BACKBONES",
    "preprocessing_config",
    "application_features",
    "conv_bn_relu",
    "check_backbone",
    "check_weights",
]

# Batch-norm momentum of klseg's own layers. 0.9 (PyTorch's 0.1) lets the
# moving statistics settle within the few hundred steps of a short run;
# Keras' default 0.99 leaves them far from the batch statistics for longer.
BN_MOMENTUM = 0.9

_APPLICATIONS = {
    "resnet50": {
        "constructor": "ResNet50",
        # Keras' "caffe" preprocessing: BGR, mean subtracted, no scaling.
        "preprocessing": {
            "mean": (123.68, 116.779, 103.939),
            "std": (1.0, 1.0, 1.0),
            "channel_order": "bgr",
        },
        "features": {
            2: "conv1_relu",
            4: "conv2_block3_out",
            8: "conv3_block4_out",
            16: "conv4_block6_out",
            32: "conv5_block3_out",
        },
    },
    "mobilenetv2": {
        "constructor": "MobileNetV2",
        # Keras' "tf" preprocessing: scaled to -1..1.
        "preprocessing": {
            "mean": (127.5, 127.5, 127.5),
            "std": (127.5, 127.5, 127.5),
            "channel_order": "rgb",
        },
        "features": {
            2: "block_1_expand_relu",
            4: "block_3_expand_relu",
            8: "block_6_expand_relu",
            16: "block_13_expand_relu",
            32: "block_16_project_BN",
        },
    },
}

APPLICATION_BACKBONES = tuple(_APPLICATIONS)
BACKBONES = ("plain", *APPLICATION_BACKBONES)


def check_backbone(backbone):
    if backbone not in BACKBONES:
        raise InvalidArgumentError(
            f"Unknown backbone {backbone!r}. Valid backbones: "
            f"{', '.join(BACKBONES)}. Received: backbone={backbone!r}"
        )


def check_weights(backbone, weights):
    """Validates ``weights`` for ``backbone``; returns it unchanged."""
    if weights is None:
        return None
    if backbone == "plain":
        raise InvalidArgumentError(
            'The "plain" backbone has no pretrained weights; use weights=None, '
            "or a keras.applications backbone such as backbone='resnet50'. "
            "(To restore a whole trained model use keras.saving.load_model.) "
            f"Received: weights={weights!r}"
        )
    if weights == "imagenet":
        return weights
    if isinstance(weights, str | os.PathLike):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise InvalidArgumentError(
                f"Backbone weights file not found: {path}. `weights` must be "
                'None, "imagenet" or the path of a weights file for the '
                f"{backbone} application (include_top=False). "
                f"Received: weights={path!r}"
            )
        return path
    raise InvalidArgumentError(
        '`weights` must be None, "imagenet" or a file path. '
        f"Received: weights={weights!r}"
    )


def preprocessing_config(backbone):
    """The ``ImagePreprocessing`` arguments that match ``backbone``."""
    if backbone == "plain":
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "channel_order": "rgb"}
    return dict(_APPLICATIONS[backbone]["preprocessing"])


def conv_bn_relu(x, filters, name, kernel_size=3, strides=1, dilation_rate=1):
    """Conv2D (no bias) -> BatchNormalization -> ReLU."""
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


# --- keras.applications encoders ---------------------------------------------


def _dilation_plan(backbone, output_stride):
    """Layer-config changes that turn strided stages into dilated ones.

    Returns ``{layer_name: {config_key: value}}`` (``None`` means: replace
    the layer by an identity).
    """
    plan = {}
    if output_stride == 32:
        return plan
    if backbone == "resnet50":
        # Keras' ResNet50 strides in the 1x1 convs of each stage's first block.
        if output_stride == 16:
            stages = {2: ("conv5", 3)}
        else:
            stages = {2: ("conv4", 6), 4: ("conv5", 3)}
        for rate, (stage, blocks) in stages.items():
            for conv in ("0", "1"):
                plan[f"{stage}_block1_{conv}_conv"] = {"strides": (1, 1)}
            for block in range(1, blocks + 1):
                plan[f"{stage}_block{block}_2_conv"] = {"dilation_rate": (rate, rate)}
        return plan
    # MobileNetV2: stride-2 blocks 6 (-> /16) and 13 (-> /32) use explicit
    # zero padding and a "valid" depthwise conv.
    strided = [13] if output_stride == 16 else [6, 13]
    rate = 1
    for block in range(1, 17):
        if block in strided:
            plan[f"block_{block}_pad"] = None
            plan[f"block_{block}_depthwise"] = {
                "strides": (1, 1),
                "padding": "same",
                "dilation_rate": (rate, rate),
            }
            rate *= 2
        elif rate > 1:
            plan[f"block_{block}_depthwise"] = {"dilation_rate": (rate, rate)}
    return plan


def _rebuild_dilated(app, plan, copy_weights):
    def clone_function(layer):
        if layer.name not in plan:
            return layer.__class__.from_config(layer.get_config())
        change = plan[layer.name]
        if change is None:
            return keras.layers.Identity(name=layer.name)
        config = layer.get_config()
        config.update(change)
        return layer.__class__.from_config(config)

    missing = sorted(set(plan) - {layer.name for layer in app.layers})
    if missing:  # a different Keras version renamed layers
        raise ModelError(
            f"Cannot dilate {app.name}: layers {missing} not found in this "
            "Keras version's application."
        )
    model = keras.models.clone_model(app, clone_function=clone_function)
    if copy_weights:
        for layer in model.layers:
            if layer.weights:
                layer.set_weights(app.get_layer(layer.name).get_weights())
    return model


def application_features(
    backbone, *, weights=None, strides=(2, 4, 8, 16, 32), output_stride=32, name=None
):
    """A ``keras.Model`` mapping preprocessed images to backbone features.

    Args:
        backbone: ``"resnet50"`` or ``"mobilenetv2"``.
        weights: ``None``, ``"imagenet"`` or a weights file path.
        strides: which nominal feature strides to return (subset of
            2, 4, 8, 16, 32), in that order.
        output_stride: 8, 16 or 32; with 8 or 16 the deeper stages are dilated
            and the features nominally at strides above ``output_stride`` come
            out at ``output_stride``.
        name: model name. Defaults to ``"<backbone>_encoder"``.

    Returns:
        A functional model with one output per entry of ``strides``.
    """
    spec = _APPLICATIONS[backbone]
    constructor = getattr(keras.applications, spec["constructor"])
    try:
        app = constructor(
            include_top=False, weights=weights, input_shape=(None, None, 3)
        )
    except (ValueError, OSError) as error:
        if weights in (None, "imagenet"):
            raise
        raise ModelError(
            f"Could not load {backbone} backbone weights from {weights}: {error}"
        ) from error
    plan = _dilation_plan(backbone, output_stride)
    if plan:
        app = _rebuild_dilated(app, plan, copy_weights=weights is not None)
    outputs = [app.get_layer(spec["features"][s]).output for s in strides]
    return keras.Model(app.inputs, outputs, name=name or f"{backbone}_encoder")
