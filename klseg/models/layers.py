"""Layers shared by every klseg model: input preprocessing and the logits head.

Both are registered under the ``klseg`` package, so a model saved with
``model.save("m.keras")`` loads with ``keras.saving.load_model`` after
``import klseg.models``.

``ImagePreprocessing`` is the first layer of every model: it takes images with
values in 0..255 (uint8 or float), normalises them, and knows the model's
size multiple (its total stride). ``ClassLogits`` is the last layer: a 1x1
convolution computed in float32, an optional bilinear upsampling, and a crop
back to the input size; it carries the class names.
"""

import keras
from keras import ops

from klseg.errors import InvalidArgumentError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagePreprocessing",
    "ClassLogits",
    "BilinearUpsampling",
    "SpatialBroadcast",
    "upsample_bilinear",
    "check_image_size",
    "check_training_size",
]

# ImageNet channel statistics in RGB order, in 0..255 units.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _static(dim):
    """Returns ``dim`` if it is a Python int, else ``None`` (unknown size)."""
    return dim if isinstance(dim, int) else None


def _nearest_valid(size, multiple):
    below = (size // multiple) * multiple
    above = below + multiple
    return [s for s in (below, above) if s > 0]


def upsample_bilinear(x, factor):
    """Bilinear upsampling of (B, H, W, C) by an integer ``factor``.

    Same values as ``tf.image.resize`` / ``jax.image.resize`` with
    ``"bilinear"`` (half-pixel centres, edges clamped), but written with
    shape-agnostic ``keras.ops`` so it also runs when H and W are unknown
    inside a TensorFlow graph (``keras.ops.image.resize`` needs static
    sizes there).
    """
    if factor == 1:
        return x
    for axis in (1, 2):
        x = _upsample_axis(x, factor, axis)
    return x


def _upsample_axis(x, factor, axis):
    def take(start, stop):
        index = [slice(None)] * 4
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    current = x
    previous = ops.concatenate([take(0, 1), take(0, -1)], axis=axis)
    following = ops.concatenate([take(1, None), take(-1, None)], axis=axis)
    phases = []
    for phase in range(factor):
        # Output pixel (i * factor + phase) sits at source coordinate
        # i + offset, between pixel i and its neighbour.
        offset = (phase + 0.5) / factor - 0.5
        if offset < 0:
            phases.append(current * (1 + offset) + previous * (-offset))
        else:
            phases.append(current * (1 - offset) + following * offset)
    y = ops.stack(phases, axis=axis + 1)
    shape = ops.shape(x)
    new_shape = [-1, shape[1], shape[2], x.shape[3]]
    new_shape[axis] = shape[axis] * factor
    return ops.reshape(y, new_shape)


@keras.saving.register_keras_serializable(package="klseg")
class BilinearUpsampling(keras.layers.Layer):
    """Bilinear upsampling by an integer factor that works for any size.

    ``keras.layers.UpSampling2D(interpolation="bilinear")`` fails inside a
    TensorFlow graph whose height and width are unknown (an exported serving
    function); this layer computes the same values with ``upsample_bilinear``.

    Args:
        factor: positive integer upsampling factor.
        **kwargs: standard layer arguments.
    """

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise InvalidArgumentError(
                f"`factor` must be a positive integer. Received: factor={factor!r}"
            )
        self.factor = factor

    def call(self, inputs):
        return upsample_bilinear(inputs, self.factor)

    def compute_output_spec(self, inputs):
        shape = list(inputs.shape)
        for axis in (1, 2):
            if shape[axis] is not None:
                shape[axis] *= self.factor
        return keras.KerasTensor(tuple(shape), dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(factor=self.factor)
        return config


def check_image_size(shape, multiple):
    """Raises if a static height or width is not a multiple of ``multiple``.

    Args:
        shape: image shape ``(batch, height, width, channels)``; unknown
            dimensions (``None`` or symbolic) are not checked.
        multiple: the model's size multiple.

    Raises:
        InvalidArgumentError: (a ``ValueError``) naming the nearest valid
            sizes, if a known height or width is not a multiple.
    """
    if len(shape) != 4:
        raise InvalidArgumentError(
            "Expected images of shape (batch, height, width, 3). "
            f"Received: shape={tuple(shape)}"
        )
    problems = []
    for axis_name, dim in (("height", shape[1]), ("width", shape[2])):
        dim = _static(dim)
        if dim is not None and dim % multiple:
            valid = " or ".join(str(s) for s in _nearest_valid(dim, multiple))
            problems.append(f"{axis_name} {dim} (nearest valid: {valid})")
    if problems:
        raise InvalidArgumentError(
            f"Image size is not a multiple of {multiple}, the size multiple "
            f"(total stride) of this model: {'; '.join(problems)}. Resize, "
            "crop or pad the images to a valid size, e.g. with "
            "keras.layers.Resizing or klseg.data.make_dataset(image_size=...). "
            f"Received: shape={tuple(_static(d) for d in shape)}"
        )


@keras.saving.register_keras_serializable(package="klseg")
class ImagePreprocessing(keras.layers.Layer):
    """Normalises images with values in 0..255 inside the model.

    Computes ``(x - mean) / std`` per channel in float32, optionally reverses
    the channel order (RGB to BGR, for backbones trained that way), and casts
    to the layer's compute dtype (float16/bfloat16 under mixed precision).

    The layer also checks the image size: a height or width that is known and
    not a multiple of ``size_multiple`` raises a ``ValueError`` naming the
    nearest valid sizes. Sizes that are unknown when the model is traced (a
    TensorFlow graph with ``None`` height/width, such as an exported serving
    function) cannot be checked; for those the layer pads the normalised image
    at the bottom and right with zeros (the mean colour) up to the next
    multiple, and ``ClassLogits`` crops the logits back to the input size.

    Args:
        mean: per-channel mean in 0..255 units, RGB order (or a single
            number). Defaults to the ImageNet mean.
        std: per-channel standard deviation in 0..255 units, RGB order (or a
            single number). Defaults to the ImageNet standard deviation.
        channel_order: ``"rgb"`` (keep) or ``"bgr"`` (reverse the channels
            after normalising). Defaults to ``"rgb"``.
        size_multiple: the model's total stride; heights and widths must be
            multiples of it. Defaults to 1.
        training_size: ``[height, width]`` of the images the model was
            trained at, recorded by ``klseg.models.set_training_size`` (the
            size later runs default to); not used in the computation.
            Defaults to ``None`` (unknown).
        **kwargs: standard layer arguments (``name``, ``dtype``, ...).

    Example:

    >>> import numpy as np
    >>> layer = ImagePreprocessing(mean=127.5, std=127.5, size_multiple=4)
    >>> y = layer(np.full((1, 8, 8, 3), 255, dtype="uint8"))
    >>> float(y[0, 0, 0, 0])
    1.0
    """

    def __init__(
        self,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channel_order="rgb",
        size_multiple=1,
        training_size=None,
        **kwargs,
    ):
        # No autocast: float images stay float32 until normalised, instead of
        # being rounded to the float16 compute dtype on the way in.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        mean = _per_channel("mean", mean)
        std = _per_channel("std", std)
        if any(s <= 0 for s in std):
            raise InvalidArgumentError(f"`std` must be positive. Received: std={std}")
        if channel_order not in ("rgb", "bgr"):
            raise InvalidArgumentError(
                '`channel_order` must be "rgb" or "bgr". '
                f"Received: channel_order={channel_order!r}"
            )
        if not isinstance(size_multiple, int) or size_multiple < 1:
            raise InvalidArgumentError(
                "`size_multiple` must be a positive integer. "
                f"Received: size_multiple={size_multiple!r}"
            )
        self.mean = mean
        self.std = std
        self.channel_order = channel_order
        self.size_multiple = size_multiple
        self.training_size = check_training_size(training_size)

    def call(self, images):
        check_image_size(images.shape, self.size_multiple)
        x = ops.cast(images, "float32")
        x = (x - ops.convert_to_tensor(self.mean, "float32")) / (
            ops.convert_to_tensor(self.std, "float32")
        )
        if self.channel_order == "bgr":
            x = ops.flip(x, axis=-1)
        m = self.size_multiple
        if m > 1 and (_static(x.shape[1]) is None or _static(x.shape[2]) is None):
            shape = ops.shape(x)
            pad_h = (m - shape[1] % m) % m
            pad_w = (m - shape[2] % m) % m
            x = ops.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        return ops.cast(x, self.compute_dtype)

    def compute_output_spec(self, images):
        # Traced symbolically only for the shape; the size check runs here so
        # that a model built with a bad static input_shape fails at once.
        check_image_size(images.shape, self.size_multiple)
        return keras.KerasTensor(images.shape, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            mean=list(self.mean),
            std=list(self.std),
            channel_order=self.channel_order,
            size_multiple=self.size_multiple,
            training_size=self.training_size,
        )
        return config


def check_training_size(size):
    if size is None:
        return None
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        height = width = 0
    if height < 1 or width < 1:
        raise InvalidArgumentError(
            "`training_size` must be [height, width] of positive integers or "
            f"None. Received: training_size={size!r}"
        )
    return [height, width]


def _per_channel(name, value):
    if isinstance(value, int | float):
        return [float(value)] * 3
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        values = None
    if values is None or len(values) != 3:
        raise InvalidArgumentError(
            f"`{name}` must be a number or 3 numbers (RGB). Received: {name}={value!r}"
        )
    return values


@keras.saving.register_keras_serializable(package="klseg")
class ClassLogits(keras.layers.Layer):
    """Per-pixel class logits at the input resolution, in float32.

    Called on ``[features, images]``: applies a 1x1 convolution to
    ``features`` (B, h, w, C_in) in float32, upsamples the logits
    bilinearly by ``upsample``, and crops them to the height and width of
    ``images`` (the model's input). The output is float32 whatever the dtype
    policy, so losses and softmax stay exact under mixed precision.

    The layer carries the class names; ``klseg.models.get_class_names`` reads
    them.

    Args:
        num_classes: number of classes. May be omitted when ``class_names``
            is given.
        class_names: optional list of ``num_classes`` strings. Defaults to
            ``None`` (names ``"class_0"``, ``"class_1"``, ...).
        upsample: integer bilinear upsampling factor applied to the logits.
            Defaults to 1.
        kernel_initializer: initializer of the 1x1 convolution kernel.
            Defaults to ``"glorot_uniform"``.
        **kwargs: standard layer arguments; ``dtype`` defaults to
            ``"float32"``.

    Example:

    >>> import numpy as np
    >>> head = ClassLogits(class_names=["sky", "road"], upsample=2)
    >>> logits = head([np.zeros((1, 4, 4, 8)), np.zeros((1, 8, 8, 3))])
    >>> tuple(logits.shape), keras.backend.standardize_dtype(logits.dtype)
    ((1, 8, 8, 2), 'float32')
    """

    def __init__(
        self,
        num_classes=None,
        class_names=None,
        upsample=1,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if num_classes is None:
                num_classes = len(class_names)
            if len(class_names) != num_classes:
                raise InvalidArgumentError(
                    f"`class_names` has {len(class_names)} names but "
                    f"num_classes={num_classes}. Received: class_names={class_names}"
                )
            if len(set(class_names)) != len(class_names):
                raise InvalidArgumentError(
                    f"`class_names` must be unique. Received: class_names={class_names}"
                )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise InvalidArgumentError(
                "`num_classes` must be a positive integer (or give `class_names`). "
                f"Received: num_classes={num_classes!r}"
            )
        if not isinstance(upsample, int) or upsample < 1:
            raise InvalidArgumentError(
                "`upsample` must be a positive integer. "
                f"Received: upsample={upsample!r}"
            )
        self.num_classes = num_classes
        self.class_names = class_names
        self.upsample = upsample
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        features_shape = input_shape[0]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(features_shape[-1], self.num_classes),
            initializer=self.kernel_initializer,
        )
        self.bias = self.add_weight(
            name="bias", shape=(self.num_classes,), initializer="zeros"
        )

    def call(self, inputs):
        features, images = inputs
        x = ops.cast(features, "float32")
        logits = ops.matmul(x, ops.cast(self.kernel, "float32"))
        logits = logits + ops.cast(self.bias, "float32")
        logits = upsample_bilinear(logits, self.upsample)
        height, width = images.shape[1], images.shape[2]
        if (
            _static(height) is None
            or _static(width) is None
            or _static(logits.shape[1]) != height
            or _static(logits.shape[2]) != width
        ):
            image_shape = ops.shape(images)
            logits = logits[:, : image_shape[1], : image_shape[2], :]
        return logits

    def compute_output_spec(self, inputs):
        features, images = inputs
        return keras.KerasTensor(
            (features.shape[0], images.shape[1], images.shape[2], self.num_classes),
            dtype="float32",
        )

    def compute_output_shape(self, input_shape):
        features_shape, images_shape = input_shape
        return (features_shape[0], images_shape[1], images_shape[2], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            class_names=None if self.class_names is None else list(self.class_names),
            upsample=self.upsample,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="klseg")
class SpatialBroadcast(keras.layers.Layer):
    """Broadcasts (B, 1, 1, C) features to the height and width of a reference.

    Called on ``[pooled, reference]``; used by the image-pooling branch of
    ASPP so that it works for any (also unknown) feature-map size.
    """

    def call(self, inputs):
        pooled, reference = inputs
        return ops.zeros_like(reference[..., :1], dtype=pooled.dtype) + pooled

    def compute_output_spec(self, inputs):
        pooled, reference = inputs
        shape = (reference.shape[0], reference.shape[1], reference.shape[2])
        return keras.KerasTensor((*shape, pooled.shape[-1]), dtype=pooled.dtype)
