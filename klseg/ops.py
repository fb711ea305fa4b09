"""Small ``keras.ops`` helpers shared by ``klseg.losses`` and ``klseg.metrics``.

Everything here works on any Keras backend. The helpers fall into three
groups:

- log-space conversion of logits / probabilities / log-probabilities into
  float32 log-probabilities (``log_probs``), with the zero-probability rule
  documented in ``safe_log``;
- eager-only input checks (``concrete``) that cost nothing inside a traced
  ``fit`` step;
- exact streaming counts with a pair of float32 accumulators
  (``accumulate``), which keeps metric counts exact past 2**24 on backends
  and devices without float64 or int64 (JAX by default, TPUs).
"""

import math

import numpy as np
from keras import KerasTensor, ops
from keras import backend as keras_backend

from klseg import registry
from klseg.errors import InvalidArgumentError

try:  # Keras' own losses attach masks this way; it has no public alias.
    from keras.src.backend import set_keras_mask as _set_keras_mask
except ImportError:  # pragma: no cover - older Keras 3 releases

    def _set_keras_mask(x, mask):
        x._keras_mask = mask


__all__ = [
    "TINY",
    "LOG_TINY",
    "LOG_FLOOR",
    "TEMPERATURE_RANGE",
    "TARGET_KINDS",
    "accumulate",
    "as_float32",
    "check_argument",
    "check_temperature",
    "concrete",
    "log_probs",
    "log_softmax",
    "move_axis_last",
    "per_pixel_weights",
    "normalize_axis",
    "pixel_weights",
    "segment_counts",
    "safe_log",
    "set_mask",
    "sparse_labels",
    "split_count",
    "target_mass",
    "to_tensor",
    "total",
    "valid_labels",
]

#: Smallest positive normal float32 (about 1.18e-38).
TINY = float(np.finfo(np.float32).tiny)
#: ``log(TINY)`` (about -87.34): the log-probability klseg gives a zero mass.
LOG_TINY = float(np.log(np.float32(TINY)))
#: Lowest log-probability klseg computes from logits (``-1e15``): a logit
#: gap beyond ``1e15 * temperature`` gives this value instead of an overflow.
#: Per-pixel divergences are then at most ``1e15 * T^2`` nats, finite for
#: every finite float32 input.
LOG_FLOOR = -1e15
#: Accepted temperatures, both ends included (``klseg.registry``).
TEMPERATURE_RANGE = registry.TEMPERATURE_RANGE
#: Accepted values of the ``target`` argument.
TARGET_KINDS = ("probabilities", "logits", "log_probabilities")


def check_argument(ok, name, expected, value):
    """Raise ``ValueError`` naming ``name`` unless ``ok``.

    The message reads "Invalid `name`: expected <expected>. Received:
    name=<value>".
    """
    if not ok:
        raise ValueError(
            f"Invalid `{name}`: expected {expected}. Received: {name}={value!r}"
        )


def check_temperature(temperature, name="temperature"):
    """``temperature`` as a float; ``InvalidArgumentError`` outside
    ``TEMPERATURE_RANGE``.

    The one temperature check of klseg (losses, fine-tuning, consistency,
    distillation). The accepted range is ``[1e-3, 1e3]``
    (``klseg.registry.TEMPERATURE_RANGE``): within it every value and
    gradient is finite for every finite input.

    Args:
        temperature: the value to check.
        name: the argument's name in the message. Defaults to
            ``"temperature"``.

    Returns:
        ``temperature`` as a Python float.

    Raises:
        klseg.errors.InvalidArgumentError: (a ``ValueError``) ``temperature``
            is not a finite number in the range.
    """
    low, high = TEMPERATURE_RANGE
    ok = isinstance(temperature, (int, float, np.floating, np.integer))
    ok = ok and not isinstance(temperature, bool)
    ok = ok and math.isfinite(float(temperature))
    ok = ok and low <= float(temperature) <= high
    if not ok:
        raise InvalidArgumentError(
            f"Invalid `{name}`: expected a number in [{low:g}, {high:g}]. "
            f"Received: {name}={temperature!r}"
        )
    return float(temperature)


def to_tensor(x, dtype=None):
    """``x`` (array, list, scalar, tensor or variable) as a backend tensor.

    ``ops.convert_to_tensor`` returns a TensorFlow variable unchanged, and
    variables lack part of the tensor interface (``ndim``) that other ops
    use; its value is read here (gradients still flow to the variable).
    """
    x = ops.convert_to_tensor(x, dtype=dtype)
    if not hasattr(x, "ndim"):  # a tf.Variable
        x = ops.add(x, ops.zeros((), x.dtype))
    return x


def as_float32(x):
    """Return ``x`` as a float32 tensor (no copy if it already is one)."""
    x = to_tensor(x)
    if x.dtype != "float32":
        x = ops.cast(x, "float32")
    return x


def log_softmax(x, temperature=1.0):
    """``log_softmax(x / temperature)`` over the last axis, finite for finite x.

    Floored at ``LOG_FLOOR``: for logit gaps below ``1e15 * temperature``
    this is the plain ``log_softmax``; larger gaps (up to the whole float32
    range, where ``x - max`` overflows to ``-inf``) give ``LOG_FLOOR``
    (probability 0) instead of ``-inf``, whose products with zero
    probabilities would be NaN. Below ``T = 1`` the logits are shifted by
    their maximum before the division, so ``x / T`` cannot overflow to
    ``+inf``.

    Args:
        x: float32 logits, classes on the last axis.
        temperature: a float in ``TEMPERATURE_RANGE``. Defaults to 1.0.

    Returns:
        float32 log-probabilities in ``[LOG_FLOOR, 0]``.
    """
    if temperature < 1.0:
        x = (x - ops.stop_gradient(ops.max(x, axis=-1, keepdims=True))) / temperature
    elif temperature != 1.0:
        x = x / temperature
    return ops.maximum(ops.log_softmax(x, axis=-1), LOG_FLOOR)


def safe_log(p):
    """``log(p)`` for probabilities, with ``log(0)`` defined as ``LOG_TINY``.

    ``log(max(p, TINY))``: exact for every positive normal float32 ``p``.
    An exact zero (which has no finite logarithm) becomes ``LOG_TINY`` =
    -87.34. As a weight (``p * log p``) this gives the exact ``0 * log 0 =
    0`` with a finite gradient; as a denominator (``log q`` with ``q = 0``
    where the target has mass) it bounds the otherwise infinite divergence
    at about 87.3 nats per unit of target mass, with zero gradient. This is
    not a stability clip: probabilities at or above 1.18e-38 are untouched.
    """
    return ops.log(ops.maximum(p, TINY))


def set_mask(values, mask):
    """Attach ``mask`` to ``values`` as the Keras mask ``Loss`` reads.

    ``keras.losses.Loss.__call__`` folds this mask into the reduction, so
    ``"sum_over_batch_size"`` divides by the number of ``True`` pixels.
    """
    _set_keras_mask(values, mask)
    return values


def normalize_axis(axis, rank):
    """Return ``axis`` as a non-negative index for a tensor of ``rank``."""
    if not -rank <= axis < rank:
        raise ValueError(
            f"Invalid `axis`: expected an integer in [{-rank}, {rank - 1}] "
            f"for inputs of rank {rank}. Received: axis={axis}"
        )
    return axis % rank


def move_axis_last(x, axis):
    """Move ``axis`` of ``x`` to the end (no-op when it already is last)."""
    rank = len(x.shape)
    axis = normalize_axis(axis, rank)
    if axis == rank - 1:
        return x
    return ops.moveaxis(x, axis, -1)


def log_probs(x, kind, temperature=1.0):
    """Float32 log-probabilities along the last axis, and the probabilities.

    Args:
        x: Tensor of scores over the last axis.
        kind: ``"logits"``, ``"probabilities"`` or ``"log_probabilities"``.
        temperature: Positive float; the distribution becomes
            ``softmax(log p / temperature)``. Defaults to 1.0.

    Returns:
        ``(probs, log_probs)``, both float32 and shaped like ``x``.
        For ``"logits"`` (and any kind at a temperature other than 1) the
        result is normalised by ``log_softmax``. ``"probabilities"`` and
        ``"log_probabilities"`` at temperature 1 are used as given (they
        are not renormalised), with zero mass mapped to ``LOG_TINY`` as in
        ``safe_log``. A zero mass stays (numerically) zero at any
        temperature.
    """
    x = as_float32(x)
    t = float(temperature)
    if kind == "logits":
        lp = log_softmax(x, t)
        return ops.exp(lp), lp
    if kind == "probabilities":
        if t == 1.0:
            return x, safe_log(x)
        lp = safe_log(x)
    elif kind == "log_probabilities":
        lp = ops.clip(x, LOG_TINY, 0.0)
        if t == 1.0:
            return ops.exp(lp), lp
    else:  # pragma: no cover - callers validate `kind`
        raise ValueError(f"Unknown kind {kind!r}")
    # Temperature on a given distribution: softmax(log p / T). A zero-mass
    # class gets LOG_TINY * max(1, 1 / T), below every positive mass's
    # log p / T (log p > LOG_TINY), so it keeps (numerically) no mass at any
    # temperature. log p / T >= LOG_TINY / 1e-3, far from overflow.
    zero = LOG_TINY * max(1.0, 1.0 / t)
    lp = ops.log_softmax(ops.where(lp > LOG_TINY, lp / t, zero), axis=-1)
    return ops.exp(lp), lp


def target_mass(y_true, target):
    """Bool per pixel: the target row (class axis last) has mass.

    A ``"probabilities"`` row has mass when it sums to more than 0; a
    ``"log_probabilities"`` row when some entry exceeds ``LOG_TINY`` (it is
    not all ``-inf``). Returns None for ``"logits"``: logit rows always
    define a distribution.
    """
    if target == "probabilities":
        return ops.sum(y_true, axis=-1) > 0
    if target == "log_probabilities":
        return ops.max(y_true, axis=-1) > LOG_TINY
    return None


def concrete(x):
    """Return ``x`` as a NumPy array if its values are known now, else None.

    Values are known in eager execution. Inside ``tf.function``, ``jax.jit``
    or ``jax.grad`` (every ``fit`` step) and for symbolic Keras tensors this
    returns None, so checks built on it cost nothing there.
    """
    if isinstance(x, KerasTensor):
        return None
    backend = keras_backend.backend()
    if backend == "tensorflow":
        if not hasattr(x, "numpy"):  # a symbolic tf.Tensor inside a graph
            return None
        return np.asarray(x.numpy())
    if backend == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # any other traced value
        return None


def sparse_labels(y_true, y_pred_shape, axis):
    """Squeeze a size-1 class axis from the labels and check their shape."""
    y_true = to_tensor(y_true)
    rank = len(y_pred_shape)
    if len(y_true.shape) == rank and y_true.shape[axis] == 1:
        y_true = ops.squeeze(y_true, axis=axis)
    expected = tuple(d for i, d in enumerate(y_pred_shape) if i != axis)
    got = tuple(y_true.shape)
    compatible = len(got) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(got, expected)
    )
    if not compatible:
        raise ValueError(
            "Integer labels `y_true` must have the shape of `y_pred` without "
            f"the class axis ({expected}, or with a trailing 1). Received: "
            f"y_true.shape={got}, y_pred.shape={tuple(y_pred_shape)}"
        )
    return y_true


def valid_labels(labels, num_classes, ignore_class):
    """Integer labels and the mask of pixels that count.

    Args:
        labels: Label tensor (integer, or float holding integers).
        num_classes: Number of classes ``C``.
        ignore_class: Label value to ignore, or None.

    Returns:
        ``(labels, valid)``: int32 labels and a bool mask that is False for
        ``ignore_class`` and for labels outside ``[0, C)``.

    Raises:
        ValueError: When the labels can be read (eager calls) and some lie
            outside ``[0, C)`` without being ``ignore_class``. Inside a
            compiled step such labels are treated like the ignore class.
    """
    if "float" in str(labels.dtype):
        labels = ops.round(labels)
    labels = ops.cast(labels, "int32")
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_class is not None:
        valid = valid & (labels != ignore_class)
    values = concrete(labels)
    if values is not None:
        bad = (values < 0) | (values >= num_classes)
        if ignore_class is not None:
            bad &= values != ignore_class
        if bad.any():
            found = np.unique(values[bad])[:5].tolist()
            raise ValueError(
                f"Labels must lie in [0, {num_classes}) or equal `ignore_class` "
                f"(ignore_class={ignore_class}). Received: labels {found} "
                f"({int(bad.sum())} pixels)"
            )
    return labels, valid


def pixel_weights(sample_weight, valid):
    """Float32 per-pixel weights: ``sample_weight`` broadcast, 0 off ``valid``.

    ``sample_weight`` may be None, a scalar, per-image ``(batch,)``, or any
    shape that broadcasts to the label shape once trailing axes are added
    (a trailing axis of size 1 is squeezed). Returns None when
    ``sample_weight`` is None (callers then count pixels as integers).
    """
    if sample_weight is None:
        return None
    w = as_float32(sample_weight)
    rank = len(valid.shape)
    if len(w.shape) == rank + 1 and w.shape[-1] == 1:
        w = ops.squeeze(w, -1)
    while len(w.shape) < rank:
        w = ops.expand_dims(w, -1)
    w = ops.broadcast_to(w, ops.shape(valid))
    return ops.where(valid, w, 0.0)


def per_pixel_weights(sample_weight, pixel_rank):
    """``sample_weight`` with trailing axes added up to ``pixel_rank``.

    Keras applies a loss's mask to ``sample_weight`` before broadcasting it,
    so a per-image weight ``(batch,)`` against per-pixel values ``(batch, H,
    W)`` fails (or, when ``W == batch``, silently weights columns). This
    gives ``(batch, 1, 1)``, which broadcasts over the pixels of each image.
    Weights of rank ``pixel_rank`` or more (per pixel, or with a trailing
    axis of size 1) and None are returned as tensors unchanged.
    """
    if sample_weight is None:
        return None
    w = to_tensor(sample_weight)
    if "float" not in str(w.dtype):
        w = ops.cast(w, "float32")
    while 0 < len(w.shape) < pixel_rank:
        w = ops.expand_dims(w, -1)
    return w


def segment_counts(ids, num_segments, weights=None, valid=None):
    """Per-segment counts as a float32 ``(hi, lo)`` pair (exact for integers).

    Args:
        ids: int32 segment ids in ``[0, num_segments)``.
        num_segments: Static number of segments.
        weights: Optional float32 weights (already 0 where not valid).
        valid: Optional bool mask of the ids that count (used when
            ``weights`` is None).

    Returns:
        ``(hi, lo)`` float32 tensors of shape ``(num_segments,)``. Without
        weights the counts are summed as int32 (exact up to 2**31 per call)
        and split exactly; with weights they are float32 sums (exact for
        integer weights while each per-call sum stays below 2**24).
    """
    ids = ops.reshape(ids, (-1,))
    if weights is None:
        data = ops.ones_like(ids) if valid is None else ops.cast(valid, "int32")
        data = ops.reshape(data, (-1,))
        counts = ops.segment_sum(data, ids, num_segments=num_segments)
        return split_count(counts)
    data = ops.reshape(weights, (-1,))
    sums = ops.segment_sum(data, ids, num_segments=num_segments)
    return sums, ops.zeros_like(sums)


# Streaming counts ---------------------------------------------------------
#
# Metric state is a pair of float32 variables (hi, lo) whose sum is the
# count. `accumulate` adds a float32 increment with Knuth's TwoSum, which
# computes the rounding error of `hi + x` exactly and carries it into `lo`.
# Integer-valued counts stay exact up to about 2**48 (the pair holds ~48
# significant bits); fractional sample weights keep ~1e-14 relative error.
# float64 is not used because JAX disables it by default and TPUs lack it;
# int64 is not used because it is int32 under default JAX (overflowing at
# 2**31) and cannot hold fractional weights.


def split_count(counts):
    """Split int32 counts into two float32 tensors that add up exactly.

    float32 holds integers exactly only up to 2**24, so a batch count of,
    say, 2**24 + 1 would round when cast. ``hi`` keeps the count rounded
    down to a multiple of 4096 (at most 19 significant bits), ``lo`` the
    remainder (below 4096); both convert to float32 without rounding.
    """
    counts = ops.cast(counts, "int32")
    hi = (counts // 4096) * 4096
    lo = counts - hi
    return ops.cast(hi, "float32"), ops.cast(lo, "float32")


def accumulate(hi, lo, x, x_lo=None):
    """Add float32 ``x`` to the compensated pair ``(hi, lo)``.

    Returns the new ``(hi, lo)``; ``hi + lo`` equals the exact sum of all
    increments to about 2**-48 relative. ``x_lo`` (optional) is a second,
    small part of the increment, as ``split_count`` and ``segment_counts``
    return.
    """
    if x_lo is not None:
        hi, lo = accumulate(hi, lo, x)
        return accumulate(hi, lo, x_lo)
    s = hi + x
    b = s - hi
    err = (hi - (s - b)) + (x - b)
    lo = lo + err
    # Renormalise so that `lo` stays small relative to `hi` (Fast2Sum).
    new_hi = s + lo
    lo = lo - (new_hi - s)
    return new_hi, lo


def total(hi, lo):
    """The float32 value of a compensated pair (rounded once)."""
    return hi + lo
