"""The per-pixel divergences: plain functions over ``keras.ops``.

``kl_divergence``, ``jensen_shannon_divergence`` and
``sparse_kl_divergence`` return per-pixel values in float32, computed from
``log_softmax`` on logits; the ``Loss`` classes of ``pixel_losses`` wrap
them. The conventions they share (what ``target`` means, how a zero
probability and a row without mass are treated) are in the docstring of
``klseg.losses``.
"""

import math

from keras import ops

from klseg.losses.checks import (
    check_axis,
    check_bool,
    check_class_weights,
    check_direction,
    check_distribution,
    check_ignore_class,
    check_label_smoothing,
    check_same_shape,
    check_target,
    class_axis_size,
    class_weight_tensor,
)
from klseg.ops import (
    LOG_FLOOR,
    as_float32,
    check_temperature,
    log_probs,
    log_softmax,
    move_axis_last,
    normalize_axis,
    sparse_labels,
    target_mass,
    valid_labels,
)

__all__ = [
    "kl_divergence",
    "jensen_shannon_divergence",
    "sparse_kl_divergence",
    "kl_between_logits",
    "sparse_kl_parts",
]


def _softmax_parts(x, temperature):
    """(log softmax, softmax) of ``x / T`` over the last axis, finite.

    As ``klseg.ops.log_softmax``: the log-probabilities are floored at
    ``LOG_FLOOR``, which turns the ``-inf`` of a logit gap beyond the
    float32 range into a finite value.
    """
    lp = log_softmax(x, temperature)
    return lp, ops.exp(lp)


def kl_between_logits(a, b, temperature=1.0):
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
        values = kl_between_logits(a, b, temperature)
    else:
        if target == "probabilities":
            check_distribution(y_true, "y_true")
        if not from_logits:
            check_distribution(y_pred, "y_pred")
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
    w = class_weight_tensor(class_weights, class_axis_size(y_true, "y_true"))
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
        ``axis``. Target rows without mass (see ``klseg.losses``) give 0.

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
    target = check_target(target)
    temperature = check_temperature(temperature)
    direction = check_direction(direction)
    from_logits = check_bool(from_logits, "from_logits")
    scale = check_bool(scale_by_temperature_squared, "scale_by_temperature_squared")
    class_weights = check_class_weights(class_weights)
    axis = check_axis(axis)
    y_true, y_pred = as_float32(y_true), as_float32(y_pred)
    check_same_shape(y_true, y_pred)
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
    target = check_target(target)
    from_logits = check_bool(from_logits, "from_logits")
    class_weights = check_class_weights(class_weights)
    axis = check_axis(axis)
    y_true, y_pred = as_float32(y_true), as_float32(y_pred)
    check_same_shape(y_true, y_pred)
    normalize_axis(axis, len(y_pred.shape))
    y_true, y_pred = move_axis_last(y_true, axis), move_axis_last(y_pred, axis)
    if target == "probabilities":
        check_distribution(y_true, "y_true")
    if not from_logits:
        check_distribution(y_pred, "y_pred")
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


def sparse_kl_parts(
    y_true, y_pred, *, from_logits, label_smoothing, ignore_class, class_weights, axis
):
    """``sparse_kl_divergence``'s values and the mask of its labelled pixels.

    The arguments are taken as checked. Shared by the function, which
    returns the values, and ``SparseKLDivergence``, which also marks the
    pixels without a label.
    """
    y_pred = as_float32(y_pred)
    rank = len(y_pred.shape)
    axis = normalize_axis(axis, rank)
    y_true = sparse_labels(y_true, tuple(y_pred.shape), axis)
    y_pred = move_axis_last(y_pred, axis)
    num_classes = class_axis_size(y_pred)
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
        check_distribution(y_pred, "y_pred")
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
    if class_weights is not None:
        w = class_weight_tensor(class_weights, num_classes)
        values = values * ops.take(w, safe)
    return values, valid


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
    from_logits = check_bool(from_logits, "from_logits")
    label_smoothing = check_label_smoothing(label_smoothing)
    ignore_class = check_ignore_class(ignore_class)
    class_weights = check_class_weights(class_weights)
    axis = check_axis(axis)
    values, _ = sparse_kl_parts(
        y_true,
        y_pred,
        from_logits=from_logits,
        label_smoothing=label_smoothing,
        ignore_class=ignore_class,
        class_weights=class_weights,
        axis=axis,
    )
    return values
