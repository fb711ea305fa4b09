"""Channel-wise distillation: a divergence over pixels, per channel.

``channel_wise_kl_divergence`` and ``ChannelWiseKLDivergence`` (Shu et al.,
"Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021) take
the softmax over the spatial positions of each channel rather than over the
classes of each pixel, so their values are per (image, channel), not per
pixel.
"""

import keras
import numpy as np
from keras import ops

from klseg.losses.base import DivergenceLoss, mark_valid
from klseg.losses.checks import check_ignore_class, class_axis_size
from klseg.losses.divergences import kl_between_logits
from klseg.ops import (
    LOG_FLOOR,
    TEMPERATURE_RANGE,
    as_float32,
    check_argument,
    check_temperature,
    to_tensor,
)

__all__ = ["channel_wise_kl_divergence", "ChannelWiseKLDivergence"]

#: Largest finite float32 (about 3.4e38).
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The shifted logit of a left-out pixel: ``2 * LOG_FLOOR * T_max``, below
#: ``LOG_FLOOR * T`` for every accepted temperature ``T``.
_MASKED_LOGIT = 2.0 * LOG_FLOOR * TEMPERATURE_RANGE[1]


def _check_spatial_pair(y_true, y_pred):
    """Both (batch, height, width, channels) with the same batch and channels."""
    a, b = tuple(y_true.shape), tuple(y_pred.shape)

    def same(x, y):
        return x is None or y is None or x == y

    if len(a) != 4 or len(b) != 4 or not (same(a[0], b[0]) and same(a[3], b[3])):
        raise ValueError(
            "Channel-wise distillation takes teacher logits `y_true` and "
            "student logits `y_pred` of shape (batch, height, width, channels) "
            "with the same batch size and channels (the heights and widths may "
            "differ: the student is resized to the teacher's size). "
            f"Received: y_true.shape={a}, y_pred.shape={b}"
        )


def _resize_to_teacher(y_true, y_pred):
    """The student's logits resized (bilinear) to the teacher's height and width.

    Resized only when both sizes are known when the function is traced (as
    they are for fixed-size batches) and differ; ``keras.ops.image.resize``
    needs static sizes inside a TensorFlow graph. Unknown sizes are taken to
    be equal.
    """
    size, current = tuple(y_true.shape[1:3]), tuple(y_pred.shape[1:3])
    if None in size or None in current or size == current:
        return y_pred
    return ops.image.resize(
        y_pred, size, interpolation="bilinear", data_format="channels_last"
    )


def _pixel_map(x, y_true, name="mask"):
    """``x`` broadcast to the teacher's (batch, height, width).

    ``x`` may have a trailing axis of size 1 and axes of size 1 that
    broadcast (``(batch, 1, 1)`` for one value per image).
    """
    x = to_tensor(x)
    if len(x.shape) == 4 and x.shape[-1] == 1:
        x = ops.squeeze(x, -1)
    a, b = tuple(x.shape), tuple(y_true.shape[:3])
    compatible = len(a) == 3 and all(
        u is None or v is None or u == v or u == 1 for u, v in zip(a, b)
    )
    if not compatible:
        raise ValueError(
            f"`{name}` must have the teacher's shape without the channels, "
            f"{b} (or with a trailing 1, or axes of size 1 that broadcast). "
            f"Received: {name}.shape={a}, y_true.shape={tuple(y_true.shape)}"
        )
    return ops.broadcast_to(x, ops.shape(y_true)[:3])


def _pixel_mask(mask, y_true):
    """A (batch, height, width) bool mask from ``mask`` (bool or numbers)."""
    mask = _pixel_map(mask, y_true)
    if mask.dtype != "bool":
        mask = as_float32(mask) > 0
    return mask


def _spatial_rows(x, keep):
    """(batch, channels, pixels) logits whose softmax leaves out ``~keep``.

    Each row is shifted by its maximum over the kept pixels (a constant, so
    the softmax is unchanged and its gradient exact), which brings every
    kept value to at most 0; the left-out pixels get a fill value far
    enough below that ``klseg.ops.log_softmax`` floors them at ``LOG_FLOOR``
    (probability exactly 0) at any temperature in ``TEMPERATURE_RANGE``.
    """
    shape = ops.shape(x)
    x = ops.reshape(ops.transpose(x, (0, 3, 1, 2)), (shape[0], x.shape[3], -1))
    if keep is None:
        return x
    top = ops.max(ops.where(keep, x, -_FLOAT32_MAX), axis=-1, keepdims=True)
    top = ops.stop_gradient(ops.where(top > -_FLOAT32_MAX, top, 0.0))
    return ops.where(keep, x - top, _MASKED_LOGIT)


def channel_wise_kl_divergence(y_true, y_pred, *, temperature=2.0, mask=None):
    """Channel-wise distillation: KL between spatial softmaxes, per channel.

    For each image ``b`` and channel ``c`` (Shu et al., "Channel-wise
    Knowledge Distillation for Dense Prediction", ICCV 2021), the teacher's
    and the student's logits of that channel are turned into distributions
    over the image's kept pixels ``i``:

        P_bc(i) = softmax_i(t_bci / T),   Q_bc(i) = softmax_i(s_bci / T)
        value_bc = T^2 * sum_i P_bc(i) * (log P_bc(i) - log Q_bc(i))

    computed in float32 from ``log_softmax`` (a ``logsumexp`` over pixels),
    whatever the input dtype. Pixels left out by ``mask`` are removed from
    both softmaxes. The loss of the paper is the mean of ``value_bc`` over
    images and channels (what ``ChannelWiseKLDivergence`` returns).

    The student may have another height and width than the teacher (a
    different output stride): its logits are resized, bilinearly (half-pixel
    centres, as ``keras.ops.image.resize``), to the teacher's size before
    the softmax. The teacher's map is the target, so it is left as it is,
    the mask lives at its resolution, and the gradient reaches every
    student logit through the resize. Resizing needs both sizes known when
    the function is traced; unknown sizes must be equal.

    Values are finite, and so are their gradients, for every finite input,
    as for ``kl_divergence``: log-probabilities are floored at ``LOG_FLOOR``.

    Args:
        y_true: Teacher logits ``(batch, height, width, channels)``.
        y_pred: Student logits ``(batch, h, w, channels)``, the same batch
            size and channels as the teacher.
        temperature: Positive temperature ``T`` in ``TEMPERATURE_RANGE``.
            Defaults to 2.0.
        mask: Optional ``(batch, height, width)`` mask at the teacher's size
            (or with a trailing 1), bool or numbers: pixels where it is
            False or not positive are left out of both softmaxes. Defaults
            to None (every pixel counts).

    Returns:
        float32 tensor ``(batch, channels)`` of ``value_bc``. An image with
        no kept pixel has no distribution; its values are 0 (with zero
        gradient).

    Raises:
        ValueError: For an invalid temperature, or inputs that are not
            ``(batch, height, width, channels)`` with matching batch size
            and channels.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([3.0, 1.0])).reshape(1, 1, 2, 1)
    >>> student = np.zeros((1, 1, 2, 1))
    >>> kl = channel_wise_kl_divergence(teacher, student, temperature=1.0)
    >>> tuple(kl.shape), round(float(kl[0, 0]), 4)  # KL((.75, .25) || (.5, .5))
    ((1, 1), 0.1308)
    """
    temperature = check_temperature(temperature)
    y_true, y_pred = as_float32(y_true), as_float32(y_pred)
    _check_spatial_pair(y_true, y_pred)
    class_axis_size(y_true, "y_true")
    y_pred = _resize_to_teacher(y_true, y_pred)
    keep = None if mask is None else _pixel_mask(mask, y_true)
    if keep is not None:
        keep = ops.reshape(keep, (ops.shape(keep)[0], 1, -1))
    a = _spatial_rows(y_true, keep)
    b = _spatial_rows(y_pred, keep)
    values = kl_between_logits(a, b, temperature)
    if temperature != 1.0:
        values = values * (temperature * temperature)
    if keep is not None:
        values = ops.where(ops.any(keep, axis=-1), values, 0.0)
    return values


@keras.saving.register_keras_serializable(package="klseg")
class ChannelWiseKLDivergence(DivergenceLoss):
    """Channel-wise distillation loss (Shu et al., ICCV 2021).

        loss = mean over images and channels of
               T^2 * KL(softmax_i(t_bc / T) || softmax_i(s_bc / T))

    where each softmax runs over the kept pixels ``i`` of one image ``b``
    and one channel ``c``; see ``channel_wise_kl_divergence``. Use it as
    ``loss(teacher_logits, student_logits, sample_weight=None, labels=None)``
    with logits ``(batch, height, width, channels)``; the student may have
    another height and width (it is resized bilinearly to the teacher's).

    Which pixels are kept (left out pixels are removed from both softmaxes,
    not only weighted zero):

    - ``labels`` with ``ignore_class``: integer labels ``(batch, height,
      width)`` (or with a trailing 1) at the teacher's size, passed to the
      call; pixels whose label equals ``ignore_class`` are left out. Only
      this comparison is made (the channels need not be classes). Labels
      are required when ``ignore_class`` is set and refused otherwise.
    - A per-pixel ``sample_weight`` (rank 3, or 4 with a trailing 1, at the
      teacher's size; axes of size 1 broadcast): pixels whose weight is 0
      (or negative) are left out; the image's values are then multiplied by
      the mean weight of its kept pixels, so a 0/1 mask leaves them as they
      are and a constant positive weight ``(batch, 1, 1)`` scales the image
      as ``(batch,)`` does. This is the way to mask pixels through
      ``compile``/``fit``, where the loss receives no labels.

    Both may be given; a pixel is kept when both keep it. Other
    ``sample_weight`` shapes are Keras': a scalar, per image ``(batch,)``,
    or per image and channel ``(batch, channels)``; they multiply the
    values and leave the denominator alone (a per-image weight of 0 keeps
    the image in the mean, as in Keras, where an image whose per-pixel
    weights are all 0 is left out of it).

    The values are per image and channel, ``(batch, channels)``, and the
    denominator is Keras': with the default ``"sum_over_batch_size"``
    reduction, the number of counted (image, channel) pairs. An image with
    no kept pixel has no distribution: it contributes 0 and is left out of
    the mean (a batch with no kept pixel gives 0 and a zero gradient). So
    the loss of a batch is the mean of the per-image losses over the images
    that have a kept pixel. Under ``tf.distribute`` each replica takes this
    mean over its own images and Keras averages the replicas' means.

    Args:
        temperature: Positive temperature ``T`` in ``[1e-3, 1e3]``
            (``klseg.ops.TEMPERATURE_RANGE``). Defaults to 2.0.
        ignore_class: None, or the label value (e.g. 255) whose pixels are
            left out; requires ``labels`` in each call. Defaults to None.
        reduction: Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: Defaults to ``"channel_wise_kl_divergence"``.
        dtype: Keras loss dtype (the computation itself is float32).
            Defaults to None.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([3.0, 1.0, 9.0])).reshape(1, 1, 3, 1)
    >>> student = np.zeros((1, 1, 3, 1))
    >>> labels = np.array([[[0, 1, 255]]])
    >>> loss = ChannelWiseKLDivergence(temperature=1.0, ignore_class=255)
    >>> round(float(loss(teacher, student, labels=labels)), 4)  # third pixel left out
    0.1308
    """

    #: Marks pixels through the labels of each call, not through ``fn``.
    own_arguments = ("ignore_class",)

    def __init__(
        self,
        temperature=2.0,
        ignore_class=None,
        reduction="sum_over_batch_size",
        name="channel_wise_kl_divergence",
        dtype=None,
    ):
        super().__init__(
            channel_wise_kl_divergence, name=name, reduction=reduction, dtype=dtype
        )
        self._set_arguments(
            temperature=check_temperature(temperature),
            ignore_class=check_ignore_class(ignore_class),
        )

    def __call__(self, y_true, y_pred, sample_weight=None, labels=None):
        y_true = to_tensor(y_true)
        keep = self._label_mask(y_true, labels)
        image_weight = None
        if sample_weight is not None:
            w = to_tensor(sample_weight)
            if "float" not in str(w.dtype):
                w = ops.cast(w, "float32")
            if len(w.shape) >= 3:
                w = as_float32(_pixel_map(w, y_true, "sample_weight"))
                keep = w > 0 if keep is None else keep & (w > 0)
                kept = ops.cast(keep, "float32")
                image_weight = ops.divide_no_nan(
                    ops.sum(ops.where(keep, w, 0.0), axis=(1, 2)),
                    ops.sum(kept, axis=(1, 2)),
                )
            else:
                image_weight = w
            if len(image_weight.shape) == 1:
                # (batch,) against (batch, channels): Keras would align the
                # batch axis with the channels.
                image_weight = ops.expand_dims(image_weight, -1)
        if keep is not None:
            # Keras converts both parts of y_true and hands them to call().
            y_true = (y_true, keep)
        return super(DivergenceLoss, self).__call__(
            y_true, y_pred, sample_weight=image_weight
        )

    def _label_mask(self, y_true, labels):
        """The pixels whose label is not ``ignore_class`` (None without)."""
        if self.ignore_class is None:
            check_argument(
                labels is None,
                "labels",
                "None when `ignore_class` is None (labels only mark ignored "
                "pixels; set `ignore_class`, or mask with a per-pixel "
                "`sample_weight`)",
                "<a tensor>" if labels is not None else None,
            )
            return None
        if labels is None:
            raise ValueError(
                f"`ignore_class={self.ignore_class}` needs the labels: call "
                "`loss(teacher_logits, student_logits, labels=labels)`, or mask "
                "pixels with a per-pixel `sample_weight` (0 = left out) and "
                "`ignore_class=None`. Received: labels=None"
            )
        labels = _pixel_map(labels, y_true, "labels")
        if "float" in str(labels.dtype):
            labels = ops.round(labels)
        return ops.cast(labels, "int32") != self.ignore_class

    def call(self, y_true, y_pred):
        # y_true is (teacher logits, kept pixels) when __call__ found a mask.
        keep = None
        if isinstance(y_true, (tuple, list)):
            y_true, keep = y_true
        values = self.fn(y_true, y_pred, mask=keep, **self._fn_arguments())
        if keep is None:
            return values
        keep = _pixel_mask(keep, as_float32(y_true))
        counted = ops.any(ops.reshape(keep, (ops.shape(keep)[0], -1)), axis=-1)
        counted = ops.broadcast_to(ops.expand_dims(counted, -1), ops.shape(values))
        return mark_valid(values, counted)
