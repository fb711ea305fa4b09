"""Source-regularised fine-tuning: a Keras model wrapper with a KL term.

A model trained on a *source* domain is fine-tuned on a few labelled (and
possibly more unlabelled) images of a *target* domain. Plain fine-tuning
adapts to the target and forgets the source. ``KLRegularizedModel`` adds a
per-pixel KL divergence between the frozen source model's predictions and
the student's (Learning without Forgetting, applied per pixel; the class
docstring gives the loss) on the images chosen by ``kl_inputs``:

- ``"target"``: the target images of the batch, labelled and unlabelled
  (classic LwF; needs no source data). The student also learns to imitate
  the source model's *mistakes* on target images, so a large weight holds
  back the target accuracy.
- ``"source"``: unlabelled source-domain images passed as
  ``x["source_images"]`` (rehearsal distillation). The student keeps the
  source behaviour on source inputs and is free on target inputs.
- ``"both"``: the union of the two.

The source model's predictions come from the live model, or from float16
probabilities stored once (``store_source_predictions``) and fed as
``x["source_probs"]`` and/or ``x["source_images_probs"]``.

Class maps, stored source predictions and the scores per domain live in
``klseg.class_maps``, ``klseg.source_predictions`` and ``klseg.evaluation``;
their names are importable from here too.

Everything here uses ``keras.ops`` only and runs on the TensorFlow and JAX
backends.
"""

import keras
from keras import ops

from klseg import losses as klseg_losses
from klseg import models as klseg_models
from klseg import registry
from klseg.class_maps import (
    apply_class_map,
    make_class_map,
    map_labels,
    map_log_probs,
    standardize_class_map,
)
from klseg.errors import InvalidArgumentError
from klseg.evaluation import DomainEvaluation, evaluate_domains
from klseg.ops import check_temperature, safe_log
from klseg.replicas import global_sum, num_replicas
from klseg.source_predictions import (
    available_memory_bytes,
    estimate_predictions_bytes,
    format_bytes,
    store_source_predictions,
)

__all__ = [
    "DEFAULT_KL_INPUTS",
    "DEFAULT_KL_WEIGHT",
    "DEFAULT_TEMPERATURE",
    "DomainEvaluation",
    "KLRegularizedModel",
    "available_memory_bytes",
    "clone_student",
    "estimate_predictions_bytes",
    "evaluate_domains",
    "format_bytes",
    "make_class_map",
    "map_labels",
    "map_log_probs",
    "pair_batches",
    "store_source_predictions",
    "unpack_inputs",
]

#: Default images for the KL term (see docs/finetune.md for the measurement).
DEFAULT_KL_INPUTS = "source"
#: Default weight of the KL term (``klseg.registry``).
DEFAULT_KL_WEIGHT = registry.FINETUNE_KL_WEIGHT
#: Default temperature of the KL term (``klseg.registry``).
DEFAULT_TEMPERATURE = registry.FINETUNE_TEMPERATURE

_KL_INPUTS = ("target", "source", "both")
_BN_POLICIES = registry.STUDENT_BN
_INPUT_KEYS = (
    "images",
    "source_images",
    "source_probs",
    "source_images_probs",
    "unlabeled_images",
)


# Model checks -------------------------------------------------------------


def _check_input_sizes(student, source):
    a = tuple(student.inputs[0].shape)
    b = tuple(source.inputs[0].shape)
    for axis, name in ((1, "height"), (2, "width"), (3, "channels")):
        if a[axis] is not None and b[axis] is not None and a[axis] != b[axis]:
            raise InvalidArgumentError(
                f"The student and source models take inputs of different "
                f"{name}: student input shape {a}, source input shape {b}. "
                "Build both for the same image size (or for None x None)."
            )


def _check_models(student, source):
    """(student classes, source classes) of two valid, distinct models."""
    if student is source:
        raise InvalidArgumentError(
            "`student` and `source` are the same model object; fine-tune "
            "a copy: student = keras.models.clone_model(source); "
            "student.set_weights(source.get_weights())."
        )
    num_target = klseg_models.check_segmentation_model(student, "student")
    num_source = klseg_models.check_segmentation_model(source, "source")
    _check_input_sizes(student, source)
    if not student.trainable_weights:
        raise InvalidArgumentError(
            "The student model has no trainable weights (a copy of a "
            "frozen model keeps its trainable=False flags). Use "
            "klseg.finetune.clone_student(source) to make the student."
        )
    return num_target, num_source


def _retype_config(config, policy):
    """Give every layer config (but the float32 head and inputs) ``policy``."""
    if isinstance(config, dict):
        if config.get("class_name") in ("ClassLogits", "InputLayer"):
            return
        inner = config.get("config")
        if isinstance(inner, dict) and isinstance(inner.get("dtype"), dict):
            dtype = inner["dtype"]
            if dtype.get("class_name") == "DTypePolicy":
                inner["dtype"] = {
                    **dtype,
                    "config": {**dtype.get("config", {}), "name": policy},
                }
        for value in config.values():
            _retype_config(value, policy)
    elif isinstance(config, list):
        for value in config:
            _retype_config(value, policy)


def clone_student(source, *, class_names=None, name=None, dtype_policy=None):
    """A trainable copy of ``source`` (same architecture and weights).

    Use it to start fine-tuning: ``keras.models.clone_model`` copies the
    layers' ``trainable`` flags, so cloning a source model that a
    ``KLRegularizedModel`` has already frozen would give a frozen student;
    this helper makes the copy trainable again.

    With ``class_names`` that differ from the source's, the copy gets a new
    head for those classes (``klseg.models.with_classes``: every other layer
    keeps the source weights, the head starts fresh); pair it with a
    ``class_map`` (``make_class_map``) in ``KLRegularizedModel``.

    A saved model keeps the dtype policy it was built with; with
    ``dtype_policy`` (for example ``"mixed_bfloat16"``) the copy's layers are
    rebuilt in that policy, the logits head staying float32.

    Args:
        source: a Functional segmentation model.
        class_names: the student's classes. Defaults to None (the source's).
        name: name of the copy. Defaults to ``"<source name>_student"``.
        dtype_policy: name of the copy's dtype policy. Defaults to None
            (the source's layers' policies).

    Returns:
        A new ``keras.Model`` with the source weights, all layers trainable.
    """
    if dtype_policy is None:
        student = keras.models.clone_model(source)
    else:
        config = keras.saving.serialize_keras_object(source)
        _retype_config(config, dtype_policy)
        student = keras.saving.deserialize_keras_object(config)
    student.set_weights(source.get_weights())
    for layer in student._flatten_layers(include_self=True):
        layer.trainable = True
    name = name or f"{source.name}_student"
    if class_names is not None and [str(c) for c in class_names] != (
        klseg_models.get_class_names(student)
    ):
        return klseg_models.with_classes(student, class_names, name=name)
    student.name = name
    return student


# Inputs -------------------------------------------------------------------


def unpack_inputs(x):
    """``x`` (images, or a dict of them) as a dict with every input key
    (None where absent); ``InvalidArgumentError`` for an unknown key, a dict
    without ``"images"``, or a list or tuple.

    ``"unlabeled_images"`` is read by ``klseg.consistency.MeanTeacherModel``
    only; ``KLRegularizedModel.call`` rejects it.
    """
    if isinstance(x, dict):
        unknown = sorted(set(x) - set(_INPUT_KEYS))
        if unknown:
            raise InvalidArgumentError(
                f"Unknown input keys {unknown}. KLRegularizedModel takes an "
                f"images tensor or a dict with keys {list(_INPUT_KEYS)}."
            )
        if x.get("images") is None:
            raise InvalidArgumentError(
                "The input dict must contain 'images' (the target images). "
                f"Received keys: {sorted(x)}"
            )
        return {key: x.get(key) for key in _INPUT_KEYS}
    if isinstance(x, (list, tuple)):
        raise InvalidArgumentError(
            "KLRegularizedModel takes an images tensor or a dict "
            f"{{'images': ..., 'source_images': ..., ...}}; received a "
            f"{type(x).__name__} of {len(x)} items."
        )
    return {**dict.fromkeys(_INPUT_KEYS), "images": x}


def _check_same_size(images, other, what):
    a, b = tuple(images.shape), tuple(other.shape)
    if len(a) != 4 or len(b) != 4:
        return
    a, b = a[1:3], b[1:3]
    if any(x is not None and y is not None and x != y for x, y in zip(a, b)):
        raise InvalidArgumentError(
            f"'{what}' must have the same height and width as 'images': "
            f"images shape {tuple(images.shape)}, {what} shape "
            f"{tuple(other.shape)}. Resize both to the same image_size."
        )


def pair_batches(target_batch, source_batch):
    """Combine a target batch and a source batch into one fine-tuning batch.

    For ``tf.data.Dataset.zip((target_ds, source_ds)).map(pair_batches)``:
    the target batch's ``(x, masks)`` keep their roles; the source batch's
    images (and stored predictions, if any) become ``"source_images"`` (and
    ``"source_images_probs"``). The source batch's masks are unused.

    Args:
        target_batch: ``(images, masks)`` or ``({"images", ...}, masks)``.
        source_batch: ``(images, masks)`` or ``({"images", "source_probs"},
            masks)``.

    Returns:
        ``(x_dict, masks)``.

    Example:

    >>> pair_batches(("target", "masks"), ({"images": "source"}, "unused"))
    ({'images': 'target', 'source_images': 'source'}, 'masks')
    """
    x, y = target_batch[0], target_batch[1]
    xs = source_batch[0]
    out = dict(x) if isinstance(x, dict) else {"images": x}
    if isinstance(xs, dict):
        out["source_images"] = xs["images"]
        if "source_probs" in xs:
            out["source_images_probs"] = xs["source_probs"]
    else:
        out["source_images"] = xs
    return out, y


# The wrapper --------------------------------------------------------------


def _labelled_pixels(y, num_classes, ignore_class):
    """float32 number of pixels of ``y`` that carry a label."""
    y = ops.convert_to_tensor(y)
    if len(y.shape) == 4 and y.shape[-1] not in (None, 1):  # one-hot / soft
        valid = ops.sum(ops.cast(y, "float32"), axis=-1) > 0
    else:
        labels = ops.cast(y, "int32")
        valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_class)
    return ops.sum(ops.cast(valid, "float32"))


def _check_settings(kl_weight, temperature, kl_inputs, student_bn):
    """``InvalidArgumentError`` for a setting of the wrapper out of range."""
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)):
        raise InvalidArgumentError(
            f"`kl_weight` must be a number >= 0. Received: kl_weight={kl_weight!r}"
        )
    if not kl_weight >= 0:
        raise InvalidArgumentError(
            f"`kl_weight` must be >= 0. Received: kl_weight={kl_weight!r}"
        )
    check_temperature(temperature)
    if kl_inputs not in _KL_INPUTS:
        raise InvalidArgumentError(
            f"`kl_inputs` must be one of {_KL_INPUTS}. "
            f"Received: kl_inputs={kl_inputs!r}"
        )
    if student_bn not in _BN_POLICIES:
        raise InvalidArgumentError(
            f"`student_bn` must be one of {_BN_POLICIES}. "
            f"Received: student_bn={student_bn!r}"
        )


@keras.saving.register_keras_serializable(package="klseg")
class KLRegularizedModel(keras.Model):
    """Fine-tunes ``student`` with a per-pixel KL term to a frozen ``source``.

    Total loss (what ``fit`` minimises and ``evaluate`` reports as "loss"):

        task_loss(y, student(images)) + kl_weight * KL

    where ``task_loss`` is the loss given to ``compile`` (for example
    ``klseg.losses.SparseKLDivergence(ignore_class=255)``: mean over
    non-ignored pixels of the target images), and ``KL`` is
    ``klseg.losses.KLDivergence(from_logits=True, target="logits",
    temperature=T)``: ``T^2 * KL(softmax(z_src / T) || softmax(z / T))``,
    the mean over the pixels of the images ``kl_inputs`` selects that have a
    source prediction. With live predictions that is every pixel; a stored
    probability row that sums to 0 (a pixel that geometric augmentation
    filled) has none and is left out, for target and source images alike.
    An unlabelled target image (mask all ``ignore_class``) adds to the KL
    term only.

    Under ``tf.distribute`` both terms are those of the global batch: the
    labelled-pixel and predicted-pixel counts are summed over the replicas
    (an all-reduce inside ``compute_loss``) and each replica adds its share,
    so the loss equals one device's on the same global batch however the
    ignored pixels are spread (on JAX a distributed step sees the whole
    batch already). For a task loss that is not a pixel mean (Dice) the
    replicas' values are averaged weighted by their labelled pixels.

    Logs: ``task_loss`` and ``kl_loss`` are epoch means over pixels (the
    task loss of each batch weighted by its labelled pixels, the KL term
    summed over the pixels with a prediction) and ``loss`` is
    ``task_loss + kl_weight * kl_loss`` (plus any regularisation losses of
    the student, averaged over steps). They do not depend on how the
    images are grouped into batches: a batch without a labelled pixel adds
    nothing to ``task_loss`` instead of a 0. The objective each step
    minimises stays the batch's own loss (the means over that batch's
    pixels), as in any minibatch training: weighting steps by their pixel
    counts would make the step size depend on how many labels a batch
    happens to hold.

    The source model always runs in inference mode (``training=False``:
    BatchNorm uses its moving statistics, dropout is off), under
    ``stop_gradient``, and is never trainable. The student's BatchNorm
    layers follow ``student_bn``:

    - ``"trainable"``: batch statistics in training, moving statistics
      updated (on the whole batch, target and source images together);
    - ``"frozen"``: BatchNorm layers are set ``trainable=False``, which in
      Keras 3 also runs them in inference mode: the moving statistics of the
      source domain are kept and not updated. Prefer this for small batches
      or when the target batches are few.
    - ``"synchronized"``: as ``"trainable"``, with the batch statistics of
      the global batch under ``tf.distribute``
      (``BatchNormalization.synchronized = True`` on the TensorFlow
      backend), so several replicas train as one device would. On JAX a
      distributed step computes them over the whole batch already.

    Inputs: ``x`` is the target images ``(B, H, W, 3)``, or a dict with
    ``"images"`` and optionally ``"source_images"`` (unlabelled
    source-domain images, same H and W), ``"source_probs"`` (stored source
    probabilities for ``"images"``, ``(B, H, W, C_source)``, float16) and
    ``"source_images_probs"`` (the same for ``"source_images"``). Where
    stored probabilities are given the source model is not run on those
    images. ``y`` is the integer masks of ``"images"`` (``ignore_class`` for
    unlabelled pixels).

    Output of ``call``: the student's logits for ``"images"``, followed
    along the batch axis by those for ``"source_images"`` when the KL term
    uses them. ``model.student`` is the fine-tuned model itself: use it
    for inference, ``save`` and export.

    Args:
        student: the model to fine-tune (images in, per-pixel logits out),
            usually a copy of the source model.
        source: the frozen source model (same input convention; per-pixel
            logits over its own classes).
        kl_weight: weight of the KL term (>= 0; 0 is plain fine-tuning).
            Defaults to ``DEFAULT_KL_WEIGHT``.
        temperature: softening temperature ``T`` in ``[1e-3, 1e3]``
            (``klseg.ops.TEMPERATURE_RANGE``); the term is scaled by
            ``T^2``. Defaults to ``DEFAULT_TEMPERATURE``.
        kl_inputs: ``"target"``, ``"source"`` or ``"both"`` (see the module
            docstring). Defaults to ``DEFAULT_KL_INPUTS``. With ``"source"``
            or ``"both"``, training batches must contain
            ``"source_images"``; evaluation batches without them report the
            KL term on the images they have (or none).
        class_map: None when the source and student classes are the same;
            otherwise one entry per source class: the target class index it
            is merged into (probabilities summed, in log space with
            logsumexp), or None to drop it (the remaining probabilities are
            renormalised). A dict ``{source index: target index or None}``
            is accepted too (missing keys are dropped). See
            ``make_class_map``.
        student_bn: ``"trainable"``, ``"frozen"`` or ``"synchronized"``.
            Defaults to ``"trainable"``.
        ignore_class: the mask value of unlabelled pixels. Defaults to 255.
        **kwargs: standard ``keras.Model`` arguments (``name``).

    Raises:
        InvalidArgumentError: for bad arguments, a class-count mismatch
            without ``class_map``, or models built for different input
            sizes.
        ModelError: for models that are not single-input per-pixel logits
            models (for example a softmax output layer).

    Example:

    ```python
    student = klseg.finetune.clone_student(source)
    model = KLRegularizedModel(student, source, kl_inputs="source")
    model.compile(optimizer="adam",
                  loss=klseg.losses.SparseKLDivergence(ignore_class=255),
                  metrics=[klseg.metrics.MeanIoU(num_classes, ignore_class=255)])
    model.fit(train_ds, epochs=5)   # x: {"images", "source_images"}, y: masks
    model.student.save("finetuned.keras")
    ```
    """

    def __init__(
        self,
        student,
        source,
        *,
        kl_weight=DEFAULT_KL_WEIGHT,
        temperature=DEFAULT_TEMPERATURE,
        kl_inputs=DEFAULT_KL_INPUTS,
        class_map=None,
        student_bn="trainable",
        ignore_class=255,
        **kwargs,
    ):
        # The wrapper itself computes nothing but the loss: keep it float32
        # whatever the global policy (inputs are converted to tensors; uint8
        # images stay uint8, float16 stored probabilities become float32).
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        num_target, num_source = _check_models(student, source)
        _check_settings(kl_weight, temperature, kl_inputs, student_bn)
        self.kl_weight = float(kl_weight)
        self.temperature = float(temperature)
        self.kl_inputs = kl_inputs
        self.student_bn = student_bn
        self.ignore_class = int(ignore_class)
        self.num_classes = num_target
        self.num_source_classes = num_source
        self.class_map = standardize_class_map(class_map, num_source, num_target)
        if self.class_map == tuple(range(num_target)):  # the identity
            self.class_map = None

        self.student = student
        self.source = source
        self.source.trainable = False
        klseg_models.set_batch_norm(student, student_bn)
        # Pixel-weighted epoch means (Mean with the pixel count as weight).
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        # Regularisation losses of the student (e.g. kernel regularizers),
        # a mean per step; folded into the logged "loss", not logged alone.
        self.extra_loss_tracker = keras.metrics.Mean(name="_regularization_loss")
        self.built = True

    # -- forward ----------------------------------------------------------

    def _uses_target(self):
        return self.kl_inputs in ("target", "both")

    def _uses_source(self):
        return self.kl_inputs in ("source", "both") and self.kl_weight > 0

    #: Whether ``x["unlabeled_images"]`` is used (by subclasses that add a
    #: term on unlabelled target images); here it is rejected, not ignored.
    _uses_unlabeled_images = False

    def call(self, x, training=None):
        parts = unpack_inputs(x)
        if parts["unlabeled_images"] is not None and not self._uses_unlabeled_images:
            raise InvalidArgumentError(
                f"{type(self).__name__} has no term for 'unlabeled_images'; use "
                "klseg.consistency.MeanTeacherModel, or put unlabelled target "
                "images in 'images' with masks of ignore_class."
            )
        images = parts["images"]
        source_images = parts["source_images"]
        if source_images is not None and self._uses_source():
            _check_same_size(images, source_images, "source_images")
            if images.dtype != source_images.dtype:
                images = ops.cast(images, "float32")
                source_images = ops.cast(source_images, "float32")
            images = ops.concatenate([images, source_images], axis=0)
        return self.student(images, training=training)

    # -- loss -------------------------------------------------------------

    def _teacher(self, images, stored):
        """Source log-scores over the student's classes (no gradient), and
        the pixels that have a source prediction (None: all of them).

        A stored row that sums to 0 is a pixel that geometric augmentation
        filled (stored maps move with it and are filled with zeros): it has
        no source prediction and is left out of the KL term.
        """
        has_prediction = None
        if stored is not None:
            self._check_stored(images, stored)
            probs = ops.cast(stored, "float32")
            has_prediction = ops.sum(probs, axis=-1) > 0
            log_probs = safe_log(probs)
        else:
            logits = self.source(images, training=False)
            log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        log_probs = apply_class_map(log_probs, self.class_map, self.num_classes)
        return ops.stop_gradient(log_probs), has_prediction

    def _check_stored(self, images, stored):
        _check_same_size(images, stored, "source_probs")
        channels = tuple(stored.shape)[-1]
        if channels is not None and channels != self.num_source_classes:
            raise InvalidArgumentError(
                "Stored source probabilities must have one channel per source "
                f"class ({self.num_source_classes}). Received: shape "
                f"{tuple(stored.shape)}"
            )

    def _kl_pairs(self, parts, y_pred, training):
        """(student logits, teacher log-scores, pixels with a prediction) of
        the images the KL term sees; (None, None, None) for none."""
        images = parts["images"]
        n = ops.shape(images)[0]
        pieces = []
        if self._uses_target():
            pieces.append((y_pred[:n], *self._teacher(images, parts["source_probs"])))
        if self._uses_source():
            if parts["source_images"] is not None:
                teacher = self._teacher(
                    parts["source_images"], parts["source_images_probs"]
                )
                pieces.append((y_pred[n:], *teacher))
            elif training:
                raise InvalidArgumentError(
                    f"kl_inputs={self.kl_inputs!r} needs unlabelled source-domain "
                    "images in every training batch: pass x as a dict with "
                    "'images' and 'source_images' (see "
                    "klseg.finetune.pair_batches), or use kl_inputs='target'."
                )
        if not pieces:
            return None, None, None
        masks = [
            ops.ones(ops.shape(student)[:-1], "bool") if mask is None else mask
            for student, _, mask in pieces
        ]
        if all(mask is None for _, _, mask in pieces):
            masks = None
        if len(pieces) == 1:
            student, teacher, _ = pieces[0]
            return student, teacher, None if masks is None else masks[0]
        return (
            ops.concatenate([p[0] for p in pieces], axis=0),
            ops.concatenate([p[1] for p in pieces], axis=0),
            None if masks is None else ops.concatenate(masks, axis=0),
        )

    def _task_term(self, x, y, y_pred, sample_weight, training):
        """(task term to optimise, its local mean, local labelled pixels).

        The compiled loss gives the mean over this replica's labelled pixels
        (divided by the replica count under ``tf.distribute``, as Keras
        does). Weighting it by this replica's share of the global batch's
        labelled pixels makes the sum over replicas the mean over the global
        batch's labelled pixels, however they are spread.
        """
        total = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        extra = [ops.sum(ops.cast(v, "float32")) for v in self.losses]
        extra = ops.sum(ops.stack(extra)) if extra else None
        task = total if extra is None else total - ops.cast(extra, total.dtype)
        task = ops.cast(task, "float32")
        if y is None:
            return task, task, None, extra
        count = _labelled_pixels(y, self.num_classes, self.ignore_class)
        local_mean = task * num_replicas()
        global_count = global_sum(ops.stop_gradient(count))
        term = local_mean * count / ops.maximum(global_count, 1.0)
        return term, local_mean, count, extra

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The loss of one batch (see the class docstring).

        The value returned is this replica's share: under ``tf.distribute``
        the replicas' values add up to the loss of the global batch (Keras
        sums the replicas' gradients); on one device it is the loss.
        """
        parts = unpack_inputs(x)
        n = ops.shape(parts["images"])[0]
        task, task_mean, count, extra = self._task_term(
            x, y, y_pred[:n], sample_weight, training
        )
        self.task_loss_tracker.update_state(
            task_mean, sample_weight=1.0 if count is None else count
        )
        total = task
        if extra is not None:
            self.extra_loss_tracker.update_state(extra)
            total = total + ops.cast(extra, total.dtype)
        if self.kl_weight > 0:
            student, teacher, has_prediction = self._kl_pairs(parts, y_pred, training)
            if student is not None:
                kl = self._kl_term(student, teacher, has_prediction)
                total = total + ops.cast(self.kl_weight, kl.dtype) * kl
        return total

    def _kl_term(self, student, teacher, has_prediction):
        """Mean KL over the global batch's pixels that have a prediction."""
        values = klseg_losses.kl_divergence(
            teacher,
            student,
            target="logits",
            temperature=self.temperature,
        )
        if has_prediction is None:
            weights = ops.ones_like(values)
        else:
            weights = ops.cast(has_prediction, "float32")
            values = ops.where(has_prediction, values, 0.0)
        local_sum = ops.sum(values)
        count = ops.sum(weights)
        self.kl_loss_tracker.update_state(
            local_sum / ops.maximum(count, 1.0), sample_weight=count
        )
        return local_sum / ops.maximum(global_sum(count), 1.0)

    def get_metrics_result(self):
        """The metrics, with ``loss`` = ``task_loss + kl_weight * kl_loss``.

        Each term is an epoch mean over pixels (see the class docstring), so
        the logged figures do not depend on how images are grouped into
        batches.
        """
        results = super().get_metrics_result()
        task = self.task_loss_tracker.result()
        kl = self.kl_loss_tracker.result()
        loss = task + ops.cast(self.kl_weight, kl.dtype) * kl
        if self.extra_loss_tracker.count is not None:
            loss = loss + self.extra_loss_tracker.result()
        results.pop(self.extra_loss_tracker.name, None)
        results["loss"] = loss
        return results

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        n = ops.shape(unpack_inputs(x)["images"])[0]
        return super().compute_metrics(x, y, y_pred[:n], sample_weight=sample_weight)

    # -- saving -----------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "student": keras.saving.serialize_keras_object(self.student),
            "source": keras.saving.serialize_keras_object(self.source),
            "kl_weight": self.kl_weight,
            "temperature": self.temperature,
            "kl_inputs": self.kl_inputs,
            "class_map": (
                None
                if self.class_map is None
                else [None if t < 0 else t for t in self.class_map]
            ),
            "student_bn": self.student_bn,
            "ignore_class": self.ignore_class,
        }

    _MODEL_KEYS = ("student", "source")

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in cls._MODEL_KEYS:
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
