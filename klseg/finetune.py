"""Source-regularised fine-tuning: a Keras model wrapper with a KL term.

A model trained on a *source* domain is fine-tuned on a few labelled (and
possibly more unlabelled) images of a *target* domain. Plain fine-tuning
adapts to the target and forgets the source. ``KLRegularizedModel`` adds a
per-pixel KL divergence between the frozen source model's predictions and
the student's (Learning without Forgetting, applied per pixel):

    loss = task_loss(y, student(target images))              [labelled pixels]
         + kl_weight * T^2 * mean_pixels KL(softmax(z_src / T) || softmax(z / T))

where ``z_src`` are the source model's logits (inference mode, no gradient),
``z`` the student's on the same images and ``T`` the temperature. The KL
term sees the images chosen by ``kl_inputs``:

- ``"target"``: the target images of the batch, labelled and unlabelled
  (classic LwF; needs no source data). The student also learns to imitate
  the source model's *mistakes* on target images, so a large weight holds
  back the target accuracy.
- ``"source"``: unlabelled source-domain images passed as
  ``x["source_images"]`` (rehearsal distillation). The student keeps the
  source behaviour on source inputs and is free on target inputs.
- ``"both"``: the union of the two.

The source model's predictions come from the live model, or from stored
probabilities computed once with ``store_source_predictions`` (float16)
and fed as ``x["source_probs"]`` (for ``x["images"]``) and/or
``x["source_images_probs"]`` (for ``x["source_images"]``).

Everything here uses ``keras.ops`` only and runs on the TensorFlow and JAX
backends.
"""

import os

import keras
import numpy as np
from keras import ops

from klseg import losses as klseg_losses
from klseg import models as klseg_models
from klseg import progress, registry
from klseg.errors import InvalidArgumentError, ResourceError
from klseg.ops import LOG_TINY, TEMPERATURE_RANGE, safe_log

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
]

#: Default images for the KL term (see docs/finetune.md for the measurement).
DEFAULT_KL_INPUTS = "source"
#: Default weight of the KL term (``klseg.registry``).
DEFAULT_KL_WEIGHT = registry.FINETUNE_KL_WEIGHT
#: Default temperature of the KL term (``klseg.registry``).
DEFAULT_TEMPERATURE = registry.FINETUNE_TEMPERATURE

_KL_INPUTS = ("target", "source", "both")
_BN_POLICIES = ("trainable", "frozen", "synchronized")
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


# Class maps ---------------------------------------------------------------


def _standardize_class_map(class_map, num_source, num_target):
    """Returns a tuple (one target index or -1 per source class), or None."""
    if class_map is None:
        if num_source != num_target:
            raise InvalidArgumentError(
                f"The source model predicts {num_source} classes and the "
                f"student {num_target}; pass `class_map` to say where each "
                "source class goes (see klseg.finetune.make_class_map). "
                "Received: class_map=None"
            )
        return None
    if isinstance(class_map, dict):
        unknown = [k for k in class_map if not 0 <= int(k) < num_source]
        if unknown:
            raise InvalidArgumentError(
                f"`class_map` keys must be source class indices in [0, "
                f"{num_source}). Received: class_map={class_map}"
            )
        class_map = [
            class_map.get(s, class_map.get(str(s), -1)) for s in range(num_source)
        ]
    class_map = [-1 if t is None else int(t) for t in class_map]
    if len(class_map) != num_source:
        raise InvalidArgumentError(
            f"`class_map` must give one target class (or None to drop) per "
            f"source class ({num_source}). Received: class_map={class_map}"
        )
    bad = [t for t in class_map if not -1 <= t < num_target]
    if bad:
        raise InvalidArgumentError(
            f"`class_map` values must be target class indices in [0, "
            f"{num_target}) or None (drop). Received: class_map={class_map}"
        )
    if all(t == -1 for t in class_map):
        raise InvalidArgumentError(
            f"`class_map` drops every source class. Received: class_map={class_map}"
        )
    return tuple(class_map)


def make_class_map(source_class_names, target_class_names, *, merge=None, drop=()):
    """Build a ``class_map`` from class names.

    A source class whose name is a target class name maps to it; ``merge``
    maps other source names to target names (their probabilities are summed
    into the target class); names in ``drop`` are dropped (the remaining
    probabilities are renormalised).

    Args:
        source_class_names: names of the source model's classes, in order.
        target_class_names: names of the student's classes, in order.
        merge: dict ``{source name: target name}``. Defaults to None.
        drop: source names to drop. Defaults to ().

    Returns:
        A list with one target index (or None for dropped) per source class.

    Raises:
        InvalidArgumentError: for unknown names, or a source class that is
            neither a target class nor merged nor dropped.

    Example:

    >>> make_class_map(["bg", "car", "truck", "sky"], ["bg", "vehicle"],
    ...                merge={"car": "vehicle", "truck": "vehicle"},
    ...                drop=["sky"])
    [0, 1, 1, None]
    """
    source = [str(n) for n in source_class_names]
    target = [str(n) for n in target_class_names]
    merge = dict(merge or {})
    drop = set(drop)
    for name in list(merge) + list(drop):
        if name not in source:
            raise InvalidArgumentError(
                f"'{name}' is not a source class. Source classes: {source}"
            )
    for name in merge.values():
        if name not in target:
            raise InvalidArgumentError(
                f"'{name}' is not a target class. Target classes: {target}"
            )
    class_map = []
    unmapped = []
    for name in source:
        if name in drop:
            class_map.append(None)
        elif name in merge:
            class_map.append(target.index(merge[name]))
        elif name in target:
            class_map.append(target.index(name))
        else:
            unmapped.append(name)
    if unmapped:
        raise InvalidArgumentError(
            f"Source classes {unmapped} are not target classes; merge them "
            "into a target class (merge={name: target}) or drop them "
            f"(drop=[...]). Target classes: {target}"
        )
    return class_map


def map_labels(masks, class_map, *, ignore_class=255):
    """Map integer source-class masks to target classes (numpy).

    Dropped classes (and ``ignore_class``) become ``ignore_class``.

    Args:
        masks: integer array of source class indices.
        class_map: as accepted by ``KLRegularizedModel`` (None = identity).
        ignore_class: the ignore value. Defaults to 255.

    Returns:
        An int32 array of the same shape.
    """
    masks = np.asarray(masks)
    if class_map is None:
        return masks.astype("int32")
    if isinstance(class_map, dict):
        size = max(int(k) for k in class_map) + 1
        class_map = [class_map.get(s, None) for s in range(size)]
    table = np.full(max(256, len(class_map), int(ignore_class) + 1), ignore_class)
    for s, t in enumerate(class_map):
        table[s] = ignore_class if t is None or t < 0 else t
    out = np.full(masks.shape, ignore_class, dtype="int32")
    valid = (masks >= 0) & (masks < len(class_map)) & (masks != ignore_class)
    out[valid] = table[masks[valid]]
    return out


def map_log_probs(log_probs, class_map, num_target):
    """Source-class log-probabilities to target-class log-scores.

    Merged source classes get ``log(sum of their probabilities)``; dropped
    classes are left out, so the result is renormalised by a ``log_softmax``
    (as the KL term does) or compared by ``argmax``; a target class that no
    source class maps to gets ``LOG_TINY`` (probability 0). This is how
    ``KLRegularizedModel`` maps the source model's predictions.

    Args:
        log_probs: (..., num_source) log-probabilities.
        class_map: one target index (or None / -1 to drop) per source class,
            e.g. from ``make_class_map``; None is the identity.
        num_target: number of target classes.

    Returns:
        (..., num_target) log-scores.
    """
    if class_map is not None:
        class_map = _standardize_class_map(
            class_map, int(log_probs.shape[-1]), num_target
        )
    return _apply_class_map(log_probs, class_map, num_target)


def _apply_class_map(log_probs, class_map, num_target):
    """Merge (logsumexp) or drop source classes; returns target log-scores.

    Merged classes get ``log(sum of probabilities)``; dropped classes are
    left out (the KL loss renormalises with ``log_softmax``); a target class
    that no source class maps to gets ``LOG_TINY`` (zero probability).
    """
    if class_map is None:
        return log_probs
    columns = []
    for t in range(num_target):
        sources = [s for s, m in enumerate(class_map) if m == t]
        if not sources:
            columns.append(ops.full_like(log_probs[..., :1], LOG_TINY))
        elif len(sources) == 1:
            columns.append(log_probs[..., sources[0] : sources[0] + 1])
        else:
            picked = ops.take(log_probs, np.asarray(sources, "int32"), axis=-1)
            columns.append(ops.logsumexp(picked, axis=-1, keepdims=True))
    return ops.concatenate(columns, axis=-1)


# Inputs -------------------------------------------------------------------


def _unpack(x):
    """Returns a dict with the known keys (None where absent).

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


def _static_hw(t):
    shape = tuple(t.shape)
    return shape[1:3] if len(shape) == 4 else None


def _check_same_size(images, other, what):
    a, b = _static_hw(images), _static_hw(other)
    if a is None or b is None:
        return
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


def _replica_context():
    """The ``tf.distribute`` replica context of a multi-replica step, or None.

    Only the TensorFlow backend splits a step over replicas that each run
    ``compute_loss`` on their share of the batch; on JAX a distributed step
    computes on the whole (sharded) batch, so sums are already global.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _global_sum(value):
    """Sum of ``value`` over the replicas of a ``tf.distribute`` step."""
    context = _replica_context()
    if context is None:
        return value
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _num_replicas():
    context = _replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def _labelled_pixels(y, num_classes, ignore_class):
    """float32 number of pixels of ``y`` that carry a label."""
    y = ops.convert_to_tensor(y)
    if len(y.shape) == 4 and y.shape[-1] not in (None, 1):  # one-hot / soft
        valid = ops.sum(ops.cast(y, "float32"), axis=-1) > 0
    else:
        labels = ops.cast(y, "int32")
        valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_class)
    return ops.sum(ops.cast(valid, "float32"))


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
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)):
            raise InvalidArgumentError(
                f"`kl_weight` must be a number >= 0. Received: kl_weight={kl_weight!r}"
            )
        if not kl_weight >= 0:
            raise InvalidArgumentError(
                f"`kl_weight` must be >= 0. Received: kl_weight={kl_weight!r}"
            )
        low, high = TEMPERATURE_RANGE
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not low <= temperature <= high
        ):
            raise InvalidArgumentError(
                f"`temperature` must be a number in [{low:g}, {high:g}]. "
                f"Received: temperature={temperature!r}"
            )
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
        self.kl_weight = float(kl_weight)
        self.temperature = float(temperature)
        self.kl_inputs = kl_inputs
        self.student_bn = student_bn
        self.ignore_class = int(ignore_class)
        self.num_classes = num_target
        self.num_source_classes = num_source
        self.class_map = _standardize_class_map(class_map, num_source, num_target)
        if self.class_map is not None and self.class_map == tuple(range(num_target)):
            self.class_map = None

        self.student = student
        self.source = source
        self.source.trainable = False
        if student_bn == "frozen":
            for layer in student._flatten_layers(include_self=False):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False

        if student_bn == "synchronized" and keras.backend.backend() == "tensorflow":
            for layer in student._flatten_layers(include_self=False):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True

        self.kl_loss_fn = klseg_losses.KLDivergence(
            from_logits=True,
            target="logits",
            temperature=self.temperature,
            name="kl_divergence",
        )
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
        parts = _unpack(x)
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
        log_probs = _apply_class_map(log_probs, self.class_map, self.num_classes)
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
        local_mean = task * _num_replicas()
        global_count = _global_sum(ops.stop_gradient(count))
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
        parts = _unpack(x)
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
        return local_sum / ops.maximum(_global_sum(count), 1.0)

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
        n = ops.shape(_unpack(x)["images"])[0]
        return super().compute_metrics(x, y, y_pred[:n], sample_weight=sample_weight)

    # -- saving -----------------------------------------------------------

    def get_config(self):
        config = {
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
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["source"] = keras.saving.deserialize_keras_object(config["source"])
        return cls(**config)


# Stored predictions -------------------------------------------------------


def estimate_predictions_bytes(num_images, height, width, num_classes):
    """Bytes needed to store source probabilities in float16."""
    return int(num_images) * int(height) * int(width) * int(num_classes) * 2


def available_memory_bytes():
    """MemAvailable from /proc/meminfo, or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n):
    """``n`` bytes as text in binary units (``"1.5 MiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def store_source_predictions(
    source,
    images,
    *,
    batch_size=16,
    max_bytes=None,
    memory_fraction=0.5,
    verbose=1,
):
    """Compute the source model's probabilities once, stored as float16.

    The memory needed (``N * H * W * C * 2`` bytes) is estimated and checked
    before any work: it must fit in ``max_bytes``, by default
    ``memory_fraction`` of the memory available now. Feed the result to
    ``klseg.data.make_dataset(split, extra_maps={"source_probs": probs},
    ...)`` so that it moves with the geometric augmentation the student
    sees (colour augmentation does not touch it: the stored predictions are
    those of the un-augmented colours), and give the batches to
    ``KLRegularizedModel`` as ``x["source_probs"]`` (or, for source-domain
    images, as ``x["source_images_probs"]``, see ``pair_batches``).

    float16 keeps about three significant digits; probabilities below about
    6e-8 are stored as 0 (a zero-probability class, which the KL loss
    handles exactly).

    Args:
        source: the source model (per-pixel logits).
        images: uint8 (or float 0..255) array ``(N, H, W, 3)``.
        batch_size: images per forward pass. Defaults to 16.
        max_bytes: memory budget in bytes for the result. Defaults to
            ``memory_fraction`` of the available memory.
        memory_fraction: share of the available memory the result may use
            when ``max_bytes`` is None. Defaults to 0.5.
        verbose: 1 prints the estimate and a progress bar. Defaults to 1.

    Returns:
        float16 numpy array ``(N, H, W, C_source)`` of probabilities.

    Raises:
        ResourceError: before any work, when the result would not fit.
        ModelError: for a model that does not output per-pixel logits.
    """
    num_classes = klseg_models.check_segmentation_model(source, "source")
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise InvalidArgumentError(
            f"`images` must be an array of shape (N, H, W, 3). Received: shape={shape}"
        )
    n, h, w = shape[:3]
    needed = estimate_predictions_bytes(n, h, w, num_classes)
    if max_bytes is None:
        available = available_memory_bytes()
        budget = None if available is None else int(available * memory_fraction)
        where = f"{memory_fraction:.0%} of the available memory"
    else:
        budget = int(max_bytes)
        where = "max_bytes"
    if verbose:
        print(
            f"Stored source predictions: {n} images x {h}x{w} x {num_classes} "
            f"classes in float16 = {format_bytes(needed)}"
            + ("" if budget is None else f" (budget {format_bytes(budget)})")
        )
    if budget is not None and needed > budget:
        raise ResourceError(
            f"Storing source predictions needs {format_bytes(needed)} "
            f"({n} images x {h}x{w} x {num_classes} classes x 2 bytes), more "
            f"than {where} ({format_bytes(budget)}). Use fewer or smaller "
            "images, or run the source model live (no stored predictions)."
        )
    out = np.empty((n, h, w, num_classes), dtype="float16")
    with progress.Progress(
        n, "Storing source predictions", unit="image", verbose=verbose
    ) as shown:
        for start in range(0, n, batch_size):
            batch = np.asarray(images[start : start + batch_size])
            logits = klseg_models.predict_logits(source, batch)
            probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
            out[start : start + len(batch)] = ops.convert_to_numpy(probs).astype(
                "float16"
            )
            shown.update(len(batch))
    return out


# Both domains' scores -----------------------------------------------------

#: Scores ``evaluate_domains`` can report per domain.
_DOMAIN_SCORES = ("loss", "mean_iou", "pixel_accuracy")


def _domain_key(domain, score):
    return f"{domain}_{score}" if domain else score


def evaluate_domains(
    model,
    datasets,
    *,
    source_model=None,
    class_map=None,
    ignore_class=None,
    batch_size=8,
    source_baseline=None,
    scores=("mean_iou",),
    forward=None,
):
    """Scores of the student on each domain, and the forgetting.

    Every score comes from one confusion matrix per domain
    (:func:`klseg.evaluation.evaluate`): exact over the whole data set,
    independent of the batch size, with the documented rule for a class
    absent from masks and predictions (left out of the mean).

    Args:
        model: a ``KLRegularizedModel`` (its student is scored) or a plain
            segmentation model.
        datasets: dict ``{domain: data}``, ``data`` a ``tf.data.Dataset``
            (or any iterable) of ``(images or {"images": ...}, masks)``
            batches, or an ``(images, masks)`` pair of arrays. Domain
            ``"source"`` masks are in the source model's classes and are
            mapped with ``class_map``.
        source_model: the source model, to compute the baseline. Defaults to
            ``model.source`` for a ``KLRegularizedModel``.
        class_map: source-to-target class map. Defaults to the wrapper's.
        ignore_class: mask value to ignore. Defaults to the wrapper's, or
            255.
        batch_size: batch size for array inputs. Defaults to 8.
        source_baseline: the source model's mean IoU on ``datasets["source"]``
            if already known (skips recomputing it).
        scores: which of ``"loss"``, ``"mean_iou"``, ``"pixel_accuracy"`` to
            report. Defaults to ``("mean_iou",)``.
        forward: ``images -> logits`` of the student. Defaults to
            :func:`klseg.models.predict_logits`.

    Returns:
        dict with ``"<domain>_<score>"`` per domain and score (fractions
        0..1; an empty domain name gives ``"<score>"``) and, when a
        ``"source"`` domain and a source model are available,
        ``"source_model_mean_iou"`` (the baseline) and ``"forgetting"`` =
        baseline - student source mean IoU.
    """
    from klseg import evaluation

    for score in scores:
        if score not in _DOMAIN_SCORES:
            raise InvalidArgumentError(
                f"`scores` must hold names from {_DOMAIN_SCORES}. "
                f"Received: scores={scores!r}"
            )
    student = getattr(model, "student", model)
    if isinstance(model, KLRegularizedModel):
        source_model = source_model if source_model is not None else model.source
        class_map = class_map if class_map is not None else model.class_map
        ignore_class = model.ignore_class if ignore_class is None else ignore_class
    ignore_class = 255 if ignore_class is None else ignore_class
    num_classes = klseg_models.check_segmentation_model(student, "student")
    if class_map is not None:
        if source_model is not None:
            num_source = klseg_models.check_segmentation_model(
                source_model, "source_model"
            )
        elif isinstance(class_map, dict):
            num_source = max(int(k) for k in class_map) + 1
        else:
            num_source = len(class_map)
        class_map = _standardize_class_map(class_map, num_source, num_classes)

    def label_map(masks):
        return map_labels(masks, class_map, ignore_class=ignore_class)

    results = {}
    for domain, data in datasets.items():
        found = evaluation.evaluate(
            student,
            data,
            num_classes=num_classes,
            ignore_value=ignore_class,
            forward=forward,
            label_map=label_map if domain == "source" and class_map else None,
            batch_size=batch_size,
        )
        for score in scores:
            results[_domain_key(domain, score)] = found[score]
    if "source" in datasets and (
        source_model is not None or source_baseline is not None
    ):
        if source_baseline is None:

            def mapped(images):
                logits = ops.cast(
                    klseg_models.predict_logits(source_model, images), "float32"
                )
                log_probs = ops.log_softmax(logits, axis=-1)
                return _apply_class_map(log_probs, class_map, num_classes)

            source_baseline = evaluation.evaluate(
                source_model,
                datasets["source"],
                num_classes=num_classes,
                ignore_value=ignore_class,
                forward=mapped,
                label_map=label_map if class_map else None,
                batch_size=batch_size,
            )["mean_iou"]
        results["source_model_mean_iou"] = float(source_baseline)
        results["forgetting"] = float(source_baseline) - results.get(
            "source_mean_iou",
            float("nan"),
        )
    return results


class DomainEvaluation(keras.callbacks.Callback):
    """Adds each domain's validation scores and the forgetting to the logs.

    At the end of every epoch this runs ``evaluate_domains`` and writes
    ``val_<domain>_<score>`` for each domain and score and
    ``val_forgetting`` into the epoch logs, so they appear in ``History``
    and in every later callback (CSVLogger, checkpoints monitoring them,
    ...). The source model's score, computed once (at the first epoch end)
    unless given, is kept as ``source_baseline``.

    Args:
        datasets: as for ``evaluate_domains``; re-iterated every epoch.
        source_model, class_map, ignore_class, batch_size, scores, forward:
            as for ``evaluate_domains``.
        source_baseline: the source model's source-domain mean IoU, if
            known. Defaults to None.
    """

    def __init__(
        self,
        datasets,
        *,
        source_model=None,
        class_map=None,
        ignore_class=None,
        batch_size=8,
        scores=("mean_iou",),
        forward=None,
        source_baseline=None,
    ):
        super().__init__()
        self.datasets = {k: v for k, v in dict(datasets).items() if v is not None}
        self.source_model = source_model
        self.class_map = class_map
        self.ignore_class = ignore_class
        self.batch_size = batch_size
        self.scores = tuple(scores)
        self.forward = forward
        self.source_baseline = source_baseline
        self.history = []

    def _evaluate(self):
        return evaluate_domains(
            self.model,
            self.datasets,
            source_model=self.source_model,
            class_map=self.class_map,
            ignore_class=self.ignore_class,
            batch_size=self.batch_size,
            source_baseline=self.source_baseline,
            scores=self.scores,
            forward=self.forward,
        )

    def on_epoch_end(self, epoch, logs=None):
        results = self._evaluate()
        if "source_model_mean_iou" in results:
            self.source_baseline = results["source_model_mean_iou"]
        self.history.append(results)
        if logs is not None:
            for key, value in results.items():
                if key != "source_model_mean_iou":
                    logs[f"val_{key}"] = value
