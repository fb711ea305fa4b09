"""Per-pixel divergences for semantic segmentation.

The functions compute per-pixel values (the input shape without the class
axis) in float32 from logits through ``log_softmax``; the ``Loss`` classes
wrap them, store every argument in ``get_config`` and mark ignored pixels
with a Keras mask, so Keras' default ``"sum_over_batch_size"`` reduction
gives the **mean over non-ignored pixels** (weighted by ``sample_weight``
as in Keras). A batch in which every pixel is ignored gives 0 and a zero
gradient.

All results and gradients are finite for finite inputs, including logits
of +-1e4 (``keras.losses.KLDivergence`` clips probabilities at 1e-7 and
saturates near 16.1 there) and targets containing exact zeros.

Conventions shared by every function here:

- ``y_pred`` is logits when ``from_logits=True`` (the default: klseg models
  output logits), otherwise probabilities.
- ``target`` says what ``y_true`` holds: ``"probabilities"`` (soft labels,
  one-hot maps), ``"logits"`` (a teacher's raw outputs) or
  ``"log_probabilities"``.
- A zero probability has no finite logarithm; klseg uses ``log(0) =
  log(1.18e-38) = -87.34`` (see ``klseg.ops.safe_log``). For a target this
  is exact (``0 * log 0 = 0``); for a prediction of exactly 0 where the
  target has mass, the divergence (truly infinite) is reported as about
  87.3 nats per unit of target mass, with zero gradient through that entry.
- A target row that sums to 0 (``target="probabilities"``, e.g. the one-hot
  encoding of the ignore label 255) or is all ``-inf``
  (``"log_probabilities"``) means "no target": its value is 0. The loss
  classes exclude such pixels from the mean when ``ignore_class`` is set.
- Probability inputs at temperature 1 are used as given, not renormalised.
  When their values can be read (eager calls), negative entries and rows
  whose sum is not 1 (within 1e-2) or 0 raise ``ValueError``; inside a
  compiled ``fit`` step they are not checked.
"""

import math

import keras
import numpy as np
from keras import ops

from klseg.ops import (
    LOG_FLOOR,
    TARGET_KINDS,
    TEMPERATURE_RANGE,
    as_float32,
    check_argument,
    check_temperature,
    concrete,
    log_probs,
    log_softmax,
    move_axis_last,
    normalize_axis,
    per_pixel_weights,
    set_mask,
    sparse_labels,
    target_mass,
    to_tensor,
    valid_labels,
)

__all__ = [
    "kl_divergence",
    "sparse_kl_divergence",
    "jensen_shannon_divergence",
    "KLDivergence",
    "SparseKLDivergence",
    "JensenShannonDivergence",
    "WeightedSum",
    "channel_wise_kl_divergence",
    "ChannelWiseKLDivergence",
]

_DIRECTIONS = ("forward", "reverse")
_SUM_TOLERANCE = 1e-2


# Argument and input checks -------------------------------------------------


def _check_bool(value, name):
    check_argument(isinstance(value, (bool, np.bool_)), name, "a bool", value)
    return bool(value)


def _check_target(target):
    check_argument(target in TARGET_KINDS, "target", f"one of {TARGET_KINDS}", target)
    return target


def _check_direction(direction):
    check_argument(
        direction in _DIRECTIONS, "direction", f"one of {_DIRECTIONS}", direction
    )
    return direction


def _check_axis(axis):
    ok = isinstance(axis, (int, np.integer)) and not isinstance(axis, bool)
    check_argument(ok, "axis", "an integer", axis)
    return int(axis)


def _check_label_smoothing(label_smoothing):
    ok = isinstance(label_smoothing, (int, float, np.floating, np.integer))
    ok = ok and not isinstance(label_smoothing, bool)
    ok = ok and 0.0 <= float(label_smoothing) <= 1.0
    check_argument(ok, "label_smoothing", "a number in [0, 1]", label_smoothing)
    return float(label_smoothing)


def _check_ignore_class(ignore_class):
    ok = ignore_class is None or (
        isinstance(ignore_class, (int, np.integer))
        and not isinstance(ignore_class, bool)
    )
    check_argument(ok, "ignore_class", "None or an integer label", ignore_class)
    return None if ignore_class is None else int(ignore_class)


def _check_class_weights(class_weights):
    if class_weights is None:
        return None
    try:
        w = np.asarray(class_weights, dtype="float64")
    except (TypeError, ValueError):
        w = None
    ok = w is not None and w.ndim == 1 and w.size > 0
    ok = ok and bool(np.all(np.isfinite(w))) and bool(np.all(w >= 0))
    check_argument(
        ok,
        "class_weights",
        "None or a 1-D sequence of finite, non-negative numbers (one per class)",
        class_weights,
    )
    return [float(v) for v in w]


def _num_classes(y_pred, name="y_pred"):
    num_classes = y_pred.shape[-1]
    if num_classes is None:
        raise ValueError(
            f"The class axis of `{name}` must have a static size. "
            f"Received: {name}.shape={tuple(y_pred.shape)}"
        )
    return int(num_classes)


def _class_weight_tensor(class_weights, num_classes):
    if len(class_weights) != num_classes:
        raise ValueError(
            f"`class_weights` needs one weight per class ({num_classes} classes "
            f"in the inputs). Received: len(class_weights)={len(class_weights)}"
        )
    return ops.convert_to_tensor(np.asarray(class_weights, dtype="float32"))


def _check_same_shape(y_true, y_pred):
    a, b = tuple(y_true.shape), tuple(y_pred.shape)
    compatible = len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )
    if not compatible:
        raise ValueError(
            "`y_true` and `y_pred` must have the same shape (batch, ..., classes). "
            f"Received: y_true.shape={a}, y_pred.shape={b}"
        )


def _check_distribution(x, name):
    """Eager check that ``x`` holds probabilities along its last axis."""
    values = concrete(x)
    if values is None or values.size == 0:
        return
    minimum = float(values.min())
    if not minimum >= 0.0:  # also catches NaN
        raise ValueError(
            f"`{name}` must hold probabilities (>= 0) when read as "
            'probabilities; pass `target="logits"` / `from_logits=True` for '
            f"raw scores. Received: min({name})={minimum:g}"
        )
    sums = values.sum(axis=-1, dtype="float64")
    bad = (np.abs(sums - 1.0) > _SUM_TOLERANCE) & (sums != 0.0)
    if bad.any():
        first = float(sums[bad].flat[0])
        raise ValueError(
            f"Each `{name}` row along the class axis must sum to 1 (or to 0 "
            'for a pixel without target); pass `target="logits"` / '
            f"`from_logits=True` for raw scores. Received: a row of {name} "
            f"summing to {first:g} ({int(bad.sum())} such rows)"
        )


# Functions -------------------------------------------------------------------


def _softmax_parts(x, temperature):
    """(log softmax, softmax) of ``x / T`` over the last axis, finite.

    As ``klseg.ops.log_softmax``: the log-probabilities are floored at
    ``LOG_FLOOR``, which turns the ``-inf`` of a logit gap beyond the
    float32 range into a finite value.
    """
    lp = log_softmax(x, temperature)
    return lp, ops.exp(lp)


def _kl_between_logits(a, b, temperature=1.0):
    """KL(softmax(a / T) || softmax(b / T)) over the last axis, fused gradient.

    The gradient is written out instead of differentiating through two
    ``log_softmax`` calls, which saves several class-sized intermediates
    (``P``, ``Q`` the two softmaxes at temperature ``T``):

        d KL / d b = (Q - P) / T
        d KL / d a = P * (log P - log Q - KL) / T

    These are the gradients of the true divergence, also where a logit gap
    beyond ``1e15 * T`` floors a log-probability in the value.
    """

    @ops.custom_gradient
    def kl_fn(a, b):
        lp, p = _softmax_parts(a, temperature)
        lq, q = _softmax_parts(b, temperature)
        d = lp - lq
        kl = ops.sum(p * d, axis=-1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            g = ops.expand_dims(upstream, -1)
            if temperature != 1.0:
                g = g * (1.0 / temperature)
            grad_a = g * p * (d - ops.expand_dims(kl, -1))
            grad_b = g * (q - p)
            return grad_a, grad_b

        return kl, grad

    return kl_fn(a, b)


def _kl_last_axis(y_true, y_pred, from_logits, target, temperature, direction, scale):
    """Per-pixel KL, class axis last, float32 inputs."""
    if target == "logits" and from_logits:
        a, b = (y_true, y_pred) if direction == "forward" else (y_pred, y_true)
        values = _kl_between_logits(a, b, temperature)
    else:
        if target == "probabilities":
            _check_distribution(y_true, "y_true")
        if not from_logits:
            _check_distribution(y_pred, "y_pred")
        p, lp = log_probs(y_true, target, temperature)
        kind = "logits" if from_logits else "probabilities"
        q, lq = log_probs(y_pred, kind, temperature)
        if direction == "forward":
            values = ops.sum(p * (lp - lq), axis=-1)
        else:
            values = ops.sum(q * (lq - lp), axis=-1)
        mass = target_mass(y_true, target)
        if mass is not None:
            values = ops.where(mass, values, 0.0)
    if scale and temperature != 1.0:
        values = values * (temperature * temperature)
    return values


def _apply_class_weights(values, y_true, target, temperature, class_weights):
    """Multiply per-pixel values by the target's expected class weight."""
    if class_weights is None:
        return values
    w = _class_weight_tensor(class_weights, _num_classes(y_true, "y_true"))
    p, _ = log_probs(y_true, target, temperature)
    return values * ops.sum(p * w, axis=-1)


def kl_divergence(
    y_true,
    y_pred,
    *,
    from_logits=True,
    target="probabilities",
    temperature=1.0,
    direction="forward",
    scale_by_temperature_squared=True,
    class_weights=None,
    axis=-1,
):
    """Per-pixel Kullback-Leibler divergence between a target and a prediction.

    With ``P = softmax(a / T)`` the target and ``Q = softmax(b / T)`` the
    prediction (``a``, ``b`` their log-probabilities or logits):

        forward:  KL(P || Q) = T^2 * sum_c P_c * (log P_c - log Q_c)
        reverse:  KL(Q || P) = T^2 * sum_c Q_c * (log Q_c - log P_c)

    computed from ``log_softmax`` in float32. The ``T^2`` factor (Hinton et
    al., 2015) keeps gradient magnitudes independent of ``T``. With
    ``class_weights`` ``w``, each pixel is multiplied by ``sum_c w_c P_c``
    (the target's expected class weight; ``w[label]`` for a one-hot target,
    as in weighted cross-entropy), which keeps the value non-negative.

    Args:
        y_true: Target, shaped like ``y_pred``; see ``target``.
        y_pred: Prediction, e.g. ``(batch, height, width, classes)``.
        from_logits: Whether ``y_pred`` holds logits (else probabilities).
            Defaults to True.
        target: What ``y_true`` holds: ``"probabilities"``, ``"logits"`` or
            ``"log_probabilities"``. Defaults to ``"probabilities"``.
        temperature: Positive softening temperature ``T`` applied to both
            sides. Defaults to 1.0.
        direction: ``"forward"`` for KL(target || prediction) or
            ``"reverse"`` for KL(prediction || target). Defaults to
            ``"forward"``.
        scale_by_temperature_squared: Multiply by ``T^2``. Defaults to True.
        class_weights: Optional sequence of one non-negative weight per
            class. Defaults to None.
        axis: The class axis. Defaults to -1.

    Returns:
        float32 tensor of per-pixel divergences, the input shape without
        ``axis``. Target rows without mass (see the module docstring) give 0.

    Raises:
        ValueError: For invalid arguments, mismatched shapes, or (eager
            calls) probability inputs that are negative or not normalised.

    Example:

    >>> import numpy as np
    >>> teacher = np.array([[[[4.0, 0.0, 0.0]]]])
    >>> student = np.array([[[[0.0, 4.0, 0.0]]]])
    >>> kl = kl_divergence(teacher, student, target="logits")
    >>> tuple(kl.shape), round(float(kl[0, 0, 0]), 4)
    ((1, 1, 1), 3.788)
    """
    target = _check_target(target)
    temperature = check_temperature(temperature)
    direction = _check_direction(direction)
    from_logits = _check_bool(from_logits, "from_logits")
    scale = _check_bool(scale_by_temperature_squared, "scale_by_temperature_squared")
    class_weights = _check_class_weights(class_weights)
    axis = _check_axis(axis)
    y_true, y_pred = as_float32(y_true), as_float32(y_pred)
    _check_same_shape(y_true, y_pred)
    normalize_axis(axis, len(y_pred.shape))
    y_true, y_pred = move_axis_last(y_true, axis), move_axis_last(y_pred, axis)
    values = _kl_last_axis(
        y_true, y_pred, from_logits, target, temperature, direction, scale
    )
    return _apply_class_weights(values, y_true, target, temperature, class_weights)


def jensen_shannon_divergence(
    y_true,
    y_pred,
    *,
    from_logits=True,
    target="probabilities",
    class_weights=None,
    axis=-1,
):
    """Per-pixel Jensen-Shannon divergence (symmetric, bounded by log 2).

        JS(P, Q) = 0.5 * KL(P || M) + 0.5 * KL(Q || M),  M = (P + Q) / 2

    with ``log M = logaddexp(log P, log Q) - log 2`` computed in float32 from
    log-probabilities, so it is finite for any finite logits. Values lie in
    ``[0, log 2]`` nats.

    Args:
        y_true: Target, shaped like ``y_pred``; see ``target``.
        y_pred: Prediction, e.g. ``(batch, height, width, classes)``.
        from_logits: Whether ``y_pred`` holds logits (else probabilities).
            Defaults to True.
        target: What ``y_true`` holds: ``"probabilities"``, ``"logits"`` or
            ``"log_probabilities"``. Defaults to ``"probabilities"``.
        class_weights: Optional per-class weights; each pixel is multiplied
            by ``sum_c w_c P_c``. Defaults to None.
        axis: The class axis. Defaults to -1.

    Returns:
        float32 per-pixel values, the input shape without ``axis``.

    Raises:
        ValueError: As ``kl_divergence``.

    Example:

    >>> import numpy as np
    >>> p = np.array([[1.0, 0.0]])
    >>> q = np.array([[0.0, 1.0]])
    >>> js = jensen_shannon_divergence(p, q, from_logits=False)
    >>> round(float(js[0]), 4)  # log 2: disjoint supports
    0.6931
    """
    target = _check_target(target)
    from_logits = _check_bool(from_logits, "from_logits")
    class_weights = _check_class_weights(class_weights)
    axis = _check_axis(axis)
    y_true, y_pred = as_float32(y_true), as_float32(y_pred)
    _check_same_shape(y_true, y_pred)
    normalize_axis(axis, len(y_pred.shape))
    y_true, y_pred = move_axis_last(y_true, axis), move_axis_last(y_pred, axis)
    if target == "probabilities":
        _check_distribution(y_true, "y_true")
    if not from_logits:
        _check_distribution(y_pred, "y_pred")
    p, lp = log_probs(y_true, target)
    q, lq = log_probs(y_pred, "logits" if from_logits else "probabilities")
    lm = ops.logaddexp(lp, lq) - math.log(2.0)
    values = 0.5 * ops.sum(p * (lp - lm) + q * (lq - lm), axis=-1)
    mass = target_mass(y_true, target)
    if mass is not None:
        values = ops.where(mass, values, 0.0)
    return _apply_class_weights(values, y_true, target, 1.0, class_weights)


def _smoothed_neg_entropy(eps, num_classes):
    """sum_c t_c log t_c for t = (1 - eps) * onehot + eps / C (float64)."""
    if eps == 0.0:
        return 0.0
    on = 1.0 - eps + eps / num_classes
    off = eps / num_classes
    return on * math.log(on) + (num_classes - 1) * off * math.log(off)


def _sparse_kl(y_true, y_pred, from_logits, label_smoothing, ignore_class, axis):
    """Shared by the function and the class: (values, valid, safe labels)."""
    y_pred = as_float32(y_pred)
    rank = len(y_pred.shape)
    axis = normalize_axis(axis, rank)
    y_true = sparse_labels(y_true, tuple(y_pred.shape), axis)
    y_pred = move_axis_last(y_pred, axis)
    num_classes = _num_classes(y_pred)
    labels, valid = valid_labels(y_true, num_classes, ignore_class)
    safe = ops.where(valid, labels, 0)
    if from_logits:
        # -log q_c = lse - b_c, at most -LOG_FLOOR (as klseg.ops.log_softmax):
        # beyond the float32 range the difference is inf, then the floor.
        lse = ops.expand_dims(ops.logsumexp(y_pred, axis=-1), -1)
        picked = ops.take_along_axis(y_pred, ops.expand_dims(safe, -1), axis=-1)
        nll = ops.squeeze(ops.minimum(lse - picked, -LOG_FLOOR), -1)
        uniform = None
        if label_smoothing:
            uniform = ops.mean(ops.minimum(lse - y_pred, -LOG_FLOOR), axis=-1)
    else:
        _check_distribution(y_pred, "y_pred")
        _, lq = log_probs(y_pred, "probabilities")
        picked = ops.take_along_axis(lq, ops.expand_dims(safe, -1), axis=-1)
        nll = -ops.squeeze(picked, -1)
        uniform = -ops.mean(lq, axis=-1) if label_smoothing else None
    if label_smoothing:
        eps = label_smoothing
        values = (1.0 - eps) * nll + eps * uniform
        values = values + _smoothed_neg_entropy(eps, num_classes)
    else:
        values = nll
    values = ops.where(valid, values, 0.0)
    return values, valid, safe


def sparse_kl_divergence(
    y_true,
    y_pred,
    *,
    from_logits=True,
    label_smoothing=0.0,
    ignore_class=None,
    class_weights=None,
    axis=-1,
):
    """Per-pixel KL from (smoothed) integer labels to the prediction.

    With ``t = (1 - eps) * onehot(y) + eps / C`` and ``Q = softmax(b)``:

        KL(t || Q) = sum_c t_c log t_c
                     + (1 - eps) * (lse(b) - b_y) + eps * (lse(b) - mean_c b_c)

    For ``eps = 0`` this is exactly the cross-entropy ``-log Q_y``; for
    ``eps > 0`` it is the label-smoothed cross-entropy minus the (constant)
    entropy of ``t``, so a perfect prediction scores 0. Pixels whose label
    is ``ignore_class`` or outside ``[0, C)`` give 0.

    Args:
        y_true: Integer labels ``(batch, height, width)`` or with a trailing
            axis of size 1. Float tensors holding integers are accepted.
        y_pred: Prediction ``(batch, height, width, classes)``.
        from_logits: Whether ``y_pred`` holds logits (else probabilities).
            Defaults to True.
        label_smoothing: ``eps`` in [0, 1]. Defaults to 0.
        ignore_class: Optional label value (e.g. 255) whose pixels give 0.
            Defaults to None.
        class_weights: Optional per-class weights; each pixel is multiplied
            by ``w[label]``. Defaults to None.
        axis: The class axis of ``y_pred``. Defaults to -1.

    Returns:
        float32 per-pixel values, the shape of the labels.

    Raises:
        ValueError: For invalid arguments, mismatched shapes, and (eager
            calls) labels outside ``[0, C)`` that are not ``ignore_class``.
            Inside a compiled step such labels cannot be checked and are
            treated like the ignore class.

    Example:

    >>> import numpy as np
    >>> logits = np.log(np.array([[[[0.5, 0.25, 0.25]]]]))
    >>> values = sparse_kl_divergence(np.array([[[0]]]), logits)
    >>> round(float(values[0, 0, 0]), 4)  # -log(0.5)
    0.6931
    """
    from_logits = _check_bool(from_logits, "from_logits")
    label_smoothing = _check_label_smoothing(label_smoothing)
    ignore_class = _check_ignore_class(ignore_class)
    class_weights = _check_class_weights(class_weights)
    axis = _check_axis(axis)
    values, _, safe = _sparse_kl(
        y_true, y_pred, from_logits, label_smoothing, ignore_class, axis
    )
    if class_weights is not None:
        num_classes = ops.shape(y_pred)[axis]
        w = _class_weight_tensor(class_weights, int(num_classes))
        values = values * ops.take(w, safe)
    return values


# Loss classes ----------------------------------------------------------------


def _pixel_rank(y_pred):
    """Rank of the per-pixel values: that of ``y_pred`` less the class axis."""
    shape = getattr(y_pred, "shape", None)
    if shape is None:
        shape = np.shape(y_pred)
    return len(shape) - 1


class _KlsegLoss(keras.losses.Loss):
    """Base: keeps the constructor's ``dtype`` in ``get_config``."""

    def __init__(self, name, reduction, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._dtype_arg = dtype if isinstance(dtype, (str, type(None))) else None
        if self._dtype_arg is None and dtype is not None:
            self._dtype_arg = keras.dtype_policies.serialize(dtype)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Per-image weights (batch,) become (batch, 1, 1): Keras masks the
        # weights before broadcasting them to the per-pixel values.
        sample_weight = per_pixel_weights(sample_weight, _pixel_rank(y_pred))
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def get_config(self):
        config = super().get_config()
        config["dtype"] = self._dtype_arg
        return config

    def _mark_soft_ignored(self, values, y_true):
        """With ``ignore_class`` set, mask pixels whose soft target is empty.

        A pixel is ignored when its target row carries no mass (sums to 0 for
        probabilities); see ``target_mass``.
        """
        if self.ignore_class is None:
            return values
        y_true = move_axis_last(as_float32(y_true), self.axis)
        return _mark_valid(values, target_mass(y_true, self.target))


def _mark_valid(values, valid):
    """Zero ``values`` outside ``valid`` and attach ``valid`` as Keras mask."""
    values = ops.where(valid, values, 0.0)
    return set_mask(values, valid)


@keras.saving.register_keras_serializable(package="klseg")
class KLDivergence(_KlsegLoss):
    """KL divergence between a soft target map and the prediction, per pixel.

        loss = mean over non-ignored pixels of  T^2 * KL(P || Q)

    with ``P`` the target and ``Q`` the prediction at temperature ``T``
    (``direction="reverse"`` swaps them), computed from ``log_softmax`` in
    float32 as ``kl_divergence`` documents. Use it as
    ``loss(teacher_or_target, student_logits, sample_weight=None)``.

    The denominator is Keras': with the default ``"sum_over_batch_size"``
    reduction it is the number of non-ignored pixels (all pixels when
    ``ignore_class`` is None); ``sample_weight`` multiplies the per-pixel
    values first, as in every Keras loss.

    Args:
        from_logits: Whether ``y_pred`` holds logits. Defaults to True.
        target: What ``y_true`` holds: ``"probabilities"``, ``"logits"``
            (e.g. a teacher's outputs) or ``"log_probabilities"``.
            Defaults to ``"probabilities"``.
        temperature: Positive temperature ``T``. Defaults to 1.0.
        scale_by_temperature_squared: Multiply by ``T^2``. Defaults to True.
        direction: ``"forward"`` (KL(target || prediction)) or
            ``"reverse"``. Defaults to ``"forward"``.
        ignore_class: None, or any integer (conventionally the ignore label,
            e.g. 255, whose one-hot encoding is an all-zero row): pixels
            whose target row has no mass (sums to 0, or is all ``-inf`` for
            ``"log_probabilities"``) are then excluded from the mean. Not
            available with ``target="logits"``; mask such pixels through
            ``sample_weight``. Defaults to None (empty rows give 0 and
            count in the denominator).
        class_weights: Optional per-class weights; each pixel is multiplied
            by ``sum_c w_c P_c``. Defaults to None.
        axis: The class axis. Defaults to -1.
        reduction: Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: Defaults to ``"kl_divergence"``.
        dtype: Keras loss dtype (the computation itself is float32).
            Defaults to None.

    Example:

    >>> import numpy as np
    >>> teacher = np.array([[[[1e4, 0.0]]]], dtype="float32")
    >>> student = np.array([[[[0.0, 1e4]]]], dtype="float32")
    >>> loss = KLDivergence(target="logits")
    >>> float(loss(teacher, student))  # keras.losses.KLDivergence: 16.1
    10000.0
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
        reduction="sum_over_batch_size",
        name="kl_divergence",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.target = _check_target(target)
        self.temperature = check_temperature(temperature)
        self.scale_by_temperature_squared = _check_bool(
            scale_by_temperature_squared, "scale_by_temperature_squared"
        )
        self.direction = _check_direction(direction)
        self.ignore_class = _check_ignore_class(ignore_class)
        check_argument(
            self.ignore_class is None or self.target != "logits",
            "ignore_class",
            'None when target="logits" (logit rows always define a '
            "distribution; mask pixels with `sample_weight` instead)",
            ignore_class,
        )
        self.class_weights = _check_class_weights(class_weights)
        self.axis = _check_axis(axis)

    def call(self, y_true, y_pred):
        values = kl_divergence(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            target=self.target,
            temperature=self.temperature,
            direction=self.direction,
            scale_by_temperature_squared=self.scale_by_temperature_squared,
            class_weights=self.class_weights,
            axis=self.axis,
        )
        return self._mark_soft_ignored(values, y_true)

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=self.from_logits,
            target=self.target,
            temperature=self.temperature,
            scale_by_temperature_squared=self.scale_by_temperature_squared,
            direction=self.direction,
            ignore_class=self.ignore_class,
            class_weights=self.class_weights,
            axis=self.axis,
        )
        return config


@keras.saving.register_keras_serializable(package="klseg")
class SparseKLDivergence(_KlsegLoss):
    """KL from (smoothed) integer labels to the prediction, per pixel.

        loss = mean over non-ignored pixels of  w[y] * KL(t || softmax(b))

    with ``t`` the one-hot label smoothed by ``label_smoothing``; without
    smoothing this is the cross-entropy. See ``sparse_kl_divergence``.
    Pixels labelled ``ignore_class`` (and, inside a compiled step, labels
    outside ``[0, C)``) are excluded from the mean through a Keras mask; a
    batch with no valid pixel gives 0 and zero gradient.

    Args:
        from_logits: Whether ``y_pred`` holds logits. Defaults to True.
        label_smoothing: In [0, 1]. Defaults to 0.
        ignore_class: Optional label to ignore, e.g. 255. Defaults to None.
        class_weights: Optional per-class weights ``w``. Defaults to None.
        axis: The class axis of ``y_pred``. Defaults to -1.
        reduction: Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: Defaults to ``"sparse_kl_divergence"``.
        dtype: Keras loss dtype (the computation itself is float32).
            Defaults to None.

    Example:

    >>> import numpy as np
    >>> labels = np.array([[[0, 255]]])
    >>> logits = np.zeros((1, 1, 2, 4), dtype="float32")
    >>> loss = SparseKLDivergence(ignore_class=255)
    >>> round(float(loss(labels, logits)), 4)  # log 4, the ignored pixel excluded
    1.3863
    """

    def __init__(
        self,
        from_logits=True,
        label_smoothing=0.0,
        ignore_class=None,
        class_weights=None,
        axis=-1,
        reduction="sum_over_batch_size",
        name="sparse_kl_divergence",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.ignore_class = _check_ignore_class(ignore_class)
        self.class_weights = _check_class_weights(class_weights)
        self.axis = _check_axis(axis)

    def call(self, y_true, y_pred):
        values, valid, safe = _sparse_kl(
            y_true,
            y_pred,
            self.from_logits,
            self.label_smoothing,
            self.ignore_class,
            self.axis,
        )
        if self.class_weights is not None:
            num_classes = y_pred.shape[self.axis]
            w = _class_weight_tensor(self.class_weights, int(num_classes))
            values = values * ops.take(w, safe)
        return _mark_valid(values, valid)

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
            ignore_class=self.ignore_class,
            class_weights=self.class_weights,
            axis=self.axis,
        )
        return config


@keras.saving.register_keras_serializable(package="klseg")
class JensenShannonDivergence(_KlsegLoss):
    """Jensen-Shannon divergence between target and prediction, per pixel.

        loss = mean over non-ignored pixels of  JS(P, Q)  (in [0, log 2])

    See ``jensen_shannon_divergence``.

    Args:
        from_logits: Whether ``y_pred`` holds logits. Defaults to True.
        target: ``"probabilities"``, ``"logits"`` or
            ``"log_probabilities"``. Defaults to ``"probabilities"``.
        ignore_class: As in ``KLDivergence``: when set, pixels whose target
            row has no mass are excluded from the mean. Defaults to None.
        class_weights: Optional per-class weights. Defaults to None.
        axis: The class axis. Defaults to -1.
        reduction: Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: Defaults to ``"jensen_shannon_divergence"``.
        dtype: Keras loss dtype. Defaults to None.
    """

    def __init__(
        self,
        from_logits=True,
        target="probabilities",
        ignore_class=None,
        class_weights=None,
        axis=-1,
        reduction="sum_over_batch_size",
        name="jensen_shannon_divergence",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.target = _check_target(target)
        self.ignore_class = _check_ignore_class(ignore_class)
        check_argument(
            self.ignore_class is None or self.target != "logits",
            "ignore_class",
            'None when target="logits" (mask pixels with `sample_weight`)',
            ignore_class,
        )
        self.class_weights = _check_class_weights(class_weights)
        self.axis = _check_axis(axis)

    def call(self, y_true, y_pred):
        values = jensen_shannon_divergence(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            target=self.target,
            class_weights=self.class_weights,
            axis=self.axis,
        )
        return self._mark_soft_ignored(values, y_true)

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=self.from_logits,
            target=self.target,
            ignore_class=self.ignore_class,
            class_weights=self.class_weights,
            axis=self.axis,
        )
        return config


def _resolve_loss(item, index):
    loss = keras.losses.get(item) if not isinstance(item, keras.losses.Loss) else item
    if not isinstance(loss, keras.losses.Loss):
        raise ValueError(
            f"`losses[{index}]` must be a keras.losses.Loss instance, its class "
            "name (e.g. 'SparseCategoricalCrossentropy') or its config. "
            f"Received: losses[{index}]={item!r}"
        )
    return loss


def _takes_labels(loss):
    """Whether a part takes integer labels (its class name starts "Sparse")."""
    return type(loss).__name__.startswith("Sparse")


def _from_logits_argument(loss):
    """A part's ``from_logits`` setting: True, False, or None (no such
    argument, as Dice and Tversky, which take probabilities)."""
    try:
        value = loss.get_config().get("from_logits")
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return None if value is None else bool(value)


@keras.saving.register_keras_serializable(package="klseg")
class WeightedSum(keras.losses.Loss):
    """A weighted sum of losses, each given its inputs in the form it takes.

        loss = sum_i weights[i] * losses[i](y_true_i, y_pred_i, sample_weight)

    Each part applies its own mask, ``sample_weight`` and reduction (so a
    per-pixel loss with ``ignore_class`` averages over its valid pixels
    while, say, ``keras.losses.Dice`` keeps its own definition), and the
    results are added. This is why ``WeightedSum`` works on reduced values
    rather than per-pixel ones; its own ``reduction`` argument is accepted
    for Keras compatibility and unused. Parts may be any serialisable Keras
    losses, klseg's or Keras' own. What each part receives:

    - **Target.** With integer labels ``y_true`` (the shape of ``y_pred``
      without the class axis, or with a trailing 1), a part whose class
      name starts with ``Sparse`` (``SparseKLDivergence``,
      ``keras.losses.SparseCategoricalCrossentropy``) gets the labels as
      they are. Every other part (``keras.losses.Dice``,
      ``CategoricalFocalCrossentropy``, ``CategoricalCrossentropy``,
      klseg's ``KLDivergence``, ...) gets their one-hot encoding, in which a
      pixel without a label (``ignore_class``, or any label outside ``[0,
      C)`` such as 255) is an all-zero row, and the pixels without a label
      are weighted zero: they carry a Keras mask, so a per-pixel part
      averages over the labelled pixels only; a part without a
      ``from_logits`` argument (``Dice``, ``Tversky``: they pool the whole
      batch) also gets zero probabilities there, so those pixels add
      nothing to its sums. A one-hot or soft
      ``y_true`` is given unchanged to every part.
    - **Prediction.** ``y_pred`` holds logits when ``from_logits=True``
      (klseg models output logits). A part whose config says
      ``from_logits=True`` gets them; every other part (``from_logits=False``,
      or no such argument, as ``Dice``) gets ``softmax(y_pred)``. With
      ``from_logits=False``, ``y_pred`` holds probabilities, given as they
      are to parts without ``from_logits=True`` and as ``log(y_pred)`` (a
      valid set of logits) to the others.
    - **Weights.** ``sample_weight`` of shape ``(batch,)`` is broadcast over
      the pixels, like ``(batch, 1, 1)``.

    Args:
        losses: Sequence of ``keras.losses.Loss`` instances (or names /
            configs that ``keras.losses.get`` turns into instances).
        weights: Sequence of finite floats, one per loss. Defaults to all
            1.0.
        from_logits: Whether ``y_pred`` holds logits (else probabilities).
            Defaults to True.
        ignore_class: A label in ``[0, C)`` that also means "no label" for
            the one-hot parts (labels outside ``[0, C)`` always do).
            Defaults to None.
        name: Defaults to ``"weighted_sum"``.
        reduction: Ignored (each component reduces itself).
        dtype: Keras loss dtype. Defaults to None.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> loss = WeightedSum(
    ...     [
    ...         SparseKLDivergence(ignore_class=255, label_smoothing=0.1),
    ...         keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     ],
    ...     weights=[1.0, 0.5],
    ... )
    >>> labels = np.array([[[0, 1]]])
    >>> logits = np.zeros((1, 1, 2, 2), dtype="float32")
    >>> round(float(loss(labels, logits)), 4)  # KL((.95, .05) || (.5, .5)) + 0.5 log 2
    0.8412
    >>> dice = WeightedSum([SparseKLDivergence(ignore_class=255), keras.losses.Dice()])
    >>> # Dice sees the labelled pixel only: 1 - 2 * .5 / (1 + 1) = .5
    >>> round(float(dice(np.array([[[0, 255]]]), logits)), 4)  # log 2 + .5
    1.1931
    """

    def __init__(
        self,
        losses,
        weights=None,
        from_logits=True,
        ignore_class=None,
        name="weighted_sum",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        check_argument(
            isinstance(losses, (list, tuple)) and len(losses) > 0,
            "losses",
            "a non-empty list of losses",
            losses,
        )
        self.losses = [_resolve_loss(item, i) for i, item in enumerate(losses)]
        if weights is None:
            weights = [1.0] * len(self.losses)
        try:
            w = [float(v) for v in weights]
        except (TypeError, ValueError):
            w = None
        check_argument(
            w is not None
            and len(w) == len(self.losses)
            and all(math.isfinite(v) for v in w),
            "weights",
            f"{len(self.losses)} finite numbers (one per loss)",
            weights,
        )
        self.weights = w
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.ignore_class = _check_ignore_class(ignore_class)
        self._dtype_arg = dtype if isinstance(dtype, (str, type(None))) else None

    def _is_sparse(self, y_true, y_pred):
        rank = len(y_pred.shape)
        if len(y_true.shape) == rank - 1:
            return True
        return (
            len(y_true.shape) == rank
            and y_true.shape[-1] == 1
            and y_pred.shape[-1] != 1
        )

    def _dense_target(self, y_true, y_pred):
        """One-hot target and the mask of labelled pixels."""
        num_classes = _num_classes(y_pred)
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, -1)
        labels = ops.cast(ops.round(as_float32(y_true)), "int32")
        valid = (labels >= 0) & (labels < num_classes)
        if self.ignore_class is not None:
            valid = valid & (labels != self.ignore_class)
        one_hot = ops.one_hot(ops.where(valid, labels, 0), num_classes)
        one_hot = one_hot * ops.expand_dims(ops.cast(valid, one_hot.dtype), -1)
        return one_hot, valid

    def __call__(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = to_tensor(y_true), as_float32(y_pred)
        sample_weight = per_pixel_weights(sample_weight, len(y_pred.shape) - 1)
        if self.from_logits:
            logits, probs = y_pred, None
        else:
            logits, probs = None, y_pred
        sparse = self._is_sparse(y_true, y_pred)
        one_hot = valid = None
        total = None
        for weight, loss in zip(self.weights, self.losses):
            from_logits = _from_logits_argument(loss)
            takes_logits = from_logits is True
            if takes_logits and logits is None:
                _, logits = log_probs(y_pred, "probabilities")
            if not takes_logits and probs is None:
                probs = ops.softmax(y_pred, axis=-1)
            prediction = logits if takes_logits else probs
            target = y_true
            if sparse and not _takes_labels(loss):
                if one_hot is None:
                    one_hot, valid = self._dense_target(y_true, y_pred)
                target = one_hot
                if from_logits is None:
                    # Dice, Tversky: they pool the batch; zeros add nothing.
                    mask = ops.expand_dims(valid, -1)
                    prediction = ops.where(mask, prediction, 0.0)
                else:
                    # A fresh tensor, to carry this part's mask alone.
                    prediction = ops.add(prediction, 0.0)
                prediction = set_mask(prediction, valid)
            value = loss(target, prediction, sample_weight=sample_weight)
            value = ops.cast(value, "float32") * weight
            total = value if total is None else total + value
        return total

    def call(self, y_true, y_pred):
        return self(y_true, y_pred)

    def get_config(self):
        config = super().get_config()
        config.update(
            losses=[keras.losses.serialize(loss) for loss in self.losses],
            weights=list(self.weights),
            from_logits=self.from_logits,
            ignore_class=self.ignore_class,
            dtype=self._dtype_arg,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["losses"] = [keras.losses.deserialize(c) for c in config["losses"]]
        return cls(**config)


# Channel-wise distillation -------------------------------------------------
#
# Kept at the end of the module: a divergence over spatial positions rather
# than classes, so its values are per (image, channel), not per pixel.

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
    _num_classes(y_true, "y_true")
    y_pred = _resize_to_teacher(y_true, y_pred)
    keep = None if mask is None else _pixel_mask(mask, y_true)
    if keep is not None:
        keep = ops.reshape(keep, (ops.shape(keep)[0], 1, -1))
    a = _spatial_rows(y_true, keep)
    b = _spatial_rows(y_pred, keep)
    values = _kl_between_logits(a, b, temperature)
    if temperature != 1.0:
        values = values * (temperature * temperature)
    if keep is not None:
        values = ops.where(ops.any(keep, axis=-1), values, 0.0)
    return values


@keras.saving.register_keras_serializable(package="klseg")
class ChannelWiseKLDivergence(_KlsegLoss):
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

    def __init__(
        self,
        temperature=2.0,
        ignore_class=None,
        reduction="sum_over_batch_size",
        name="channel_wise_kl_divergence",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = check_temperature(temperature)
        self.ignore_class = _check_ignore_class(ignore_class)

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
        return super(_KlsegLoss, self).__call__(
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
        keep = None
        if isinstance(y_true, (tuple, list)):
            y_true, keep = y_true
        values = channel_wise_kl_divergence(
            y_true, y_pred, temperature=self.temperature, mask=keep
        )
        if keep is None:
            return values
        keep = _pixel_mask(keep, as_float32(y_true))
        counted = ops.any(ops.reshape(keep, (ops.shape(keep)[0], -1)), axis=-1)
        counted = ops.broadcast_to(ops.expand_dims(counted, -1), ops.shape(values))
        return _mark_valid(values, counted)

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature, ignore_class=self.ignore_class)
        return config
