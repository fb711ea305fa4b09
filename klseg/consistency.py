"""Mean teacher: KL consistency to an EMA teacher on unlabelled target images.

Few-label domain adaptation has a few labelled target images and many
unlabelled ones. ``MeanTeacherModel`` adds to ``KLRegularizedModel``'s loss
(task loss + ``kl_weight`` * KL to the frozen source model) a consistency
term on the unlabelled images: a *teacher* whose weights are an
exponential moving average (EMA) of the student's (Tarvainen & Valpola,
2017) predicts on the images as delivered (the weak view); the student sees
a strong view of the same pixels (ClassMix or CutMix between images of the
batch, as in DACS, then colour jitter, blur and noise) and is pulled towards
the teacher's softened probabilities where the teacher is confident:

    consistency = T^2 * sum_{unlabelled pixels p} [conf_p >= threshold]
                      * KL(softmax(z_ema,p / T) || softmax(z_p / T))
                  / (number of unlabelled pixels)

The strong view has no geometric transform: pixel ``p`` of the strong view
is pixel ``p`` of the (mixed) weak view, and the teacher's logits are mixed
with the same mask as the images, so teacher and student predictions stay
aligned pixel by pixel.

Everything here uses ``keras.ops`` only and runs on the TensorFlow and JAX
backends, including under ``tf.distribute``.
"""

import copy
import math
import random

import keras
from keras import ops

from klseg import losses as klseg_losses
from klseg import registry
from klseg.errors import InvalidArgumentError
from klseg.finetune import KLRegularizedModel, unpack_inputs
from klseg.ops import check_temperature
from klseg.replicas import global_sum, num_replicas, replica_context

__all__ = [
    "MIX_MODES",
    "MeanTeacherModel",
    "classmix_mask",
    "consistency_divergence",
    "mix_batch",
    "photometric_augment",
    "rampup_factor",
]

#: Mixing augmentations of the strong view (``klseg.registry``).
MIX_MODES = registry.MIX_MODES

# Photometric augmentation of the strong view, on images in 0..255. Every
# image draws its own factors (uniform in [1 - x, 1 + x]), blur (with
# probability BLUR_PROBABILITY, a Gaussian of standard deviation uniform in
# BLUR_SIGMA pixels, 7 taps) and noise (standard deviation uniform in
# [0, NOISE_STD] grey levels).
BRIGHTNESS = 0.2
CONTRAST = 0.2
SATURATION = 0.2
BLUR_PROBABILITY = 0.5
BLUR_SIGMA = (0.15, 1.15)
BLUR_RADIUS = 3
NOISE_STD = 8.0

_GREY = (0.299, 0.587, 0.114)


# Random draws -------------------------------------------------------------


def _uniform(batch, tail, seed, minval=0.0, maxval=1.0):
    """Uniform draws of shape ``(batch, *tail)``, one row per image.

    Under a multi-replica ``tf.distribute`` step every replica draws the rows
    of the global batch (``replicas * batch``) from the same seed state and
    keeps its own rows, so image ``i`` of replica ``r`` gets the draws of
    image ``r * batch + i`` on one device: with equal shares the strong view
    is the one a single device computes.
    """
    return _rows(keras.random.uniform, batch, tail, seed, minval=minval, maxval=maxval)


def _normal(batch, tail, seed):
    return _rows(keras.random.normal, batch, tail, seed)


def _rows(draw, batch, tail, seed, **kwargs):
    replicas = num_replicas()
    if replicas == 1:
        return draw((batch, *tail), seed=seed, **kwargs)
    values = draw((batch * replicas, *tail), seed=seed, **kwargs)
    replica = ops.cast(replica_context().replica_id_in_sync_group, "int32")
    return ops.take(values, replica * batch + ops.arange(batch, dtype="int32"), axis=0)


# The strong view ----------------------------------------------------------


def _check_mix(mix):
    if mix not in MIX_MODES:
        raise InvalidArgumentError(
            f"`mix` must be one of {MIX_MODES}. Received: mix={mix!r}"
        )


def mix_batch(images, teacher_logits, *, mix="classmix", seed=None):
    """Mix each image with the previous one of the batch, labels alike.

    Image ``i`` receives pixels of image ``j = i - 1`` (``ops.roll`` by one
    along the batch; image 0 receives from the last one):

    - ``"classmix"`` (DACS): the pixels of image ``j`` whose teacher class
      (argmax of ``teacher_logits[j]``) is one of a random half (rounded up)
      of the classes present in that prediction;
    - ``"cutmix"``: the pixels of a random box of image ``j`` covering a
      uniform random share of the image (each side ``sqrt(share)`` of the
      image side, centre uniform, clipped at the borders);
    - ``"none"``: nothing.

    The teacher logits are mixed with the same binary mask, so
    ``softmax(mixed_logits / T)`` is the mixed probabilities at any
    temperature ``T`` and a pixel keeps its teacher prediction wherever it
    goes.

    Args:
        images: ``(B, H, W, C)`` images (any numeric dtype).
        teacher_logits: ``(B, H, W, K)`` teacher logits of ``images``.
        mix: ``"classmix"``, ``"cutmix"`` or ``"none"``. Defaults to
            ``"classmix"``.
        seed: a ``keras.random.SeedGenerator`` (required in a traced or JAX
            step) or an int. Defaults to None (Keras' global generator).

    Returns:
        ``(mixed_images, mixed_logits, pasted)``: float32 images, float32
        logits and the bool ``(B, H, W)`` mask of pixels taken from image
        ``j``.
    """
    _check_mix(mix)
    images = ops.cast(images, "float32")
    logits = ops.cast(teacher_logits, "float32")
    shape = ops.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    if mix == "none":
        return images, logits, ops.zeros((batch, height, width), "bool")
    other_images = ops.roll(images, 1, axis=0)
    other_logits = ops.roll(logits, 1, axis=0)
    if mix == "classmix":
        num_classes = int(logits.shape[-1])
        pasted = classmix_mask(
            ops.argmax(other_logits, axis=-1), num_classes, seed=seed
        )
    else:
        share = _uniform(batch, (), seed)
        centre_y = _uniform(batch, (), seed)
        centre_x = _uniform(batch, (), seed)
        side = ops.sqrt(share) / 2.0
        h = ops.cast(height, "float32")
        w = ops.cast(width, "float32")
        ys = (ops.cast(ops.arange(height), "float32") + 0.5) / h
        xs = (ops.cast(ops.arange(width), "float32") + 0.5) / w
        inside_y = ops.abs(ys[None, :] - centre_y[:, None]) < side[:, None]
        inside_x = ops.abs(xs[None, :] - centre_x[:, None]) < side[:, None]
        pasted = inside_y[:, :, None] & inside_x[:, None, :]
    mixed_images = ops.where(pasted[..., None], other_images, images)
    mixed_logits = ops.where(pasted[..., None], other_logits, logits)
    return mixed_images, mixed_logits, pasted


def classmix_mask(classes, num_classes, *, seed=None):
    """ClassMix's paste mask: the pixels of a random half of the classes.

    For each image, a random half (rounded up) of the classes present in
    ``classes`` is drawn; the mask is true where the pixel's class is one of
    them. Values outside ``[0, num_classes)`` (an ignore label) are never
    pasted and do not count as present.

    Args:
        classes: ``(B, H, W)`` integer class map (a teacher's argmax, or
            labels).
        num_classes: the number of classes.
        seed: a ``keras.random.SeedGenerator`` or an int. Defaults to None.

    Returns:
        The bool ``(B, H, W)`` mask.
    """
    classes = ops.cast(classes, "int32")
    valid = (classes >= 0) & (classes < num_classes)
    onehot = ops.one_hot(ops.where(valid, classes, 0), num_classes)
    onehot = onehot * ops.cast(valid, onehot.dtype)[..., None]
    present = ops.max(onehot, axis=(1, 2)) > 0  # (B, K)
    batch = ops.shape(classes)[0]
    keys = _uniform(batch, (num_classes,), seed)
    keys = ops.where(present, keys, 2.0)  # absent classes sort last
    rank = ops.argsort(ops.argsort(keys, axis=-1), axis=-1)
    count = ops.sum(ops.cast(present, "int32"), axis=-1, keepdims=True)
    picked = present & (ops.cast(rank, "int32") < (count + 1) // 2)
    weights = ops.cast(picked, "float32")[:, None, None, :]
    return ops.sum(onehot * weights, axis=-1) > 0


def _grey(images):
    r, g, b = images[..., 0:1], images[..., 1:2], images[..., 2:3]
    return _GREY[0] * r + _GREY[1] * g + _GREY[2] * b


def _blur(images, sigma):
    """Separable Gaussian blur, one standard deviation per image."""
    taps = ops.cast(ops.arange(-BLUR_RADIUS, BLUR_RADIUS + 1), "float32")
    kernel = ops.exp(-0.5 * ops.square(taps[None, :] / sigma[:, None]))
    kernel = kernel / ops.sum(kernel, axis=-1, keepdims=True)  # (B, taps)
    r = BLUR_RADIUS
    for axis in (1, 2):
        pad = [[0, 0]] * 4
        pad[axis] = [r, r]
        padded = ops.pad(images, pad, mode="symmetric")
        out = 0.0
        for k in range(2 * r + 1):
            end = k - 2 * r or None
            piece = padded[:, k:end] if axis == 1 else padded[:, :, k:end]
            out = out + kernel[:, k, None, None, None] * piece
        images = out
    return images


def photometric_augment(images, seed=None):
    """Colour jitter, Gaussian blur and Gaussian noise, per image.

    For images with values in 0..255 (what klseg models take). Each image
    draws a brightness factor ``b``, a contrast factor ``c`` and a saturation
    factor ``s`` (uniform in ``[0.8, 1.2]``), then

        x <- clip(b * x);  x <- clip(m + c * (x - m))  (m: mean grey level)
        x <- clip(g + s * (x - g))  (g: the pixel's grey level)

    then, with probability 0.5, a Gaussian blur (standard deviation uniform
    in [0.15, 1.15] pixels, 7 taps, symmetric borders; images need H, W >=
    3), then Gaussian noise of standard deviation uniform in [0, 8] grey
    levels, clipped to 0..255. No geometric change: pixel ``p`` stays at
    ``p``.

    Args:
        images: ``(B, H, W, 3)`` images in 0..255.
        seed: a ``keras.random.SeedGenerator`` or an int. Defaults to None.

    Returns:
        float32 ``(B, H, W, 3)`` images in 0..255.
    """
    x = ops.cast(images, "float32")
    batch = ops.shape(x)[0]

    def factor(amount):
        return _uniform(batch, (), seed, 1.0 - amount, 1.0 + amount)[
            :, None, None, None
        ]

    brightness = factor(BRIGHTNESS)
    contrast = factor(CONTRAST)
    saturation = factor(SATURATION)
    blur_draw = _uniform(batch, (), seed)
    sigma = _uniform(batch, (), seed, *BLUR_SIGMA)
    noise_std = _uniform(batch, (), seed, 0.0, NOISE_STD)
    noise = _normal(batch, tuple(x.shape[1:]), seed)

    x = ops.clip(x * brightness, 0.0, 255.0)
    mean = ops.mean(_grey(x), axis=(1, 2, 3), keepdims=True)
    x = ops.clip(mean + contrast * (x - mean), 0.0, 255.0)
    grey = _grey(x)
    x = ops.clip(grey + saturation * (x - grey), 0.0, 255.0)
    blurred = _blur(x, sigma)
    x = ops.where((blur_draw < BLUR_PROBABILITY)[:, None, None, None], blurred, x)
    x = x + noise_std[:, None, None, None] * noise
    return ops.clip(x, 0.0, 255.0)


# The consistency term -----------------------------------------------------


def consistency_divergence(
    teacher_logits, student_logits, *, temperature=1.0, threshold=0.0
):
    """Per-pixel masked consistency KL and the teacher's confidence.

        value_p = [conf_p >= threshold] * T^2
                  * KL(softmax(t_p / T) || softmax(s_p / T))
        conf_p  = max_c softmax(t_p)_c     (at temperature 1)

    computed in float32 from ``log_softmax``. With ``threshold=0`` every
    pixel counts.

    Args:
        teacher_logits: ``(..., K)`` teacher logits (not differentiated here;
            stop the gradient before if needed).
        student_logits: ``(..., K)`` student logits.
        temperature: softening temperature ``T``. Defaults to 1.0.
        threshold: confidence threshold in [0, 1]. Defaults to 0.0.

    Returns:
        ``(values, confidence)``: float32 tensors of shape ``(...)``.
    """
    teacher = ops.cast(teacher_logits, "float32")
    values = klseg_losses.kl_divergence(
        teacher, student_logits, target="logits", temperature=temperature
    )
    confidence = ops.max(ops.softmax(teacher, axis=-1), axis=-1)
    if threshold > 0:
        values = ops.where(confidence >= threshold, values, 0.0)
    return values, confidence


def rampup_factor(step, rampup):
    """The sigmoid ramp-up ``exp(-5 (1 - t)^2)``, ``t = min(step / rampup, 1)``.

    Laine & Aila (2017). ``step`` counts the training steps done before the
    current one (0 for the first); ``rampup=0`` gives 1 from the start.

    Example:

    >>> round(float(rampup_factor(0, 100)), 4), float(rampup_factor(100, 100))
    (0.0067, 1.0)
    """
    if not rampup:
        return ops.ones((), "float32")
    t = ops.minimum(ops.cast(step, "float32") / float(rampup), 1.0)
    return ops.exp(-5.0 * ops.square(1.0 - t))


def _with_label_terms(values, student_logits, labels):
    """``values`` where ``labels`` is negative; elsewhere the cross-entropy
    ``-log softmax(student)[label]`` (float32; a label >= the class count,
    an ignore label, counts 0)."""
    num_classes = int(student_logits.shape[-1])
    labels = ops.cast(labels, "int32")
    log_probs = ops.log_softmax(ops.cast(student_logits, "float32"), axis=-1)
    valid = (labels >= 0) & (labels < num_classes)
    index = ops.where(valid, labels, 0)[..., None]
    cross_entropy = -ops.squeeze(ops.take_along_axis(log_probs, index, axis=-1), -1)
    pasted = labels >= 0
    cross_entropy = ops.where(valid, cross_entropy, 0.0)
    return ops.where(pasted, cross_entropy, values)


# The model ----------------------------------------------------------------


def _clone_teacher(student):
    teacher = keras.models.clone_model(student)
    teacher.set_weights(student.get_weights())
    teacher.trainable = False
    teacher.name = f"{student.name}_ema"
    return teacher


def _is_float(variable):
    return "float" in str(variable.dtype)


def _number(value, name, low, high, *, high_open=False, integer=False):
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind)
    if ok:
        ok = low <= value and (value < high if high_open else value <= high)
    if not ok:
        right = ")" if high_open else "]"
        what = "an integer" if integer else "a number"
        where = f">= {low}" if high == math.inf else f"in [{low}, {high}{right}"
        raise InvalidArgumentError(
            f"`{name}` must be {what} {where}. Received: {name}={value!r}"
        )
    return value


@keras.saving.register_keras_serializable(package="klseg")
class MeanTeacherModel(KLRegularizedModel):
    """``KLRegularizedModel`` plus KL consistency to an EMA teacher.

    Total loss of a training step (what ``fit`` minimises):

        task_loss + kl_weight * KL_source
                  + consistency_weight * ramp(step) * consistency

    where the first two terms are ``KLRegularizedModel``'s (unchanged, on
    ``"images"`` and ``"source_images"``) and ``consistency`` is computed on
    ``x["unlabeled_images"]`` as follows, in this order, inside
    ``compute_loss``:

    1. EMA update (every training step, with or without unlabelled images):
       for every float weight of the student (trainable weights and
       BatchNorm moving statistics alike),
       ``ema = ema_decay * ema + (1 - ema_decay) * student``, from the
       student's weights of this step (before the optimizer applies its
       update). The teacher of step ``t`` is thus the average of the
       student's weights of steps ``<= t``. The step counter
       (``consistency_step``) goes up by one.
    2. The teacher (``ema_model``, inference mode: BatchNorm with its EMA
       moving statistics) predicts on the unlabelled images as delivered
       (the weak view), under ``stop_gradient``.
    3. Strong view: ``mix_batch`` (``mix``) pastes pixels of the previous
       image of the batch into each image and mixes the teacher's logits
       with the same mask; ``photometric_augment`` (colour jitter, blur,
       noise; ``photometric=True``) changes colours only. No geometric
       transform, so the views stay aligned pixel by pixel.
    4. The student predicts on the strong view (in training mode: with
       ``student_bn="trainable"`` its BatchNorm uses this batch's statistics
       and updates its moving statistics a second time in the step).
    5. ``consistency`` = ``T^2 * KL(softmax(z_ema / T) || softmax(z / T))``
       (``T = consistency_temperature``) summed over the pixels whose
       teacher confidence (max softmax probability of the mixed teacher
       logits at temperature 1) is ``>= consistency_threshold``, divided by
       the number of *all* unlabelled pixels (FixMatch's normalisation:
       unconfident pixels contribute 0, so the term grows with the share of
       confident pixels instead of giving a handful of confident pixels the
       weight of a full batch). Under ``tf.distribute`` the count is that of
       the global batch (an all-reduce), so the loss equals one device's.

    ``ramp(step) = exp(-5 (1 - min(step / consistency_rampup, 1))^2)``
    with ``step`` the number of training steps done before this one
    (``rampup_factor``); 1 when ``consistency_rampup=0``. Gradients flow
    through the student only.

    Evaluation batches (``training=False``) update nothing: with
    ``"unlabeled_images"`` the term compares teacher and student on the weak
    view (no mixing, no photometric change); without, it is skipped.

    Logs: ``consistency_loss`` (epoch mean over unlabelled pixels, each batch
    weighted by its pixel count, like ``kl_loss``) and
    ``teacher_confidence`` (epoch mean of the teacher's confidence on the
    weak view over unlabelled pixels); both are 0 when no batch had
    unlabelled images. The logged ``loss`` is ``task_loss + kl_weight *
    kl_loss + consistency_weight * consistency_loss`` without the ramp
    (the ramp changes within an epoch; the objective each step minimises
    includes it).

    Randomness: the strong view draws from the model's own
    ``keras.random.SeedGenerator`` (seeded with ``seed``), whose state is
    a variable of the model (in ``model.variables``; the run layer's
    checkpoint saves it with the other random states). The EMA weights and
    the step counter are weights of the wrapper: ``save_weights`` /
    ``load_weights`` restore them. Under ``tf.distribute`` every replica
    draws the rows of the global batch and keeps its own (the photometric
    changes equal one device's when the batch splits evenly), and the mixing
    pairs images within each replica's share of the batch; the student's
    BatchNorm statistics enter the EMA as their mean over the replicas.

    Mixed precision: the teacher's and the student's logits are cast to
    float32 before any softmax; the KL is computed in float32.

    Args:
        student: the model to fine-tune (see ``KLRegularizedModel``).
        source: the frozen source model.
        consistency_weight: weight of the consistency term (>= 0). Defaults
            to 1.0.
        ema_decay: EMA decay in [0, 1) (0: the teacher is the student of the
            step). Defaults to 0.99.
        consistency_threshold: teacher confidence threshold in [0, 1]; 0
            keeps every pixel. Defaults to 0.9.
        consistency_temperature: temperature ``T`` of the consistency KL, in
            ``klseg.ops.TEMPERATURE_RANGE``; scaled by ``T^2``. Defaults to
            1.0 (the teacher's probabilities as they are; the threshold, at
            T = 1, already keeps only confident pixels).
        consistency_rampup: steps of the sigmoid ramp-up of the weight
            (>= 0; 0 = none). Defaults to 0.
        mix: ``"classmix"``, ``"cutmix"`` or ``"none"``. Defaults to
            ``"classmix"``.
        photometric: apply ``photometric_augment`` to the strong view.
            Defaults to True.
        seed: int seed of the strong view's generator. Defaults to None (a
            random seed, drawn from Python's ``random`` and kept in the
            config).
        **kwargs: ``KLRegularizedModel`` arguments (``kl_weight``,
            ``temperature``, ``kl_inputs``, ``class_map``, ``student_bn``,
            ``ignore_class``, ``name``).

    Raises:
        InvalidArgumentError: for bad arguments (and those of
            ``KLRegularizedModel``).

    Example:

    ```python
    student = klseg.finetune.clone_student(source)
    model = MeanTeacherModel(student, source, kl_weight=0.3, kl_inputs="target",
                             consistency_threshold=0.9, consistency_rampup=500)
    model.compile(optimizer="adam",
                  loss=klseg.losses.SparseKLDivergence(ignore_class=255))
    model.fit(train_ds)  # x: {"images", "unlabeled_images"}, y: masks of "images"
    model.ema_model.save("teacher.keras")
    ```
    """

    _uses_unlabeled_images = True

    def __init__(
        self,
        student,
        source,
        *,
        consistency_weight=1.0,
        ema_decay=0.99,
        consistency_threshold=0.9,
        consistency_temperature=1.0,
        consistency_rampup=0,
        mix="classmix",
        photometric=True,
        seed=None,
        **kwargs,
    ):
        _number(consistency_weight, "consistency_weight", 0, math.inf)
        _number(ema_decay, "ema_decay", 0, 1, high_open=True)
        _number(consistency_threshold, "consistency_threshold", 0, 1)
        check_temperature(consistency_temperature, name="consistency_temperature")
        _number(consistency_rampup, "consistency_rampup", 0, math.inf, integer=True)
        _check_mix(mix)
        if not isinstance(photometric, bool):
            raise InvalidArgumentError(
                f"`photometric` must be True or False. "
                f"Received: photometric={photometric!r}"
            )
        if seed is None:
            seed = random.randint(1, 2**31 - 2)
        _number(seed, "seed", 0, 2**31 - 1, integer=True)
        super().__init__(student, source, **kwargs)
        self.consistency_weight = float(consistency_weight)
        self.ema_decay = float(ema_decay)
        self.consistency_threshold = float(consistency_threshold)
        self.consistency_temperature = float(consistency_temperature)
        self.consistency_rampup = int(consistency_rampup)
        self.mix = mix
        self.photometric = photometric
        self.seed = int(seed)

        self.ema_model = _clone_teacher(student)
        pairs = list(zip(student.weights, self.ema_model.weights))
        if len(student.weights) != len(self.ema_model.weights) or any(
            tuple(s.shape) != tuple(e.shape) for s, e in pairs
        ):
            raise InvalidArgumentError(
                "keras.models.clone_model(student) does not reproduce the "
                "student's weights; MeanTeacherModel needs a student that "
                f"clones. Received: student={student.name!r}"
            )
        self._ema_pairs = [(s, e) for s, e in pairs if _is_float(e)]
        self.consistency_step = self.add_weight(
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            name="consistency_step",
        )
        self.strong_view_seed = keras.random.SeedGenerator(
            self.seed, name="strong_view_seed"
        )
        self.consistency_loss_tracker = keras.metrics.Mean(name="consistency_loss")
        self.teacher_confidence_tracker = keras.metrics.Mean(name="teacher_confidence")

    # -- teacher ----------------------------------------------------------

    def _update_teacher(self):
        """EMA step and step counter; returns the steps done before this one."""
        decay = self.ema_decay
        replicas = num_replicas()
        for student, ema in self._ema_pairs:
            value = ops.stop_gradient(ops.cast(student.value, "float32"))
            if replicas > 1 and not student.trainable:
                # Non-trainable weights (BatchNorm moving statistics) may
                # differ between replicas: average them so every replica's
                # teacher stays the same.
                value = global_sum(value) / float(replicas)
            new = decay * ops.cast(ema.value, "float32") + (1.0 - decay) * value
            ema.assign(ops.cast(new, ema.dtype))
        # A copy of the value: a TensorFlow variable would read the new one.
        step = ops.add(self.consistency_step, 0)
        self.consistency_step.assign(step + 1)
        return step

    # -- loss -------------------------------------------------------------

    def _strong_view(self, images, teacher_logits, parts, y):
        """``(images, teacher logits, labels)`` of the strong view; ``labels``
        (None here) are hard labels of pixels pasted from labelled images,
        where the student is pulled towards them instead of the teacher."""
        del parts, y  # A subclass pastes from the labelled images.
        images, teacher_logits, _ = mix_batch(
            images, teacher_logits, mix=self.mix, seed=self.strong_view_seed
        )
        if self.photometric:
            images = photometric_augment(images, seed=self.strong_view_seed)
        return images, teacher_logits, None

    def _track_teacher(self, teacher_logits, confidence, count):
        """Epoch statistics of the teacher's predictions on the weak view."""
        self.teacher_confidence_tracker.update_state(
            ops.mean(confidence), sample_weight=count
        )

    def _consistency_term(self, unlabeled, training, parts=None, y=None):
        """This replica's share of the consistency term of the global batch."""
        images = ops.cast(unlabeled, "float32")
        teacher = self.ema_model(images, training=False)
        teacher = ops.stop_gradient(ops.cast(teacher, "float32"))
        weak_confidence = ops.max(ops.softmax(teacher, axis=-1), axis=-1)
        labels = None
        if training:
            images, teacher, labels = self._strong_view(images, teacher, parts, y)
        student = self.student(images, training=training)
        values, _ = consistency_divergence(
            teacher,
            student,
            temperature=self.consistency_temperature,
            threshold=self.consistency_threshold,
        )
        if labels is not None:
            values = _with_label_terms(values, student, labels)
        local_sum = ops.sum(values)
        count = ops.cast(ops.size(values), "float32")
        self.consistency_loss_tracker.update_state(
            local_sum / ops.maximum(count, 1.0), sample_weight=count
        )
        self._track_teacher(teacher, weak_confidence, count)
        return local_sum / ops.maximum(global_sum(count), 1.0)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The loss of one batch (see the class docstring).

        In training, first the EMA update of the teacher and the step
        counter; then ``KLRegularizedModel``'s loss plus, for a batch with
        ``"unlabeled_images"``, ``consistency_weight * ramp * consistency``.
        """
        total = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        step = self._update_teacher() if training else None
        parts = unpack_inputs(x)
        if parts["unlabeled_images"] is None:
            return total
        term = self._consistency_term(parts["unlabeled_images"], training, parts, y)
        weight = ops.cast(self.consistency_weight, "float32")
        if training:
            weight = weight * rampup_factor(step, self.consistency_rampup)
        return total + ops.cast(weight * term, total.dtype)

    def get_metrics_result(self):
        """The metrics, ``loss`` including ``consistency_weight *
        consistency_loss`` (without the ramp)."""
        results = super().get_metrics_result()
        consistency = self.consistency_loss_tracker.result()
        results["loss"] = results["loss"] + ops.cast(
            self.consistency_weight, consistency.dtype
        ) * ops.cast(consistency, results["loss"].dtype)
        return results

    # -- saving -----------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "consistency_weight": self.consistency_weight,
                "ema_decay": self.ema_decay,
                "consistency_threshold": self.consistency_threshold,
                "consistency_temperature": self.consistency_temperature,
                "consistency_rampup": self.consistency_rampup,
                "mix": self.mix,
                "photometric": self.photometric,
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        # Keras' deserialisation consumes the nested model configs in place.
        return super().from_config(copy.deepcopy(config))
