"""Knowledge distillation of a segmentation model into a smaller one.

A large *teacher* model is trained; a smaller *student* (another
architecture or size, the same classes) learns from the labels it has and
from the teacher's per-pixel predictions on every training image, labelled
or not:

    loss = task_loss(y, student(images))                    [labelled pixels]
         + kl_weight * KL_term(teacher(images), student(images))

with one of two KL terms (``kl_type``):

- ``"pixel"``: the mean over pixels of
  ``T^2 * KL(softmax_c(t / T) || softmax_c(s / T))``, the class
  distributions of each pixel (Hinton et al. 2015, per pixel as in Liu et
  al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR
  2019). Every pixel of every image counts, labelled or not.
- ``"channel"``: for each image and class channel, the KL between the
  teacher's and the student's softmax over the *spatial positions* of
  ``logits / T``, times ``T^2``, averaged over images and channels (Shu et
  al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV
  2021; ``klseg.losses.channel_wise_kl_divergence``). On an image with
  labels its ignored pixels are left out of both softmaxes; on an
  unlabelled image (every pixel ``ignore_class``) all pixels count.

``DistillationModel`` is ``klseg.finetune.KLRegularizedModel`` with
``kl_inputs="target"`` and a teacher of the student's classes: the same
replica-correct sums, the same pixel-weighted logs (``task_loss``,
``kl_loss``, ``loss``), the same frozen teacher in inference mode under
``stop_gradient``.

Everything here uses ``keras.ops`` only and runs on the TensorFlow and JAX
backends.
"""

import keras
from keras import ops

from klseg import losses as klseg_losses
from klseg import models as klseg_models
from klseg import registry
from klseg.errors import InvalidArgumentError
from klseg.finetune import KLRegularizedModel
from klseg.replicas import global_sum

__all__ = [
    "DEFAULT_KL_TYPE",
    "DEFAULT_KL_WEIGHT",
    "DEFAULT_TEMPERATURE",
    "KL_TYPES",
    "DistillationModel",
    "default_temperature",
]

#: The KL terms ``DistillationModel`` offers (``klseg.registry``).
KL_TYPES = registry.DISTILL_KL_TYPES
#: Default KL term.
DEFAULT_KL_TYPE = "pixel"
#: Default weight of the KL term (see docs/distill.md for the measurement).
DEFAULT_KL_WEIGHT = registry.DISTILL_KL_WEIGHT
#: Default temperature of each KL term (``klseg.registry`` says why).
DEFAULT_TEMPERATURE = registry.DISTILL_TEMPERATURE


def default_temperature(kl_type=DEFAULT_KL_TYPE):
    """The default temperature of the ``kl_type`` term."""
    _check_kl_type(kl_type)
    return DEFAULT_TEMPERATURE[kl_type]


def _check_kl_type(kl_type):
    if kl_type not in KL_TYPES:
        raise InvalidArgumentError(
            f"`kl_type` must be one of {KL_TYPES}. Received: kl_type={kl_type!r}"
        )


def _images(x):
    """The images of ``x`` (a tensor, or a dict with only ``"images"``)."""
    if isinstance(x, dict):
        if set(x) != {"images"}:
            raise InvalidArgumentError(
                "DistillationModel takes an images tensor or a dict with the "
                f"one key 'images'. Received keys: {sorted(x)}"
            )
        return x["images"]
    if isinstance(x, (list, tuple)):
        raise InvalidArgumentError(
            "DistillationModel takes an images tensor or a dict "
            f"{{'images': ...}}; received a {type(x).__name__} of {len(x)} items."
        )
    return x


def _resize_spatial(x, like):
    """``x`` (B, h, w, C) resized bilinearly to the height and width of
    ``like`` when both are known when traced and differ (unknown sizes are
    taken to be equal; ``keras.ops.image.resize`` needs static sizes)."""
    size, current = tuple(like.shape[1:3]), tuple(x.shape[1:3])
    if None in size or None in current or size == current:
        return x
    return ops.image.resize(x, size, interpolation="bilinear")


def _labelled_mask(y, num_classes, ignore_class):
    """(B, H, W) bool: the pixels of ``y`` that carry a label."""
    y = ops.convert_to_tensor(y)
    if len(y.shape) == 4 and y.shape[-1] not in (None, 1):  # one-hot / soft
        return ops.sum(ops.cast(y, "float32"), axis=-1) > 0
    if len(y.shape) == 4:
        y = ops.squeeze(y, -1)
    labels = ops.cast(y, "int32")
    return (labels >= 0) & (labels < num_classes) & (labels != ignore_class)


def _resize_mask(mask, like):
    """A (B, H, W) mask at the height and width of ``like`` (nearest)."""
    size, current = tuple(like.shape[1:3]), tuple(mask.shape[1:3])
    if None in size or None in current or size == current:
        return mask
    resized = ops.image.resize(
        ops.cast(mask, "float32")[..., None], size, interpolation="nearest"
    )
    return resized[..., 0] > 0.5


@keras.saving.register_keras_serializable(package="klseg")
class DistillationModel(KLRegularizedModel):
    """Trains ``student`` on labels and on a frozen ``teacher``'s predictions.

    Total loss (what ``fit`` minimises and ``evaluate`` reports as "loss"):

        task_loss(y, student(images)) + kl_weight * KL

    where ``task_loss`` is the loss given to ``compile`` (for example
    ``klseg.losses.SparseKLDivergence(ignore_class=255)``: mean over the
    labelled pixels) and ``KL`` is, with ``kl_type="pixel"``, the mean over
    every pixel of every image of ``T^2 * KL(softmax(t / T) ||
    softmax(s / T))`` over the classes, and with ``kl_type="channel"`` the
    mean over images and class channels of ``T^2 * KL(softmax_i(t_c / T) ||
    softmax_i(s_c / T))`` over the spatial positions ``i`` (see the module
    docstring). ``t`` are the teacher's logits (inference mode, no
    gradient), ``s`` the student's. An unlabelled image (mask all
    ``ignore_class``) adds to the KL term only.

    Under ``tf.distribute`` both terms are those of the global batch: the
    labelled-pixel count, the pixel count (``"pixel"``) and the image count
    (``"channel"``) are summed over the replicas, so the loss equals one
    device's on the same global batch. The logs ``task_loss`` and
    ``kl_loss`` are epoch means weighted by those counts, and ``loss`` is
    ``task_loss + kl_weight * kl_loss`` (as ``KLRegularizedModel`` logs).

    The student may output logits at another resolution (another output
    stride) than the teacher: they are resized bilinearly to the input
    images' height and width (what ``call`` returns, so the task loss and
    metrics compare them with the masks) and, if the teacher's output has
    yet another size, to the teacher's size for the KL term. The klseg and
    KerasHub segmenters output at the input size, so for them the KL term
    compares the student resized to the teacher's size. Sizes must be known
    when the step is traced (fixed-size batches) for a resize to happen.

    The student may have any architecture and size (a larger student is
    allowed) but must predict the teacher's classes, in the teacher's order.

    Inputs: ``x`` is the images ``(B, H, W, 3)`` (or ``{"images": ...}``);
    ``y`` the integer masks (``ignore_class`` for unlabelled pixels).
    ``model.student`` is the trained model: use it for inference, ``save``
    and export.

    Args:
        student: the model to train (images in, per-pixel logits out).
        teacher: the frozen teacher (same input convention and classes).
        kl_weight: weight of the KL term (>= 0; 0 trains on labels alone).
            Defaults to ``DEFAULT_KL_WEIGHT``.
        temperature: softening temperature ``T`` in ``[1e-3, 1e3]``; the term
            is scaled by ``T^2``. Defaults to None:
            ``DEFAULT_TEMPERATURE[kl_type]``.
        kl_type: ``"pixel"`` or ``"channel"``. Defaults to ``"pixel"``.
        student_bn: the student's BatchNorm: ``"trainable"``, ``"frozen"``
            or ``"synchronized"`` (batch statistics of the global batch
            under ``tf.distribute``), as for ``KLRegularizedModel``.
            Defaults to ``"trainable"``.
        ignore_class: the mask value of unlabelled pixels. Defaults to 255.
        **kwargs: standard ``keras.Model`` arguments (``name``).

    Raises:
        InvalidArgumentError: bad arguments, the teacher passed as the
            student, or a student that does not predict the teacher's
            number of classes.
        ModelError: models that are not single-input per-pixel logits
            models (for example a softmax output layer).

    Example:

    ```python
    teacher = klseg.load_model("teacher.keras")
    student = klseg.models.unet(
        klseg.models.num_classes(teacher), base_filters=8,
        class_names=klseg.models.get_class_names(teacher))
    model = DistillationModel(student, teacher, kl_type="channel")
    model.compile(optimizer="adam",
                  loss=klseg.losses.SparseKLDivergence(ignore_class=255))
    model.fit(images, masks, epochs=5)    # masks of unlabelled images: 255
    model.student.save("student.keras")
    ```
    """

    def __init__(
        self,
        student,
        teacher,
        *,
        kl_weight=DEFAULT_KL_WEIGHT,
        temperature=None,
        kl_type=DEFAULT_KL_TYPE,
        student_bn="trainable",
        ignore_class=255,
        **kwargs,
    ):
        _check_kl_type(kl_type)
        if student is teacher:
            raise InvalidArgumentError(
                "`student` and `teacher` are the same model object; distil "
                "into another (usually smaller) model."
            )
        num_student = klseg_models.check_segmentation_model(student, "student")
        num_teacher = klseg_models.check_segmentation_model(teacher, "teacher")
        if num_student != num_teacher:
            raise InvalidArgumentError(
                f"The student predicts {num_student} classes and the teacher "
                f"{num_teacher}; a distilled student must predict the teacher's "
                f"classes. Build the student with num_classes={num_teacher} "
                "(class_names=klseg.models.get_class_names(teacher))."
            )
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE[kl_type]
        super().__init__(
            student,
            teacher,
            kl_weight=kl_weight,
            temperature=temperature,
            kl_inputs="target",
            student_bn=student_bn,
            ignore_class=ignore_class,
            **kwargs,
        )
        self.kl_type = kl_type

    @property
    def teacher(self):
        """The frozen teacher (``KLRegularizedModel.source``)."""
        return self.source

    # -- forward ----------------------------------------------------------

    def call(self, x, training=None):
        images = _images(x)
        logits = self.student(images, training=training)
        return _resize_spatial(logits, images)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return keras.Model.compute_metrics(
            self, x, y, y_pred, sample_weight=sample_weight
        )

    # -- loss -------------------------------------------------------------

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The loss of one batch (see the class docstring).

        Under ``tf.distribute`` the value is this replica's share: the
        replicas' values add up to the loss of the global batch.
        """
        images = _images(x)
        task, task_mean, count, extra = self._task_term(
            images, y, y_pred, sample_weight, training
        )
        self.task_loss_tracker.update_state(
            task_mean, sample_weight=1.0 if count is None else count
        )
        total = task
        if extra is not None:
            self.extra_loss_tracker.update_state(extra)
            total = total + ops.cast(extra, total.dtype)
        if self.kl_weight > 0:
            teacher = self.source(images, training=False)
            teacher = ops.stop_gradient(ops.cast(teacher, "float32"))
            student = _resize_spatial(ops.cast(y_pred, "float32"), teacher)
            if self.kl_type == "pixel":
                kl = self._kl_term(student, teacher, None)
            else:
                kl = self._channel_term(student, teacher, y)
            total = total + ops.cast(self.kl_weight, kl.dtype) * kl
        return total

    def _channel_term(self, student, teacher, y):
        """Mean channel-wise KL over the global batch's images and channels."""
        keep = None
        if y is not None:
            labelled = _labelled_mask(y, self.num_classes, self.ignore_class)
            labelled = _resize_mask(labelled, teacher)
            # An image without a label keeps every pixel.
            has_labels = ops.any(labelled, axis=(1, 2), keepdims=True)
            keep = ops.logical_or(labelled, ops.logical_not(has_labels))
        values = klseg_losses.channel_wise_kl_divergence(
            teacher, student, temperature=self.temperature, mask=keep
        )
        per_image = ops.mean(values, axis=-1)
        local_sum = ops.sum(per_image)
        count = ops.cast(ops.shape(per_image)[0], "float32")
        self.kl_loss_tracker.update_state(
            local_sum / ops.maximum(count, 1.0), sample_weight=count
        )
        return local_sum / ops.maximum(global_sum(count), 1.0)

    # -- saving -----------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.source),
            "kl_weight": self.kl_weight,
            "temperature": self.temperature,
            "kl_type": self.kl_type,
            "student_bn": self.student_bn,
            "ignore_class": self.ignore_class,
        }

    _MODEL_KEYS = ("student", "teacher")
