"""The base of klseg's divergence losses: a thin wrapper over a function.

As ``keras.losses.LossFunctionWrapper``, a loss class states its function
and its arguments once: the function goes to ``DivergenceLoss.__init__``,
the checked arguments to ``_set_arguments``; the base stores each argument
as an attribute, returns it from ``get_config`` and passes it to the
function in ``call``. (Two steps, so that Keras checks ``reduction`` and
``dtype`` before the class checks its own arguments, in their order.)
"""

import keras
import numpy as np
from keras import ops

from klseg.ops import (
    as_float32,
    move_axis_last,
    per_pixel_weights,
    set_mask,
    target_mass,
)

__all__ = ["DivergenceLoss", "SoftTargetLoss", "mark_valid"]


def _pixel_rank(y_pred):
    """Rank of the per-pixel values: that of ``y_pred`` less the class axis."""
    shape = getattr(y_pred, "shape", None)
    if shape is None:
        shape = np.shape(y_pred)
    return len(shape) - 1


def mark_valid(values, valid):
    """Zero ``values`` outside ``valid`` and attach ``valid`` as Keras mask."""
    values = ops.where(valid, values, 0.0)
    return set_mask(values, valid)


class DivergenceLoss(keras.losses.Loss):
    """A ``Loss`` that wraps a function returning per-pixel values.

    ``call`` returns ``fn(y_true, y_pred, **arguments)`` with the ignored
    pixels marked (``_mark_ignored``), never a scalar: Keras then applies
    ``sample_weight``, the mask and the reduction. The base also keeps the
    constructor's ``dtype`` in ``get_config`` and broadcasts a per-image
    ``sample_weight`` over the pixels.

    A subclass passes its function here, then its checked arguments to
    ``_set_arguments``, once.

    Args:
        fn: The function, called as ``fn(y_true, y_pred, **arguments)``.
        name: As ``keras.losses.Loss``.
        reduction: As ``keras.losses.Loss``.
        dtype: As ``keras.losses.Loss``; kept as given in ``get_config``.
    """

    #: Arguments the class uses itself (to mark pixels) and keeps from ``fn``.
    own_arguments = ()

    def __init__(self, fn, *, name, reduction, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.fn = fn
        self._argument_names = ()
        self._dtype_arg = dtype if isinstance(dtype, (str, type(None))) else None
        if self._dtype_arg is None and dtype is not None:
            self._dtype_arg = keras.dtype_policies.serialize(dtype)

    def _set_arguments(self, **arguments):
        """Store the checked arguments, in the order ``get_config`` lists them.

        Each becomes an attribute and a ``get_config`` key; all but those
        named in ``own_arguments`` are passed to ``fn``.
        """
        self._argument_names = tuple(arguments)
        for name, value in arguments.items():
            setattr(self, name, value)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Per-image weights (batch,) become (batch, 1, 1): Keras masks the
        # weights before broadcasting them to the per-pixel values.
        sample_weight = per_pixel_weights(sample_weight, _pixel_rank(y_pred))
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        output = self.fn(y_true, y_pred, **self._fn_arguments())
        return self._mark_ignored(output, y_true)

    def _fn_arguments(self):
        """The stored arguments that ``fn`` takes, by name."""
        names = (n for n in self._argument_names if n not in self.own_arguments)
        return {name: getattr(self, name) for name in names}

    def _mark_ignored(self, output, y_true):
        """``call``'s values from ``fn``'s output; by default the output."""
        return output

    def get_config(self):
        config = super().get_config()
        config["dtype"] = self._dtype_arg
        config.update({name: getattr(self, name) for name in self._argument_names})
        return config


class SoftTargetLoss(DivergenceLoss):
    """A ``DivergenceLoss`` whose ``y_true`` is a soft map (``target``, ``axis``).

    With ``ignore_class`` set, the pixels whose target row carries no mass
    (sums to 0 for probabilities; see ``klseg.ops.target_mass``) are
    excluded from the mean through a Keras mask.
    """

    own_arguments = ("ignore_class",)

    def _mark_ignored(self, output, y_true):
        if self.ignore_class is None:
            return output
        y_true = move_axis_last(as_float32(y_true), self.axis)
        return mark_valid(output, target_mass(y_true, self.target))
