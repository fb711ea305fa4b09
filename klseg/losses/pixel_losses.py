"""The per-pixel divergence losses: ``keras.losses.Loss`` classes.

Each class is a thin wrapper over its function in ``divergences`` (see
``DivergenceLoss``): it checks its arguments in ``__init__``, and its
``call`` returns the function's per-pixel values with a Keras mask on the
pixels without a target when ``ignore_class`` is set, so Keras' default
``"sum_over_batch_size"`` reduction gives the mean over non-ignored pixels.
"""

import keras

from klseg.losses.base import DivergenceLoss, SoftTargetLoss, mark_valid
from klseg.losses.checks import (
    check_axis,
    check_bool,
    check_class_weights,
    check_direction,
    check_ignore_class,
    check_label_smoothing,
    check_soft_ignore_class,
    check_target,
)
from klseg.losses.divergences import (
    jensen_shannon_divergence,
    kl_divergence,
    sparse_kl_parts,
)
from klseg.ops import check_temperature

__all__ = ["KLDivergence", "SparseKLDivergence", "JensenShannonDivergence"]


@keras.saving.register_keras_serializable(package="klseg")
class KLDivergence(SoftTargetLoss):
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
        super().__init__(kl_divergence, name=name, reduction=reduction, dtype=dtype)
        self._set_arguments(
            from_logits=check_bool(from_logits, "from_logits"),
            target=check_target(target),
            temperature=check_temperature(temperature),
            scale_by_temperature_squared=check_bool(
                scale_by_temperature_squared, "scale_by_temperature_squared"
            ),
            direction=check_direction(direction),
            ignore_class=check_soft_ignore_class(
                ignore_class,
                target,
                "(logit rows always define a distribution; mask pixels with "
                "`sample_weight` instead)",
            ),
            class_weights=check_class_weights(class_weights),
            axis=check_axis(axis),
        )


@keras.saving.register_keras_serializable(package="klseg")
class SparseKLDivergence(DivergenceLoss):
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
        super().__init__(sparse_kl_parts, name=name, reduction=reduction, dtype=dtype)
        self._set_arguments(
            from_logits=check_bool(from_logits, "from_logits"),
            label_smoothing=check_label_smoothing(label_smoothing),
            ignore_class=check_ignore_class(ignore_class),
            class_weights=check_class_weights(class_weights),
            axis=check_axis(axis),
        )

    def _mark_ignored(self, output, y_true):
        values, valid = output
        return mark_valid(values, valid)


@keras.saving.register_keras_serializable(package="klseg")
class JensenShannonDivergence(SoftTargetLoss):
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
        super().__init__(
            jensen_shannon_divergence, name=name, reduction=reduction, dtype=dtype
        )
        self._set_arguments(
            from_logits=check_bool(from_logits, "from_logits"),
            target=check_target(target),
            ignore_class=check_soft_ignore_class(
                ignore_class, target, "(mask pixels with `sample_weight`)"
            ),
            class_weights=check_class_weights(class_weights),
            axis=check_axis(axis),
        )
