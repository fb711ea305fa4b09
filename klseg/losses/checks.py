"""Argument and input checks of the losses.

Argument checks run in the constructors (and at the top of the functions)
and return the value in the form it is stored; they raise ``ValueError``
through ``klseg.ops.check_argument``, ending ``Received: name=value``. The
temperature check is ``klseg.ops.check_temperature``, shared with the rest
of klseg. Input checks look at tensors: their shapes, and, when values can
be read (eager calls), whether probability inputs are distributions.
"""

import numpy as np
from keras import ops

from klseg.ops import TARGET_KINDS, check_argument, concrete

__all__ = [
    "DIRECTIONS",
    "check_bool",
    "check_target",
    "check_direction",
    "check_axis",
    "check_label_smoothing",
    "check_ignore_class",
    "check_soft_ignore_class",
    "check_class_weights",
    "class_axis_size",
    "class_weight_tensor",
    "check_same_shape",
    "check_distribution",
]

#: The KL directions: KL(target || prediction) and KL(prediction || target).
DIRECTIONS = ("forward", "reverse")
#: How far from 1 a probability row may sum before it is refused.
_SUM_TOLERANCE = 1e-2


# Arguments -------------------------------------------------------------------


def check_bool(value, name):
    check_argument(isinstance(value, (bool, np.bool_)), name, "a bool", value)
    return bool(value)


def check_target(target):
    check_argument(target in TARGET_KINDS, "target", f"one of {TARGET_KINDS}", target)
    return target


def check_direction(direction):
    check_argument(
        direction in DIRECTIONS, "direction", f"one of {DIRECTIONS}", direction
    )
    return direction


def check_axis(axis):
    ok = isinstance(axis, (int, np.integer)) and not isinstance(axis, bool)
    check_argument(ok, "axis", "an integer", axis)
    return int(axis)


def check_label_smoothing(label_smoothing):
    ok = isinstance(label_smoothing, (int, float, np.floating, np.integer))
    ok = ok and not isinstance(label_smoothing, bool)
    ok = ok and 0.0 <= float(label_smoothing) <= 1.0
    check_argument(ok, "label_smoothing", "a number in [0, 1]", label_smoothing)
    return float(label_smoothing)


def check_ignore_class(ignore_class):
    ok = ignore_class is None or (
        isinstance(ignore_class, (int, np.integer))
        and not isinstance(ignore_class, bool)
    )
    check_argument(ok, "ignore_class", "None or an integer label", ignore_class)
    return None if ignore_class is None else int(ignore_class)


def check_soft_ignore_class(ignore_class, target, why):
    """``ignore_class`` checked, and refused with ``target="logits"``.

    A logit row always defines a distribution, so no pixel of a logit map
    has an empty target; ``why`` ends the message.
    """
    checked = check_ignore_class(ignore_class)
    check_argument(
        checked is None or target != "logits",
        "ignore_class",
        f'None when target="logits" {why}',
        ignore_class,
    )
    return checked


def check_class_weights(class_weights):
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


# Inputs ----------------------------------------------------------------------


def class_axis_size(y_pred, name="y_pred"):
    """The static size of the last (class) axis of ``y_pred``."""
    size = y_pred.shape[-1]
    if size is None:
        raise ValueError(
            f"The class axis of `{name}` must have a static size. "
            f"Received: {name}.shape={tuple(y_pred.shape)}"
        )
    return int(size)


def class_weight_tensor(class_weights, num_classes):
    """``class_weights`` as a float32 tensor, one weight per class."""
    if len(class_weights) != num_classes:
        raise ValueError(
            f"`class_weights` needs one weight per class ({num_classes} classes "
            f"in the inputs). Received: len(class_weights)={len(class_weights)}"
        )
    return ops.convert_to_tensor(np.asarray(class_weights, dtype="float32"))


def check_same_shape(y_true, y_pred):
    a, b = tuple(y_true.shape), tuple(y_pred.shape)
    compatible = len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )
    if not compatible:
        raise ValueError(
            "`y_true` and `y_pred` must have the same shape (batch, ..., classes). "
            f"Received: y_true.shape={a}, y_pred.shape={b}"
        )


def check_distribution(x, name):
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
