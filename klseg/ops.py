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

import numpy as np
from keras import KerasTensor, ops
from keras import backend as keras_backend

try:  # Keras' own losses attach masks this way; it has no public alias.
    from keras.src.backend import set_keras_mask as _set_keras_mask
except ImportError:  # pragma: no cover - older Keras 3 releases

    def _set_keras_mask(x, mask):
        x._keras_mask = mask


__all__ = [
    "TINY",
    "LOG_TINY",
    "TARGET_KINDS",
    "accumulate",
    "as_float32",
    "check_argument",
    "concrete",
    "log_probs",
    "move_axis_last",
    "normalize_axis",
    "safe_log",
    "set_mask",
    "split_count",
    "total",
]

#: Smallest positive normal float32 (about 1.18e-38).
TINY = float(np.finfo(np.float32).tiny)
#: ``log(TINY)`` (about -87.34): the log-probability klseg gives a zero mass.
LOG_TINY = float(np.log(np.float32(TINY)))
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


def as_float32(x):
    """Return ``x`` as a float32 tensor (no copy if it already is one)."""
    x = ops.convert_to_tensor(x)
    if x.dtype != "float32":
        x = ops.cast(x, "float32")
    return x


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
        lp = ops.log_softmax(x / t if t != 1.0 else x, axis=-1)
        return ops.exp(lp), lp
    if kind == "probabilities":
        if t == 1.0:
            return x, safe_log(x)
        lp = safe_log(x)
    elif kind == "log_probabilities":
        lp = ops.maximum(x, LOG_TINY)
        if t == 1.0:
            return ops.exp(lp), lp
    else:  # pragma: no cover - callers validate `kind`
        raise ValueError(f"Unknown kind {kind!r}")
    # Temperature on a given distribution: softmax(log p / T), keeping
    # zero-mass classes at LOG_TINY (dividing it by T would give them mass).
    lp = ops.log_softmax(ops.where(lp > LOG_TINY, lp / t, LOG_TINY), axis=-1)
    return ops.exp(lp), lp


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


def accumulate(hi, lo, x):
    """Add float32 ``x`` to the compensated pair ``(hi, lo)``.

    Returns the new ``(hi, lo)``; ``hi + lo`` equals the exact sum of all
    increments to about 2**-48 relative.
    """
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
