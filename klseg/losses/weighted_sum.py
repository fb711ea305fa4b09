"""``WeightedSum``: a weighted sum of losses, each given the inputs it takes."""

import math

import keras
from keras import ops

from klseg.losses.checks import check_bool, check_ignore_class, class_axis_size
from klseg.ops import (
    as_float32,
    check_argument,
    log_probs,
    per_pixel_weights,
    set_mask,
    to_tensor,
)

__all__ = ["WeightedSum"]


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


def _check_weights(weights, count):
    """``weights`` as ``count`` finite floats (all 1.0 when None)."""
    if weights is None:
        weights = [1.0] * count
    try:
        w = [float(v) for v in weights]
    except (TypeError, ValueError):
        w = None
    check_argument(
        w is not None and len(w) == count and all(math.isfinite(v) for v in w),
        "weights",
        f"{count} finite numbers (one per loss)",
        weights,
    )
    return w


def _prediction(takes_logits, y_pred, shared):
    """Logits or probabilities from ``y_pred``, kept in ``shared`` once made.

    Logits from probabilities are their logarithms (``klseg.ops.safe_log``);
    probabilities from logits their softmax.
    """
    if takes_logits:
        if "logits" not in shared:
            _, shared["logits"] = log_probs(y_pred, "probabilities")
        return shared["logits"]
    if "probabilities" not in shared:
        shared["probabilities"] = ops.softmax(y_pred, axis=-1)
    return shared["probabilities"]


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
        self.weights = _check_weights(weights, len(self.losses))
        self.from_logits = check_bool(from_logits, "from_logits")
        self.ignore_class = check_ignore_class(ignore_class)
        self._dtype_arg = dtype if isinstance(dtype, (str, type(None))) else None

    def __call__(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = to_tensor(y_true), as_float32(y_pred)
        sample_weight = per_pixel_weights(sample_weight, len(y_pred.shape) - 1)
        # The inputs the parts share, made once and only when a part needs them.
        shared = {"logits" if self.from_logits else "probabilities": y_pred}
        sparse = self._is_sparse(y_true, y_pred)
        total = None
        for weight, loss in zip(self.weights, self.losses):
            target, prediction = self._inputs_of(loss, y_true, y_pred, sparse, shared)
            value = loss(target, prediction, sample_weight=sample_weight)
            value = ops.cast(value, "float32") * weight
            total = value if total is None else total + value
        return total

    def _inputs_of(self, loss, y_true, y_pred, sparse, shared):
        """(target, prediction) in the form the part ``loss`` takes."""
        from_logits = _from_logits_argument(loss)
        prediction = _prediction(from_logits is True, y_pred, shared)
        if not sparse or _takes_labels(loss):
            return y_true, prediction
        if "one_hot" not in shared:
            shared["one_hot"], shared["valid"] = self._dense_target(y_true, y_pred)
        valid = shared["valid"]
        if from_logits is None:
            # Dice, Tversky: they pool the batch; zeros add nothing.
            mask = ops.expand_dims(valid, -1)
            prediction = ops.where(mask, prediction, 0.0)
        else:
            # A fresh tensor, to carry this part's mask alone.
            prediction = ops.add(prediction, 0.0)
        return shared["one_hot"], set_mask(prediction, valid)

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
        num_classes = class_axis_size(y_pred)
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, -1)
        labels = ops.cast(ops.round(as_float32(y_true)), "int32")
        valid = (labels >= 0) & (labels < num_classes)
        if self.ignore_class is not None:
            valid = valid & (labels != self.ignore_class)
        one_hot = ops.one_hot(ops.where(valid, labels, 0), num_classes)
        one_hot = one_hot * ops.expand_dims(ops.cast(valid, one_hot.dtype), -1)
        return one_hot, valid

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
