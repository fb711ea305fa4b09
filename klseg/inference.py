"""Inference on images of any size: padding, sliding windows, flip TTA.

:func:`predict_probabilities` returns per-pixel class probabilities for a
batch of images whose height and width need not be multiples of the model's
size multiple (``klseg.models.size_multiple(model)``), optionally predicted
in overlapping windows (tiles) and averaged with the horizontally flipped
image. :func:`predict_classes` returns the argmax.

How it is computed:

1. **Padding.** Each image is padded at the bottom and right to the next
   multiple of the size multiple, with zeros (``pad_mode="constant"``, the
   default: the padding of the SavedModel export, so whole-image predictions
   equal the served model's) or by reflection (``pad_mode="reflect"``: the
   padded band looks like image content, so pixels near the bottom and right
   edges are not predicted next to a black band). The padded part is cropped
   off the result.
2. **Windows.** Without ``tile_size`` the whole padded image is one window.
   With ``tile_size=(th, tw)`` (each a multiple of the size multiple), a tile
   larger than the padded image is clamped to it (one window along that
   axis). Along each axis the stride is ``tile * (1 - tile_overlap)``
   rounded to the nearest multiple of the size multiple (at least one size
   multiple); window ``i`` starts at ``min(i * stride, size - tile)``, so the
   last window ends at the image edge (mmsegmentation's ``slide_inference``
   does the same). Every window start is then a multiple of the size
   multiple, and every window sees the pooling grid of the whole image.
3. **Model.** The windows of all images go through the model in batches of
   ``batch_size``; the logits become probabilities with a softmax computed
   in float64 on the host.
4. **Blending.** Where windows overlap, the probabilities are averaged with
   weights ``w(y, x) = wy(y) * wx(x)``: along an axis, a window's weight
   rises linearly from its edge across the nominal overlap ``r = tile -
   stride``, ``min(1, (d + 0.5) / r)`` at distance ``d`` pixels from that
   edge, except on a side that lies on the image border (no neighbour
   there), where it stays 1. Two neighbouring windows then cross-fade: in
   their overlap the two weights sum to 1, and each pixel leans on the
   window in which it sits further from the edge, i.e. where the network saw
   more context around it. The weighted sum is divided by the sum of the
   weights at each pixel, so the result is always a weighted mean of
   probabilities (the last window, aligned to the edge, may overlap more
   than ``r``; the division covers that). With ``tile_overlap=0`` every
   weight is 1 (a plain mean where the last window overlaps).
   Sums are accumulated in float64, so the result does not depend on the
   order of windows; a model whose output at a pixel depends only on that
   pixel gives exactly the whole-image result.
5. **Flip TTA.** ``tta="flip"`` also predicts the horizontally flipped image
   (same padding and windows, on the flipped image), flips the result back
   and returns the mean of the two probability maps.

The model runs through Keras (any backend); padding, windows and blending
are NumPy on the host. NumPy and Keras load on first use:
:class:`InferenceOptions` and the argument checks are standard library only,
so the run configs (``klseg.runs.configs``) build on them.
"""

import dataclasses
import math
import numbers

from klseg.errors import InvalidArgumentError, ModelError

__all__ = [
    "MAX_TILE_OVERLAP",
    "PAD_MODES",
    "TTA_MODES",
    "InferenceOptions",
    "check_size_multiple",
    "check_tile_size",
    "predict_classes",
    "predict_probabilities",
    "tile_weights",
    "window_starts",
]

#: Test-time augmentations :func:`predict_probabilities` accepts.
TTA_MODES = ("none", "flip")
#: Padding modes up to the size multiple.
PAD_MODES = ("constant", "reflect")
#: Largest ``tile_overlap`` (0.9: ten windows per pixel along an axis).
MAX_TILE_OVERLAP = 0.9


def _fail(message):
    raise InvalidArgumentError(message)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _show_size(size):
    return f"{size[0]}x{size[1]}" if isinstance(size, tuple) else repr(size)


def check_tile_size(tile_size, size_multiple=1, *, name="tile_size"):
    """``tile_size`` as ``(height, width)``, or None; refuses bad values.

    Args:
        tile_size: None, a positive integer (a square) or a pair of positive
            integers ``(height, width)``.
        size_multiple: each side must be a multiple of it. Defaults to 1.
        name: the argument named in errors. Defaults to ``"tile_size"``.

    Returns:
        ``(height, width)`` as Python ints, or None.

    Raises:
        ValueError: (``InvalidArgumentError``) naming ``name`` and the value;
            for a side that is not a multiple, the nearest valid sides.

    Example:

    >>> check_tile_size(64, 32), check_tile_size((64, 96), 32)
    ((64, 64), (64, 96))
    """
    if tile_size is None:
        return None
    if _is_int(tile_size):
        size = (int(tile_size), int(tile_size))
    elif (
        isinstance(tile_size, (tuple, list))
        and len(tile_size) == 2
        and all(_is_int(v) for v in tile_size)
    ):
        size = (int(tile_size[0]), int(tile_size[1]))
    else:
        _fail(
            f"{name} must be a positive integer or a pair (height, width) of "
            f"positive integers. Received: {name}={tile_size!r}"
        )
    if min(size) < 1:
        _fail(f"{name} must be positive. Received: {name}={_show_size(size)}")
    check_size_multiple(size, size_multiple, name=name, shown=_show_size(size))
    return size


def check_size_multiple(size, size_multiple, *, name, shown):
    """Refuse a ``(height, width)`` with a side that is no multiple of the
    model's size multiple, naming ``name``, the nearest valid sides and the
    value received (written ``shown``).

    Raises:
        ValueError: (``InvalidArgumentError``) for the first such side.

    Example:

    >>> check_size_multiple((64, 96), 32, name="tile_size", shown="64x96")
    """
    bad = [side for side in size if side % size_multiple]
    if bad:
        side = bad[0]
        lower = max(size_multiple, side // size_multiple * size_multiple)
        upper = lower + size_multiple if lower < side else lower
        _fail(
            f"{name} must be a multiple of the model's size multiple "
            f"{size_multiple} in height and width; the nearest valid sizes for "
            f"{side} are {lower} and {upper}. Received: {name}={shown}"
        )


def _check_overlap(tile_overlap):
    ok = (
        isinstance(tile_overlap, numbers.Real)
        and not isinstance(tile_overlap, bool)
        and math.isfinite(tile_overlap)
        and 0 <= tile_overlap <= MAX_TILE_OVERLAP
    )
    if not ok:
        _fail(
            f"tile_overlap must be a number in [0, {MAX_TILE_OVERLAP:g}]. "
            f"Received: tile_overlap={tile_overlap!r}"
        )
    return float(tile_overlap)


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        _fail(f"{name} must be one of {', '.join(choices)}. Received: {name}={value!r}")


@dataclasses.dataclass(kw_only=True)
class InferenceOptions:
    """How images are predicted: windows and test-time augmentation.

    The model-independent part of :func:`predict_probabilities`'s
    arguments, checked when the object is made (a side's multiple of the
    model's size multiple is checked once the model is known). The run
    configs of ``klseg evaluate`` and ``klseg predict`` extend it.

    Args:
        tile_size: None, N (a square) or ``(height, width)``; stored as a
            pair. Defaults to None (whole images).
        tile_overlap: in ``[0, 0.9]``. Defaults to 0.
        tta: one of ``TTA_MODES``. Defaults to ``"none"``.
    """

    tile_size: tuple | None = None
    tile_overlap: float = 0.0
    tta: str = "none"

    def __post_init__(self):
        self.tile_size = check_tile_size(self.tile_size)
        self.tile_overlap = _check_overlap(self.tile_overlap)
        _check_choice("tta", self.tta, TTA_MODES)

    @property
    def is_plain(self):
        """True for whole-image inference without augmentation."""
        return self.tile_size is None and self.tta == "none"

    def inference_kwargs(self):
        """``{"tile_size", "tile_overlap", "tta"}`` for
        :func:`predict_probabilities`."""
        return {
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "tta": self.tta,
        }


def _stride(tile, overlap, multiple):
    """``tile * (1 - overlap)`` rounded to the nearest multiple (>= multiple)."""
    steps = math.floor(tile * (1.0 - overlap) / multiple + 0.5)
    return max(1, steps) * multiple


def window_starts(size, tile, stride):
    """Start of each window along an axis of ``size`` pixels.

    ``tile`` is clamped to ``size``; window ``i`` starts at ``min(i * stride,
    size - tile)``, so the last one ends at the edge.

    Example:

    >>> window_starts(100, 40, 30)
    [0, 30, 60]
    >>> window_starts(20, 40, 30)
    [0]
    """
    tile = min(tile, size)
    count = max(math.ceil((size - tile) / stride), 0) + 1
    return [min(i * stride, size - tile) for i in range(count)]


def tile_weights(start, tile, size, ramp):
    """Blending weights (float64, ``tile``) of a window along one axis.

    Linear from a window edge inside the image across ``ramp`` pixels,
    ``min(1, (d + 0.5) / ramp)`` at distance ``d`` from that edge; 1 on a side
    on the image border and everywhere when ``ramp`` is 0.

    Example:

    >>> tile_weights(0, 4, 6, 2).tolist()
    [1.0, 1.0, 0.75, 0.25]
    """
    import numpy as np

    weights = np.ones(tile)
    if ramp <= 0:
        return weights
    distance = np.arange(tile, dtype=np.float64) + 0.5
    if start > 0:
        weights = np.minimum(weights, distance / ramp)
    if start + tile < size:
        weights = np.minimum(weights, distance[::-1] / ramp)
    return weights


def _softmax64(logits):
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _blend(images, forward, tile, overlap, multiple, batch_size):
    """Blended float64 probabilities of ``images`` (already padded)."""
    import numpy as np

    count, height, width = images.shape[:3]
    th, tw = (height, width) if tile is None else tile
    th, tw = min(th, height), min(tw, width)
    sy, sx = _stride(th, overlap, multiple), _stride(tw, overlap, multiple)
    ys, xs = window_starts(height, th, sy), window_starts(width, tw, sx)
    weight_y = [tile_weights(y, th, height, th - sy) for y in ys]
    weight_x = [tile_weights(x, tw, width, tw - sx) for x in xs]
    windows = [
        (b, i, j) for b in range(count) for i in range(len(ys)) for j in range(len(xs))
    ]
    total = None
    weight_sum = np.zeros((height, width), dtype=np.float64)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            weight_sum[y : y + th, x : x + tw] += np.outer(weight_y[i], weight_x[j])
    for start in range(0, len(windows), batch_size):
        part = windows[start : start + batch_size]
        batch = np.stack(
            [images[b, ys[i] : ys[i] + th, xs[j] : xs[j] + tw] for b, i, j in part]
        )
        probs = _softmax64(_to_numpy(forward(batch)))
        if probs.shape[:3] != batch.shape[:3]:
            raise ModelError(
                f"the model returned an output of shape {probs.shape} for windows "
                f"of shape {batch.shape}; expected per-pixel logits "
                f"({batch.shape[0]}, {th}, {tw}, num_classes)."
            )
        if total is None:
            total = np.zeros((count, height, width, probs.shape[-1]), np.float64)
        for k, (b, i, j) in enumerate(part):
            w = np.outer(weight_y[i], weight_x[j])[..., None]
            total[b, ys[i] : ys[i] + th, xs[j] : xs[j] + tw] += w * probs[k]
    return total / weight_sum[None, :, :, None]


def _to_numpy(tensor):
    import keras

    return keras.ops.convert_to_numpy(tensor)


def predict_probabilities(
    model,
    images,
    *,
    tile_size=None,
    tile_overlap=0.0,
    tta="none",
    batch_size=8,
    pad_mode="constant",
    size_multiple=None,
    forward=None,
    dtype="float32",
):
    """Per-pixel class probabilities of ``model`` on images of any size.

    Pads each image to the model's size multiple, predicts it whole or in
    overlapping windows, blends the windows with linear cross-fade weights,
    optionally averages with the horizontal flip, and crops back (see the
    module docstring for every step and the weights).

    Args:
        model: a klseg segmentation model (images in 0..255 to logits).
        images: array ``(B, H, W, 3)`` of any height and width.
        tile_size: window ``(height, width)`` or one integer for a square;
            each side a multiple of the size multiple. A side larger than
            the padded image is clamped to it. Defaults to None (the whole
            padded image in one window).
        tile_overlap: fraction of a window shared with its neighbour, in
            ``[0, 0.9]``; the stride is ``tile * (1 - tile_overlap)``
            rounded to a multiple of the size multiple. Defaults to 0.
        tta: ``"none"`` or ``"flip"`` (mean with the prediction on the
            horizontally flipped image, flipped back). Defaults to
            ``"none"``.
        batch_size: windows per model call. Defaults to 8.
        pad_mode: ``"constant"`` (zeros, as the SavedModel export) or
            ``"reflect"`` for the padding up to the size multiple. Defaults
            to ``"constant"``.
        size_multiple: overrides ``klseg.models.size_multiple(model)`` (for
            a model that is not a klseg model). Defaults to None.
        forward: ``windows -> logits`` to call instead of
            :func:`klseg.models.predict_logits`. Defaults to None.
        dtype: ``"float32"`` or ``"float64"`` for the result (sums are
            float64 either way). Defaults to ``"float32"``.

    Returns:
        NumPy array ``(B, H, W, num_classes)`` of probabilities (each pixel
        sums to 1).

    Raises:
        ValueError: (``InvalidArgumentError``) for an argument out of range;
            the message names it and its value.
        klseg.errors.ModelError: ``model`` is no klseg model and no
            ``size_multiple`` is given.

    Example:

    >>> import numpy as np, klseg.models
    >>> model = klseg.models.build("unet", num_classes=3, base_filters=4, depth=2)
    >>> images = np.zeros((1, 30, 50, 3), dtype="uint8")
    >>> probs = predict_probabilities(model, images, tile_size=16, tile_overlap=0.5)
    >>> probs.shape, bool(np.allclose(probs.sum(-1), 1))
    ((1, 30, 50, 3), True)
    """
    import numpy as np

    images = np.asarray(images)
    if images.ndim != 4:
        _fail(
            "images must be a batch (B, H, W, channels); for one image use "
            f"images[None]. Received: images.shape={images.shape}"
        )
    if min(images.shape[:3]) < 1:
        _fail(f"images must not be empty. Received: images.shape={images.shape}")
    if size_multiple is None:
        from klseg import models

        try:
            size_multiple = models.size_multiple(model)
        except ModelError as e:
            raise ModelError(
                f"{e} For another Keras model, pass size_multiple."
            ) from None
    elif not _is_int(size_multiple) or size_multiple < 1:
        _fail(
            "size_multiple must be a positive integer. "
            f"Received: size_multiple={size_multiple!r}"
        )
    tile = check_tile_size(tile_size, size_multiple)
    overlap = _check_overlap(tile_overlap)
    _check_choice("tta", tta, TTA_MODES)
    _check_choice("pad_mode", pad_mode, PAD_MODES)
    _check_choice("dtype", dtype, ("float32", "float64"))
    if not _is_int(batch_size) or batch_size < 1:
        _fail(
            "batch_size must be a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    from klseg.models import predict_logits

    forward = forward or (lambda windows: predict_logits(model, windows))
    height, width = images.shape[1:3]

    def run(batch):
        pad_h, pad_w = (-height) % size_multiple, (-width) % size_multiple
        padded = np.pad(batch, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), pad_mode)
        blended = _blend(padded, forward, tile, overlap, size_multiple, batch_size)
        return blended[:, :height, :width]

    probs = run(images)
    if tta == "flip":
        probs += run(images[:, :, ::-1])[:, :, ::-1]
        probs /= 2.0
    return probs.astype(dtype)


def predict_classes(model, images, **kwargs):
    """Argmax class (int32, ``(B, H, W)``) of :func:`predict_probabilities`.

    Takes the same arguments.
    """
    import numpy as np

    kwargs["dtype"] = "float64"  # argmax before rounding to float32
    probs = predict_probabilities(model, images, **kwargs)
    return np.argmax(probs, axis=-1).astype(np.int32)
