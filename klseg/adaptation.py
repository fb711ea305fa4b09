"""Adaptation without target labels: self-training, AdaBN and TENT.

A model trained on a *source* domain meets a *target* domain of which only
unlabelled images are known. Three ways to adapt it, from the slowest and
strongest to the fastest:

- ``SelfTrainingModel``: an EMA teacher's pseudo-labels on target images
  teach a student that sees a strong view of them (ClassMix, colour jitter,
  blur, noise; ``klseg.consistency.MeanTeacherModel``), with the KL term to
  the frozen source model as the guard against drift. With labelled source
  images (unsupervised domain adaptation, as DACS, Tranheden et al. 2021)
  the supervised loss on source labels joins in and the strong view pastes
  the pixels of half the classes of a source image, with their source labels,
  onto a target image. Without them (source-free, as SHOT, Liang et al.
  2020), the class-balance term keeps the predicted class distribution near
  the source model's and the classifier can be frozen
  (:func:`freeze_classifier`).
- :func:`adapt_batchnorm` (AdaBN, Li et al. 2016): BatchNorm statistics
  re-estimated on target images, no gradient.
- ``TentModel`` (TENT, Wang et al. 2021): entropy minimisation over the
  BatchNorm scales and offsets alone, BatchNorm normalising with the
  statistics of each batch.

Everything here uses ``keras.ops`` only and runs on the TensorFlow and JAX
backends, including under ``tf.distribute``.
"""

import itertools
import math

import keras
from keras import ops

from klseg.consistency import (
    MeanTeacherModel,
    classmix_mask,
    mix_batch,
    photometric_augment,
)
from klseg.errors import InvalidArgumentError
from klseg.finetune import KLRegularizedModel, unpack_inputs
from klseg.replicas import global_sum, num_replicas

__all__ = [
    "LOST_FRACTION",
    "LOST_REFERENCE",
    "ClassShares",
    "SelfTrainingModel",
    "TentModel",
    "adapt_batchnorm",
    "batchnorm_layers",
    "class_balance_divergence",
    "entropy",
    "freeze_classifier",
]


# Formulas -----------------------------------------------------------------


def entropy(logits):
    """Per-pixel entropy ``-sum_c p_c log p_c`` of ``softmax(logits)``.

    Computed in float32 from ``log_softmax`` (finite for every finite
    input; 0 for a one-hot prediction, ``log K`` for a uniform one).

    Args:
        logits: ``(..., K)`` logits.

    Returns:
        float32 tensor of shape ``(...)``.

    Example:

    >>> import numpy as np
    >>> round(float(entropy(np.zeros((1, 4)))[0]), 4)  # log 4
    1.3863
    """
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    return -ops.sum(ops.exp(log_probs) * log_probs, axis=-1)


def class_balance_divergence(logits, reference):
    """``KL(reference || mean_p softmax(logits_p))``: how far the predicted
    class distribution of a batch is from a reference distribution.

        pbar_c = mean over pixels p of softmax(logits_p)_c
        value  = sum_c r_c (log r_c - log pbar_c)      (0 log 0 = 0)

    With a uniform ``reference`` this is SHOT's diversity term up to the
    direction of the KL; this direction grows without bound when a class of
    the reference disappears from the predictions (collapse), where
    ``KL(pbar || r)`` stays below ``log K``.

    Args:
        logits: ``(..., K)`` logits of the pixels of the batch.
        reference: ``(K,)`` probabilities (e.g. the source model's mean
            prediction on the same images).

    Returns:
        A float32 scalar.
    """
    num_classes = int(logits.shape[-1])
    probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
    mean = ops.mean(ops.reshape(probs, (-1, num_classes)), axis=0)
    reference = ops.cast(reference, "float32")
    # log of a mean of softmax values: >= exp(min logit gap) > 0 in exact
    # arithmetic; the floor only guards float32 underflow.
    log_mean = ops.log(ops.maximum(mean, 1e-30))
    log_reference = ops.log(ops.maximum(reference, 1e-30))
    terms = ops.where(reference > 0, reference * (log_reference - log_mean), 0.0)
    return ops.sum(terms)


# Layers -------------------------------------------------------------------


def batchnorm_layers(model):
    """The ``BatchNormalization`` layers of ``model``, nested ones included."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _require_batchnorm(model, method):
    layers = batchnorm_layers(model)
    if not layers:
        raise InvalidArgumentError(
            f"{method} adapts BatchNormalization layers and model "
            f"{model.name!r} has none; use self-training instead."
        )
    return layers


def freeze_classifier(model):
    """Freeze the last layer with weights (the classifier), as SHOT does.

    Returns:
        The name of the frozen layer.
    """
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if layer.weights and not layer._flatten_layers(include_self=False)
    ]
    if not layers:
        raise InvalidArgumentError(f"Model {model.name!r} has no layer with weights.")
    layers[-1].trainable = False
    return layers[-1].name


def adapt_batchnorm(model, batches, *, steps=None):
    """AdaBN: re-estimate every BatchNorm layer's statistics on target images.

    The moving mean and variance of each ``BatchNormalization`` layer become
    the average over the batches of the batch statistics the layer sees with
    the model in training mode (batch ``n`` enters with weight ``1/n``: the
    cumulative average, PyTorch's ``momentum=None``). No weight other than
    the moving statistics changes; layers frozen with ``trainable=False``
    are re-estimated too.

    Args:
        model: a Keras model with BatchNorm layers.
        batches: an iterable of image batches, or of ``(images, ...)``
            tuples, or of dicts with ``"images"``.
        steps: the number of batches to use. Defaults to None (all).

    Returns:
        The number of images seen.

    Raises:
        InvalidArgumentError: the model has no BatchNorm layer, or no batch
            was given.
    """
    layers = _require_batchnorm(model, "adapt_batchnorm")
    saved = [(layer, layer.momentum, layer.trainable) for layer in layers]
    seen = 0
    try:
        for layer in layers:
            layer.trainable = True
        for n, batch in enumerate(itertools.islice(batches, steps), start=1):
            images = _images_of(batch)
            for layer in layers:
                layer.momentum = (n - 1) / n
            model(images, training=True)
            seen += int(ops.shape(images)[0])
    finally:
        for layer, momentum, trainable in saved:
            layer.momentum = momentum
            layer.trainable = trainable
    if not seen:
        raise InvalidArgumentError("adapt_batchnorm received no batch of images.")
    return seen


def _images_of(batch):
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch["images"]
    return ops.cast(batch, "float32")


# Pseudo-label statistics --------------------------------------------------


@keras.saving.register_keras_serializable(package="klseg")
class ClassShares(keras.metrics.Metric):
    """The share of pixels predicted as each class, over an epoch.

    ``update_state(logits)`` counts the argmax of every pixel; ``result()``
    is the normalised entropy of the shares, ``H(shares) / log K`` in
    [0, 1] (1: every class equally often; 0: one class everywhere), the
    collapse signal in one number; :meth:`shares` gives the vector.

    ``reference`` (set with :meth:`set_reference`, zeros by default) holds
    the shares the counts are compared with; it is state of the metric (so
    that it is at hand in a JAX metrics step) that ``reset_state`` keeps.
    """

    def __init__(self, num_classes, name="class_shares", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.counts = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", name="counts"
        )
        self.reference = self.add_variable(
            shape=(self.num_classes,),
            initializer="zeros",
            name="reference",
            aggregation="mean",
        )

    def set_reference(self, shares):
        shares = ops.convert_to_numpy(shares).astype("float32").reshape(-1)
        if shares.shape != (self.num_classes,):
            raise InvalidArgumentError(
                f"reference shares must have one entry per class "
                f"({self.num_classes}). Received: shape {shares.shape}"
            )
        self.reference.assign(shares)

    def update_state(self, logits, sample_weight=None):
        del sample_weight
        classes = ops.reshape(ops.argmax(logits, axis=-1), (-1,))
        onehot = ops.one_hot(classes, self.num_classes)
        self.counts.assign_add(ops.cast(ops.sum(onehot, axis=0), self.counts.dtype))

    def shares(self):
        counts = ops.cast(self.counts, "float32")
        return counts / ops.maximum(ops.sum(counts), 1.0)

    def result(self):
        shares = self.shares()
        logs = ops.log(ops.maximum(shares, 1e-30))
        value = -ops.sum(ops.where(shares > 0, shares * logs, 0.0))
        return value / math.log(max(self.num_classes, 2))

    def reset_state(self):
        self.counts.assign(ops.zeros(self.counts.shape, self.counts.dtype))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidArgumentError(
            f"`{name}` must be a number >= 0. Received: {name}={value!r}"
        )
    return float(value)


# Self-training ------------------------------------------------------------

#: The collapse signal (``SelfTrainingModel.lost_classes``): a class the
#: source model predicts on at least LOST_REFERENCE of the target pixels is
#: lost when the pseudo-labels give it less than LOST_FRACTION of that share.
LOST_REFERENCE = 0.01
LOST_FRACTION = 0.1


@keras.saving.register_keras_serializable(package="klseg")
class SelfTrainingModel(MeanTeacherModel):
    """Self-training on unlabelled target images with the KL guard.

    Inputs: ``x["images"]`` with masks ``y`` (labelled source images for
    unsupervised domain adaptation; for source-free adaptation, target images
    whose masks are all ``ignore_class``), ``x["unlabeled_images"]`` (target
    images, the same batch size and image size as ``x["images"]``).

    Total loss of a training step:

        task_loss + kl_weight * KL_source
                  + consistency_weight * ramp(step) * self_training
                  + balance_weight * balance

    - ``task_loss`` and ``KL_source`` are ``KLRegularizedModel``'s, on
      ``x["images"]`` (``kl_inputs="target"``: the KL to the frozen source
      model is taken on source images when they are labelled source images,
      else on the target images).
    - ``self_training`` is ``MeanTeacherModel``'s consistency term (the EMA
      teacher's softened predictions on the weak view, confidence threshold,
      FixMatch normalisation over all target pixels), with one change when
      ``cross_domain_mix`` is on and the batch has labelled pixels: the
      strong view pastes, onto target image ``i``, the pixels of labelled
      image ``i`` whose *label* is one of a random half of the classes
      present (DACS' ClassMix across domains; ``classmix_mask``), and the
      pasted pixels are pulled towards their label by cross-entropy
      ``-log softmax(z_p)[y_p]`` instead of towards the teacher. Without
      labelled pixels the strong view mixes target images with each other
      (``mix``).
    - ``balance`` (source-free guard) is ``class_balance_divergence`` of the
      student's predictions on ``x["images"]`` against the frozen source
      model's mean prediction on the same images (each replica's batch
      under ``tf.distribute``).

    Logs, beside ``MeanTeacherModel``'s: ``confident_share`` (share of
    target pixels whose teacher confidence on the weak view reaches
    ``consistency_threshold``), ``pseudo_class_entropy`` (``ClassShares``
    of the teacher's weak-view predictions: the collapse signal; the vector
    is :meth:`pseudo_label_shares`), and ``balance_loss`` when
    ``balance_weight > 0``.

    Args:
        student: the model to adapt (see ``KLRegularizedModel``).
        source: the frozen source model.
        cross_domain_mix: paste labelled pixels onto target images in the
            strong view. Defaults to True.
        balance_weight: weight of the class-balance term (>= 0). Defaults
            to 0.0.
        **kwargs: ``MeanTeacherModel`` arguments (``consistency_weight``,
            ``ema_decay``, ``consistency_threshold``, ``consistency_rampup``,
            ``mix``, ``photometric``, ``seed``, ``kl_weight``,
            ``temperature``, ``student_bn``, ``ignore_class``, ``name``);
            ``kl_inputs`` is ``"target"``.

    Example:

    ```python
    model = SelfTrainingModel(clone_student(source), source, kl_weight=0.3)
    model.compile(optimizer="adam",
                  loss=klseg.losses.SparseKLDivergence(ignore_class=255))
    model.fit(ds)  # x: {"images": source images, "unlabeled_images": target}
    model.ema_model.save("adapted.keras")
    ```
    """

    def __init__(
        self, student, source, *, cross_domain_mix=True, balance_weight=0.0, **kwargs
    ):
        if not isinstance(cross_domain_mix, bool):
            raise InvalidArgumentError(
                "`cross_domain_mix` must be True or False. "
                f"Received: cross_domain_mix={cross_domain_mix!r}"
            )
        balance_weight = _number(balance_weight, "balance_weight")
        kwargs.setdefault("kl_inputs", "target")
        if kwargs["kl_inputs"] != "target":
            raise InvalidArgumentError(
                "SelfTrainingModel takes the KL term on x['images'] "
                f"(kl_inputs='target'). Received: kl_inputs={kwargs['kl_inputs']!r}"
            )
        super().__init__(student, source, **kwargs)
        if balance_weight > 0 and self.class_map is not None:
            raise InvalidArgumentError(
                "balance_weight > 0 needs the source model's classes to be the "
                "student's (no class map)."
            )
        self.cross_domain_mix = cross_domain_mix
        self.balance_weight = balance_weight
        self.confident_share_tracker = keras.metrics.Mean(name="confident_share")
        self.pseudo_shares = ClassShares(self.num_classes, name="pseudo_class_entropy")
        self.balance_loss_tracker = keras.metrics.Mean(name="balance_loss")
        # Whether compute_loss runs a training step: then _strong_view counts
        # the pseudo-labels (the weak view's; _track_teacher sees the strong
        # view's teacher logits, maybe mixed). The same on every replica.
        self._training_step = False

    def set_reference_shares(self, shares):
        """Set the class shares the collapse signal compares with (the source
        model's predictions on the target images; zeros, the default, turn it
        off). Not saved with the model: set it again after loading."""
        self.pseudo_shares.set_reference(shares)

    @property
    def reference_shares(self):
        """The shares :meth:`lost_classes` compares with (a variable)."""
        return self.pseudo_shares.reference

    def lost_classes(self, shares=None):
        """The classes the teacher's pseudo-labels lost: those with a reference
        share of at least ``LOST_REFERENCE`` whose share fell below
        ``LOST_FRACTION`` of it (a bool vector)."""
        shares = self.pseudo_shares.shares() if shares is None else shares
        reference = ops.cast(self.reference_shares, "float32")
        return (reference >= LOST_REFERENCE) & (shares < LOST_FRACTION * reference)

    def pseudo_label_shares(self):
        """The epoch's share of target pixels per class in the teacher's
        weak-view predictions (a numpy vector)."""
        return keras.ops.convert_to_numpy(self.pseudo_shares.shares())

    def _track_teacher(self, teacher_logits, confidence, count):
        super()._track_teacher(teacher_logits, confidence, count)
        confident = ops.cast(confidence >= self.consistency_threshold, "float32")
        self.confident_share_tracker.update_state(
            ops.mean(confident), sample_weight=count
        )
        if not self._training_step:
            self.pseudo_shares.update_state(teacher_logits)

    def _strong_view(self, images, teacher_logits, parts, y):
        self.pseudo_shares.update_state(teacher_logits)  # the weak view's
        if not self.cross_domain_mix or y is None:
            return super()._strong_view(images, teacher_logits, parts, y)
        labels = ops.cast(y, "int32")
        if len(labels.shape) == 4:
            labels = ops.squeeze(labels, -1)
        pasted = classmix_mask(labels, self.num_classes, seed=self.strong_view_seed)
        labelled = ops.cast(parts["images"], "float32")
        # A batch without labelled pixels mixes target images with each other.
        mixed, mixed_logits, _ = mix_batch(
            images, teacher_logits, mix=self.mix, seed=self.strong_view_seed
        )
        # Whether the global batch has labelled pixels (every replica takes
        # the branch one device takes).
        has_labels = global_sum(ops.cast(ops.any(pasted), "float32")) > 0
        images = ops.where(
            has_labels, ops.where(pasted[..., None], labelled, images), mixed
        )
        teacher_logits = ops.where(has_labels, teacher_logits, mixed_logits)
        if self.photometric:
            images = photometric_augment(images, seed=self.strong_view_seed)
        return images, teacher_logits, ops.where(pasted, labels, -1)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The loss of one batch (see the class docstring)."""
        self._training_step = bool(training)
        total = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        if self.balance_weight <= 0:
            return total
        images = unpack_inputs(x)["images"]
        n = ops.shape(images)[0]
        reference = ops.softmax(
            ops.cast(self.source(images, training=False), "float32"), axis=-1
        )
        reference = ops.stop_gradient(
            ops.mean(ops.reshape(reference, (-1, self.num_source_classes)), axis=0)
        )
        balance = class_balance_divergence(y_pred[:n], reference)
        self.balance_loss_tracker.update_state(balance)
        # This replica's share (Keras sums the replicas' gradients).
        balance = balance / float(num_replicas())
        return total + ops.cast(self.balance_weight * balance, total.dtype)

    def get_metrics_result(self):
        """The metrics, ``loss`` including the balance term, and the
        pseudo-label statistics: ``lost_classes`` (how many classes
        :meth:`lost_classes` counts) and ``pseudo_share_<c>`` per class."""
        results = super().get_metrics_result()
        results["loss"] = results["loss"] + ops.cast(
            self.balance_weight, "float32"
        ) * ops.cast(self.balance_loss_tracker.result(), results["loss"].dtype)
        if self.balance_weight <= 0:
            results.pop(self.balance_loss_tracker.name, None)
        shares = self.pseudo_shares.shares()
        results["lost_classes"] = ops.sum(
            ops.cast(self.lost_classes(shares), "float32")
        )
        for c in range(self.num_classes):
            results[f"pseudo_share_{c}"] = shares[c]
        return results

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "cross_domain_mix": self.cross_domain_mix,
                "balance_weight": self.balance_weight,
            }
        )
        return config


# TENT ---------------------------------------------------------------------


def _tent_trainable(student):
    """Only the BatchNorm scales and offsets train (BatchNorm layers stay
    trainable, so they normalise with the batch's statistics)."""
    layers = _require_batchnorm(student, "TENT")
    for layer in student._flatten_layers(include_self=False):
        if not layer._flatten_layers(include_self=False):
            layer.trainable = False
    for layer in layers:
        layer.trainable = True
    return layers


@keras.saving.register_keras_serializable(package="klseg")
class TentModel(KLRegularizedModel):
    """TENT: entropy minimisation over the BatchNorm affine parameters.

    Total loss of a training step on target images ``x["images"]`` (masks
    ``y``, if given, are all ``ignore_class`` and add nothing):

        entropy_weight * mean_p H(softmax(z_p)) + kl_weight * KL_source

    with ``z`` the student's logits in training mode (BatchNorm normalises
    with each batch's statistics, as TENT does at test time), the mean over
    the global batch's pixels, and the KL term to the frozen source model on
    the same images (``KLRegularizedModel``, ``kl_inputs="target"``; off by
    default, as in TENT). Only the scales and offsets of the student's
    BatchNorm layers are trainable; their moving statistics follow the
    batches. Log: ``entropy`` (epoch mean over pixels).

    Args:
        student: the model to adapt; it must have BatchNorm layers.
        source: the frozen source model.
        entropy_weight: weight of the entropy term (>= 0). Defaults to 1.0.
        **kwargs: ``KLRegularizedModel`` arguments (``kl_weight`` defaults
            to 0.0 here).
    """

    def __init__(self, student, source, *, entropy_weight=1.0, **kwargs):
        self.entropy_weight = _number(entropy_weight, "entropy_weight")
        kwargs.setdefault("kl_weight", 0.0)
        kwargs["kl_inputs"] = "target"
        kwargs.setdefault("student_bn", "trainable")
        if kwargs["student_bn"] == "frozen":
            raise InvalidArgumentError(
                "TENT normalises with each batch's statistics: student_bn must "
                "be 'trainable' or 'synchronized'. Received: student_bn='frozen'"
            )
        super().__init__(student, source, **kwargs)
        _tent_trainable(student)
        self.entropy_tracker = keras.metrics.Mean(name="entropy")

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        n = ops.shape(unpack_inputs(x)["images"])[0]
        if y is None:  # no masks: all ignore_class
            y = ops.full(ops.shape(y_pred[:n])[:-1], self.ignore_class, "int32")
        total = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        values = entropy(y_pred[:n])
        count = ops.cast(ops.size(values), "float32")
        local_sum = ops.sum(values)
        self.entropy_tracker.update_state(
            local_sum / ops.maximum(count, 1.0), sample_weight=count
        )
        term = local_sum / ops.maximum(global_sum(count), 1.0)
        return total + ops.cast(self.entropy_weight * term, total.dtype)

    def get_metrics_result(self):
        results = super().get_metrics_result()
        results["loss"] = results["loss"] + ops.cast(
            self.entropy_weight, "float32"
        ) * ops.cast(self.entropy_tracker.result(), results["loss"].dtype)
        return results

    def get_config(self):
        config = super().get_config()
        config["entropy_weight"] = self.entropy_weight
        config.pop("kl_inputs", None)
        return config
