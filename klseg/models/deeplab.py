"""DeepLabV3+ (Chen et al., 2018): dilated encoder, ASPP and a light decoder."""

import keras

from klseg.errors import InvalidArgumentError
from klseg.models import backbones as bb
from klseg.models._checks import (
    check_input_shape,
    check_num_classes,
    check_positive_int,
)
from klseg.models.layers import (
    BilinearUpsampling,
    ClassLogits,
    ImagePreprocessing,
    SpatialBroadcast,
)

__all__ = ["deeplabv3_plus"]

# Atrous rates of the three 3x3 ASPP branches (the paper's values).
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
LOW_LEVEL_FILTERS = 48


def _sep_conv_bn_relu(x, filters, name, dilation_rate=1):
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""
    x = keras.layers.DepthwiseConv2D(
        3,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        name=f"{name}_depthwise",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=bb.BN_MOMENTUM, name=f"{name}_depthwise_bn"
    )(x)
    x = keras.layers.ReLU(name=f"{name}_depthwise_relu")(x)
    return bb.conv_bn_relu(x, filters, f"{name}_pointwise", kernel_size=1)


def _plain_encoder(x, base_filters, output_stride):
    """Five conv stages (widths f, 2f, 4f, 8f, 8f), strided up to the output
    stride and dilated beyond it. Returns (stride-4 features, deep features)."""
    stride, rate, low = 1, 1, None
    for stage, mult in enumerate((1, 2, 4, 8, 8)):
        filters = base_filters * mult
        if stride < output_stride:
            stride *= 2
            first = {"strides": 2}
        else:
            rate *= 2
            first = {"dilation_rate": rate}
        x = bb.conv_bn_relu(x, filters, f"stage{stage}_a", **first)
        x = bb.conv_bn_relu(x, filters, f"stage{stage}_b", dilation_rate=rate)
        if stride == 4 and low is None:
            low = x
    return low, x


def _aspp(x, filters, rates):
    branches = [bb.conv_bn_relu(x, filters, "aspp_1x1", kernel_size=1)]
    for i, rate in enumerate(rates, start=1):
        branches.append(_sep_conv_bn_relu(x, filters, f"aspp_rate{i}", rate))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pooled = bb.conv_bn_relu(pooled, filters, "aspp_pool_proj", kernel_size=1)
    branches.append(SpatialBroadcast(name="aspp_pool_broadcast")([pooled, x]))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)
    x = bb.conv_bn_relu(x, filters, "aspp_proj", kernel_size=1)
    return keras.layers.Dropout(0.1, name="aspp_dropout")(x)


def deeplabv3_plus(
    num_classes,
    *,
    input_shape=(None, None, 3),
    backbone="resnet50",
    output_stride=16,
    class_names=None,
    weights=None,
    filters=256,
    base_filters=32,
    name="deeplabv3_plus",
):
    """DeepLabV3+ returning per-pixel logits at the input resolution.

    The encoder's last stages are dilated instead of strided so its deepest
    features have stride ``output_stride``; ASPP (a 1x1 branch, three
    depthwise-separable 3x3 branches with atrous rates 6, 12, 18 at output
    stride 16 or 12, 24, 36 at 8, and image pooling) runs on them. The
    decoder upsamples the ASPP output to stride 4, concatenates the encoder's
    stride-4 features (projected to 48 channels), applies two separable 3x3
    convs and the 1x1 classifier, and upsamples the logits 4x (bilinear).

    Args:
        num_classes: number of classes (output channels).
        input_shape: ``(height, width, 3)``; height and width may be ``None``
            (any multiple of ``output_stride``). Defaults to
            ``(None, None, 3)``.
        backbone: ``"resnet50"``, ``"mobilenetv2"`` or ``"plain"`` (five
            conv stages of widths ``base_filters * (1, 2, 4, 8, 8)``).
            Defaults to ``"resnet50"``.
        output_stride: 8 or 16; also the model's size multiple. Defaults
            to 16.
        class_names: optional list of ``num_classes`` names stored in the
            model. Defaults to ``None``.
        weights: backbone weights: ``None``, ``"imagenet"`` or a local weights
            file path (applications only). Defaults to ``None``.
        filters: width of ASPP and the decoder. Defaults to 256.
        base_filters: width of the first stage of the ``"plain"`` encoder
            (ignored by the applications). Defaults to 32.
        name: model name. Defaults to ``"deeplabv3_plus"``.

    Returns:
        A ``keras.Model`` mapping images (B, H, W, 3) with values in 0..255
        (uint8 or float) to float32 logits (B, H, W, num_classes).

    Raises:
        ValueError: (``klseg.errors.InvalidArgumentError``) for invalid
            arguments, including a static input size that is not a multiple
            of ``output_stride``.

    Example:

    >>> import numpy as np
    >>> model = deeplabv3_plus(2, backbone="plain", base_filters=8, filters=16)
    >>> tuple(model(np.zeros((1, 32, 32, 3), "uint8")).shape)
    (1, 32, 32, 2)
    """
    class_names = check_num_classes(num_classes, class_names)
    input_shape = check_input_shape(input_shape)
    bb.check_backbone(backbone)
    weights = bb.check_weights(backbone, weights)
    if output_stride not in ASPP_RATES:
        raise InvalidArgumentError(
            "`output_stride` must be 8 or 16. "
            f"Received: output_stride={output_stride!r}"
        )
    check_positive_int("filters", filters)
    check_positive_int("base_filters", base_filters)

    images = keras.Input(shape=input_shape, name="images")
    x = ImagePreprocessing(
        **bb.preprocessing_config(backbone),
        size_multiple=output_stride,
        name="preprocessing",
    )(images)
    if backbone == "plain":
        low, high = _plain_encoder(x, base_filters, output_stride)
    else:
        encoder = bb.application_features(
            backbone,
            weights=weights,
            strides=(4, 32),
            output_stride=output_stride,
            name=f"{backbone}_encoder",
        )
        low, high = encoder(x)

    x = _aspp(high, filters, ASPP_RATES[output_stride])
    x = BilinearUpsampling(output_stride // 4, name="decoder_up")(x)
    low = bb.conv_bn_relu(low, LOW_LEVEL_FILTERS, "decoder_low", kernel_size=1)
    x = keras.layers.Concatenate(name="decoder_concat")([x, low])
    x = _sep_conv_bn_relu(x, filters, "decoder_a")
    x = _sep_conv_bn_relu(x, filters, "decoder_b")
    logits = ClassLogits(
        num_classes, class_names=class_names, upsample=4, name="logits"
    )([x, images])
    return keras.Model(images, logits, name=name)
