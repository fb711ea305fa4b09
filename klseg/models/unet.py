"""U-Net (Ronneberger et al., 2015) with a plain or keras.applications encoder."""

import keras

from klseg.models import backbones as bb
from klseg.models._checks import (
    check_input_shape,
    check_num_classes,
    check_positive_int,
)
from klseg.models.layers import ClassLogits, ImagePreprocessing

__all__ = ["unet"]


def unet(
    num_classes,
    *,
    input_shape=(None, None, 3),
    backbone="plain",
    base_filters=None,
    depth=None,
    class_names=None,
    weights=None,
    name="unet",
):
    """U-Net returning per-pixel logits at the input resolution.

    The encoder halves the resolution ``depth`` times; the decoder doubles it
    back (nearest-neighbour upsampling, concatenation with the encoder
    feature map of the same stride, two 3x3 conv + batch-norm + ReLU). The
    decoder block at stride ``2**k`` has ``base_filters * 2**k`` filters.

    ``backbone="plain"`` is the classic encoder (two 3x3 conv + BN + ReLU per
    level, ``base_filters * 2**k`` filters, 2x2 max-pooling). With
    ``"resnet50"`` or ``"mobilenetv2"`` the encoder is the
    ``keras.applications`` model (its feature maps at strides 2 .. 32 are the
    skips) and the decoder ends with one extra block at full resolution.

    Small and fast: ``unet(n, base_filters=16, depth=3)`` has about 0.47 M
    parameters and trains on 64x64 images on a CPU in minutes.

    Args:
        num_classes: number of classes (output channels).
        input_shape: ``(height, width, 3)``; height and width may be ``None``
            (any multiple of ``2**depth``). Defaults to ``(None, None, 3)``.
        backbone: ``"plain"``, ``"resnet50"`` or ``"mobilenetv2"``.
            Defaults to ``"plain"``.
        base_filters: filters of the full-resolution level. Defaults to 32
            for ``"plain"`` and 16 for the applications (decoder widths
            256, 128, 64, 32, 16 as in segmentation_models).
        depth: number of 2x downsamplings; the model's size multiple is
            ``2**depth``. Defaults to 4 for ``"plain"`` (at most 6) and 5 for
            the applications (at most 5; fewer uses only the first stages).
        class_names: optional list of ``num_classes`` names stored in the
            model. Defaults to ``None`` (``"class_0"``, ...).
        weights: backbone weights: ``None``, ``"imagenet"`` or a local weights
            file path (applications only). Defaults to ``None``.
        name: model name. Defaults to ``"unet"``.

    Returns:
        A ``keras.Model`` mapping images (B, H, W, 3) with values in 0..255
        (uint8 or float) to float32 logits (B, H, W, num_classes).

    Raises:
        ValueError: (``klseg.errors.InvalidArgumentError``) for invalid
            arguments, including a static input size that is not a multiple
            of ``2**depth``.

    Example:

    >>> import numpy as np
    >>> model = unet(3, base_filters=8, depth=2)
    >>> tuple(model(np.zeros((1, 32, 32, 3), "uint8")).shape)
    (1, 32, 32, 3)
    """
    class_names = check_num_classes(num_classes, class_names)
    input_shape = check_input_shape(input_shape)
    bb.check_backbone(backbone)
    weights = bb.check_weights(backbone, weights)
    plain = backbone == "plain"
    if base_filters is None:
        base_filters = 32 if plain else 16
    if depth is None:
        depth = 4 if plain else 5
    check_positive_int("base_filters", base_filters)
    check_positive_int("depth", depth, maximum=6 if plain else 5)

    images = keras.Input(shape=input_shape, name="images")
    x = ImagePreprocessing(
        **bb.preprocessing_config(backbone),
        size_multiple=2**depth,
        name="preprocessing",
    )(images)

    if plain:
        skips = {}
        for level in range(depth):
            filters = base_filters * 2**level
            x = bb.conv_bn_relu(x, filters, f"enc{level}_a")
            x = bb.conv_bn_relu(x, filters, f"enc{level}_b")
            skips[level] = x
            x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
        filters = base_filters * 2**depth
        x = bb.conv_bn_relu(x, filters, "bottleneck_a")
        x = bb.conv_bn_relu(x, filters, "bottleneck_b")
    else:
        strides = [2**k for k in range(1, depth + 1)]
        encoder = bb.application_features(
            backbone, weights=weights, strides=strides, name=f"{backbone}_encoder"
        )
        features = encoder(x)
        if not isinstance(features, list | tuple):
            features = [features]
        # Skip at stride 2**k is features[k - 1]; level 0 (full res) has none.
        skips = {k: features[k - 1] for k in range(1, depth)}
        x = features[-1]

    for level in reversed(range(depth)):
        x = keras.layers.UpSampling2D(2, name=f"dec{level}_up")(x)
        if level in skips:
            x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        filters = base_filters * 2**level
        x = bb.conv_bn_relu(x, filters, f"dec{level}_a")
        x = bb.conv_bn_relu(x, filters, f"dec{level}_b")

    logits = ClassLogits(num_classes, class_names=class_names, name="logits")(
        [x, images]
    )
    return keras.Model(images, logits, name=name)
