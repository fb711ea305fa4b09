"""Streaming segmentation metrics (``keras.metrics.Metric`` classes).

Every metric takes the model's output directly: ``y_pred`` of shape
``(batch, height, width, classes)`` holding logits (``from_logits=True``,
the default) or probabilities, and integer labels ``y_true`` of shape
``(batch, height, width)`` or ``(batch, height, width, 1)`` (the
``KLDivergence`` metric takes a soft target map instead). Pixels labelled
``ignore_class`` never count; ``sample_weight`` (float, per pixel or per
image) weights the pixels that do.

Counts are exact past 2**24 pixels: the state of each count is a pair of
float32 variables (``hi``, ``lo``) updated with compensated (TwoSum)
addition, which holds integer counts exactly up to about 2**48 (2.8e14)
pixels on every backend. float64 is avoided because JAX disables it by
default and TPUs lack it; int64 because it is int32 under default JAX and
cannot hold fractional weights. Within one ``update_state`` call, pixel
counts are summed as int32 (exact); fractional weights as float32 (relative
rounding about 1e-7, exact for integer-valued weights while one batch's sum
stays below 2**24).

All metrics also offer ``merge_state(metrics)`` to add the state of other
instances (for example from evaluation shards).
"""

import keras
import numpy as np
from keras import ops

from klseg import losses as _losses
from klseg.ops import (
    accumulate,
    as_float32,
    check_argument,
    move_axis_last,
    normalize_axis,
    pixel_weights,
    segment_counts,
    sparse_labels,
    split_count,
    target_mass,
    valid_labels,
)

__all__ = [
    "MeanIoU",
    "PixelAccuracy",
    "KLDivergence",
    "ExpectedCalibrationError",
]


def _check_int(value, name, minimum):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and int(value) >= minimum
    check_argument(ok, name, f"an integer >= {minimum}", value)
    return int(value)


def _check_bool(value, name):
    check_argument(isinstance(value, (bool, np.bool_)), name, "a bool", value)
    return bool(value)


def _check_ignore_class(ignore_class):
    ok = ignore_class is None or (
        isinstance(ignore_class, (int, np.integer))
        and not isinstance(ignore_class, bool)
    )
    check_argument(ok, "ignore_class", "None or an integer label", ignore_class)
    return None if ignore_class is None else int(ignore_class)


class _PairMetric(keras.metrics.Metric):
    """Base class: float32 (hi, lo) variable pairs, merge, dtype in config."""

    def __init__(self, name, dtype):
        super().__init__(name=name, dtype=dtype)
        self._dtype_arg = dtype if isinstance(dtype, (str, type(None))) else None
        self._pairs = []

    def _add_pair(self, name, shape):
        hi = self.add_variable(
            shape=shape, initializer="zeros", dtype="float32", name=f"{name}_hi"
        )
        lo = self.add_variable(
            shape=shape, initializer="zeros", dtype="float32", name=f"{name}_lo"
        )
        self._pairs.append((hi, lo))
        return hi, lo

    @staticmethod
    def _add(pair, x, x_lo=None):
        hi, lo = accumulate(pair[0].value, pair[1].value, x, x_lo)
        pair[0].assign(hi)
        pair[1].assign(lo)

    @staticmethod
    def _read(pair):
        return pair[0].value + pair[1].value

    def merge_state(self, metrics):
        """Add the state of other instances of the same metric.

        Args:
            metrics: Iterable of metrics of the same class and configuration.
        """
        for other in metrics:
            if type(other) is not type(self) or len(other._pairs) != len(self._pairs):
                raise ValueError(
                    f"Can only merge {type(self).__name__} metrics. "
                    f"Received: {type(other).__name__}"
                )
            for mine, theirs in zip(self._pairs, other._pairs):
                if tuple(mine[0].shape) != tuple(theirs[0].shape):
                    raise ValueError(
                        "Cannot merge metrics with different state shapes. "
                        f"Received: {tuple(theirs[0].shape)}, expected "
                        f"{tuple(mine[0].shape)}"
                    )
                self._add(mine, theirs[0].value, theirs[1].value)

    def get_config(self):
        return {"name": self.name, "dtype": self._dtype_arg}


def _scores_and_labels(y_true, y_pred, ignore_class, axis, num_classes=None):
    """Class axis moved last; int32 labels; valid mask; checked shapes."""
    y_pred = ops.convert_to_tensor(y_pred)
    rank = len(y_pred.shape)
    axis = normalize_axis(axis, rank)
    y_true = sparse_labels(y_true, tuple(y_pred.shape), axis)
    y_pred = move_axis_last(y_pred, axis)
    classes = y_pred.shape[-1]
    if num_classes is not None and classes is not None and classes != num_classes:
        raise ValueError(
            f"`y_pred` has {classes} classes along axis {axis} but the metric "
            f"was built with num_classes={num_classes}. Received: "
            f"y_pred.shape={tuple(y_pred.shape)}"
        )
    if classes is None:
        classes = num_classes
    labels, valid = valid_labels(y_true, classes, ignore_class)
    return labels, y_pred, valid


@keras.saving.register_keras_serializable(package="klseg.metrics")
class MeanIoU(_PairMetric):
    """Mean intersection over union from logits or probabilities.

    For each class ``c``, over all non-ignored pixels seen since the last
    reset (weighted by ``sample_weight``)::

        IoU_c = TP_c / (TP_c + FP_c + FN_c)
        mean IoU = mean of IoU_c over classes with TP_c + FP_c + FN_c > 0

    where the predicted class is ``argmax(y_pred)``. Classes that never
    appear in labels nor predictions are left out of the mean; if none
    appears, the result is 0. Unlike ``keras.metrics.MeanIoU``, float
    sample weights are honoured (not truncated to integers) and counts are
    exact past 2**24 pixels (see the module docstring).

    Args:
        num_classes: Number of classes ``C`` (>= 1).
        ignore_class: Optional label to ignore (e.g. 255). Defaults to None.
        from_logits: Whether ``y_pred`` holds logits; the argmax is the same
            either way, so this only documents the input. Defaults to True.
        axis: The class axis of ``y_pred``. Defaults to -1.
        name: Defaults to ``"mean_iou"``.
        dtype: Dtype of ``result()``. Defaults to None (float32).

    Example:

    >>> import numpy as np
    >>> metric = MeanIoU(num_classes=2, ignore_class=255)
    >>> labels = np.array([[[0, 1, 1, 255]]])
    >>> logits = np.array([[[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]]])
    >>> metric.update_state(labels, logits)
    >>> round(float(metric.result()), 4)  # IoU 1/2 and 1/2
    0.5
    """

    def __init__(
        self,
        num_classes,
        ignore_class=None,
        from_logits=True,
        axis=-1,
        name="mean_iou",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _check_int(num_classes, "num_classes", 1)
        self.ignore_class = _check_ignore_class(ignore_class)
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.axis = _check_int(axis, "axis", -(2**31))
        c = self.num_classes
        self._confusion = self._add_pair("confusion", (c * c,))

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Accumulate the confusion matrix of one batch."""
        c = self.num_classes
        labels, y_pred, valid = _scores_and_labels(
            y_true, y_pred, self.ignore_class, self.axis, c
        )
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        ids = ops.where(valid, labels * c + predicted, 0)
        weights = pixel_weights(sample_weight, valid)
        hi, lo = segment_counts(ids, c * c, weights=weights, valid=valid)
        self._add(self._confusion, hi, lo)

    def confusion_matrix(self):
        """The ``(C, C)`` float32 confusion matrix: rows true, columns predicted.

        Rounded once to float32; the state (``hi + lo``) is exact.
        """
        c = self.num_classes
        return ops.reshape(self._read(self._confusion), (c, c))

    def _iou(self):
        cm = self.confusion_matrix()
        tp = ops.diagonal(cm)
        union = ops.sum(cm, axis=0) + ops.sum(cm, axis=1) - tp
        present = union > 0
        iou = tp / ops.where(present, union, 1.0)
        return iou, present

    def per_class_iou(self, empty_value=float("nan")):
        """IoU of each class as a float32 tensor of shape ``(C,)``.

        Args:
            empty_value: Value for classes that appeared neither in labels
                nor in predictions (IoU undefined). Defaults to NaN; pass
                0.0 for a NaN-free vector (e.g. for strict JSON).
        """
        iou, present = self._iou()
        return ops.where(present, iou, float(empty_value))

    def result(self):
        iou, present = self._iou()
        count = ops.sum(ops.cast(present, "float32"))
        mean = ops.sum(ops.where(present, iou, 0.0)) / ops.maximum(count, 1.0)
        return ops.cast(mean, self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            ignore_class=self.ignore_class,
            from_logits=self.from_logits,
            axis=self.axis,
        )
        return config


@keras.saving.register_keras_serializable(package="klseg.metrics")
class PixelAccuracy(_PairMetric):
    """Fraction of non-ignored pixels whose argmax class equals the label.

        accuracy = sum_i w_i [argmax(y_pred_i) == y_i] / sum_i w_i

    over non-ignored pixels ``i`` (``w_i`` = ``sample_weight``, 1 without
    it); 0 before any valid pixel is seen.

    Args:
        ignore_class: Optional label to ignore. Defaults to None.
        from_logits: Documents the input (the argmax is the same either
            way). Defaults to True.
        axis: The class axis of ``y_pred``. Defaults to -1.
        name: Defaults to ``"pixel_accuracy"``.
        dtype: Dtype of ``result()``. Defaults to None (float32).

    Example:

    >>> import numpy as np
    >>> metric = PixelAccuracy(ignore_class=255)
    >>> labels = np.array([[[0, 1, 1, 255]]])
    >>> logits = np.array([[[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]]])
    >>> metric.update_state(labels, logits)
    >>> round(float(metric.result()), 4)
    0.6667
    """

    def __init__(
        self,
        ignore_class=None,
        from_logits=True,
        axis=-1,
        name="pixel_accuracy",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.ignore_class = _check_ignore_class(ignore_class)
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.axis = _check_int(axis, "axis", -(2**31))
        # Segment 0: wrong, segment 1: correct.
        self._counts = self._add_pair("counts", (2,))

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Accumulate correct and total counts of one batch."""
        labels, y_pred, valid = _scores_and_labels(
            y_true, y_pred, self.ignore_class, self.axis
        )
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        ids = ops.cast(predicted == labels, "int32")
        weights = pixel_weights(sample_weight, valid)
        hi, lo = segment_counts(ids, 2, weights=weights, valid=valid)
        self._add(self._counts, hi, lo)

    def result(self):
        counts = self._read(self._counts)
        seen = counts[0] + counts[1]
        accuracy = counts[1] / ops.where(seen > 0, seen, 1.0)
        return ops.cast(accuracy, self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            ignore_class=self.ignore_class,
            from_logits=self.from_logits,
            axis=self.axis,
        )
        return config


@keras.saving.register_keras_serializable(package="klseg.metrics")
class KLDivergence(_PairMetric):
    """Streaming mean of the per-pixel KL divergence over valid pixels.

        result = sum_i w_i KL_i / sum_i w_i

    over pixels ``i`` that are not ignored, with ``KL_i`` from
    ``klseg.losses.kl_divergence`` (same arguments as the
    ``klseg.losses.KLDivergence`` loss; with ``ignore_class`` set, pixels
    whose target row has no mass are ignored). Equal to the loss averaged
    over all pixels seen, rather than a mean of per-batch means.

    Args:
        from_logits: Whether ``y_pred`` holds logits. Defaults to True.
        target: ``"probabilities"``, ``"logits"`` or
            ``"log_probabilities"``. Defaults to ``"probabilities"``.
        temperature: Positive temperature. Defaults to 1.0.
        scale_by_temperature_squared: Defaults to True.
        direction: ``"forward"`` or ``"reverse"``. Defaults to
            ``"forward"``.
        ignore_class: None or an integer; see the loss. Defaults to None.
        class_weights: Optional per-class weights. Defaults to None.
        axis: The class axis. Defaults to -1.
        name: Defaults to ``"kl_divergence"``.
        dtype: Dtype of ``result()``. Defaults to None (float32).
    """

    def __init__(
        self,
        from_logits=True,
        target="probabilities",
        temperature=1.0,
        scale_by_temperature_squared=True,
        direction="forward",
        ignore_class=None,
        class_weights=None,
        axis=-1,
        name="kl_divergence",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        # The loss validates every argument and holds the configuration.
        self._loss = _losses.KLDivergence(
            from_logits=from_logits,
            target=target,
            temperature=temperature,
            scale_by_temperature_squared=scale_by_temperature_squared,
            direction=direction,
            ignore_class=ignore_class,
            class_weights=class_weights,
            axis=axis,
            reduction=None,
        )
        # Segment 0: sum of weighted values, segment 1: sum of weights.
        self._sums = self._add_pair("sums", (2,))

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Accumulate the weighted sum of per-pixel KL and the weight."""
        loss = self._loss
        values = loss.call(as_float32(y_true), as_float32(y_pred))
        if loss.ignore_class is not None:
            y_t = move_axis_last(as_float32(y_true), loss.axis)
            valid = target_mass(y_t, loss.target)
        else:
            valid = ops.ones(ops.shape(values), dtype="bool")
        weights = pixel_weights(sample_weight, valid)
        if weights is None:
            weighted = ops.sum(ops.where(valid, values, 0.0))
            count_hi, count_lo = split_count(ops.sum(ops.cast(valid, "int32")))
        else:
            weighted = ops.sum(ops.where(valid, values * weights, 0.0))
            count_hi, count_lo = ops.sum(weights), ops.zeros_like(weighted)
        hi = ops.stack([weighted, count_hi])
        lo = ops.stack([ops.zeros_like(weighted), count_lo])
        self._add(self._sums, hi, lo)

    def result(self):
        sums = self._read(self._sums)
        mean = sums[0] / ops.where(sums[1] > 0, sums[1], 1.0)
        return ops.cast(mean, self.dtype)

    def get_config(self):
        config = super().get_config()
        loss_config = self._loss.get_config()
        for key in ("name", "reduction", "dtype"):
            loss_config.pop(key, None)
        config.update(loss_config)
        return config


@keras.saving.register_keras_serializable(package="klseg.metrics")
class ExpectedCalibrationError(_PairMetric):
    """Expected calibration error of per-pixel confidences, binned.

    Each non-ignored pixel has a confidence ``max_c softmax(y_pred)_c`` and
    is correct when its argmax equals the label. With ``B`` equal-width
    bins on ``[0, 1]`` (a confidence of exactly 1 falls in the last bin)::

        ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|
            = sum_b |correct_b - confidence sum_b| / N

    where ``n_b`` is the (weighted) number of pixels in bin ``b`` and ``N``
    the total, over all pixels seen since the last reset.

    Args:
        num_bins: Number of bins ``B`` (>= 1). Defaults to 15.
        ignore_class: Optional label to ignore. Defaults to None.
        from_logits: Whether ``y_pred`` holds logits (else probabilities).
            Defaults to True.
        axis: The class axis of ``y_pred``. Defaults to -1.
        name: Defaults to ``"expected_calibration_error"``.
        dtype: Dtype of ``result()``. Defaults to None (float32).
    """

    def __init__(
        self,
        num_bins=15,
        ignore_class=None,
        from_logits=True,
        axis=-1,
        name="expected_calibration_error",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.num_bins = _check_int(num_bins, "num_bins", 1)
        self.ignore_class = _check_ignore_class(ignore_class)
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.axis = _check_int(axis, "axis", -(2**31))
        b = self.num_bins
        # Per bin: [wrong count, correct count] and the confidence sum.
        self._counts = self._add_pair("counts", (2 * b,))
        self._confidence = self._add_pair("confidence", (b,))

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Accumulate per-bin counts, correct counts and confidence sums."""
        labels, y_pred, valid = _scores_and_labels(
            y_true, y_pred, self.ignore_class, self.axis
        )
        y_pred = as_float32(y_pred)
        if self.from_logits:
            probs = ops.softmax(y_pred, axis=-1)
        else:
            probs = y_pred
        confidence = ops.max(probs, axis=-1)
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        correct = ops.cast(predicted == labels, "int32")
        b = self.num_bins
        bins = ops.cast(ops.floor(confidence * b), "int32")
        bins = ops.clip(bins, 0, b - 1)
        weights = pixel_weights(sample_weight, valid)
        hi, lo = segment_counts(2 * bins + correct, 2 * b, weights, valid=valid)
        self._add(self._counts, hi, lo)
        conf_weights = confidence * (
            ops.cast(valid, "float32") if weights is None else weights
        )
        sums, zeros = segment_counts(bins, b, conf_weights)
        self._add(self._confidence, sums, zeros)

    def result(self):
        b = self.num_bins
        counts = ops.reshape(self._read(self._counts), (b, 2))
        confidence = self._read(self._confidence)
        n = ops.sum(counts)
        gap = ops.sum(ops.abs(counts[:, 1] - confidence))
        return ops.cast(gap / ops.where(n > 0, n, 1.0), self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_bins=self.num_bins,
            ignore_class=self.ignore_class,
            from_logits=self.from_logits,
            axis=self.axis,
        )
        return config
