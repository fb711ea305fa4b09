"""SavedModel export with a serving signature for uint8 images of any size.

``export_saved_model`` writes a TensorFlow SavedModel that needs neither klseg
nor Keras to run: ``tf.saved_model.load(path)`` in any TensorFlow program
gives

- ``signatures["serving_default"]`` (also ``serve``): takes ``images``, uint8
  ``(batch, height, width, 3)`` of any height and width, and returns
  ``{"classes": int32 (batch, height, width), "probabilities": float32
  (batch, height, width, num_classes)}``. Inside, the images are padded at
  the bottom and right with zeros (black pixels) up to the next multiple of
  the model's size multiple, the model runs once, and the outputs are cropped
  back to the input size. An empty batch (or images without pixels) gives
  empty outputs of the same shapes without running the model.
- ``signatures["class_names"]``: takes nothing and returns ``{"class_names":
  string (num_classes,)}``; the same list is written as JSON to
  ``assets.extra/class_names.json`` for tools that read files.
- ``signatures["logits"]``: the bare model on float32 images whose height and
  width are multiples of the size multiple.

The folder is written atomically: into a temporary folder beside ``path``,
then renamed into place, so a crash never leaves half an export behind.
"""

import json
import os
import shutil
from pathlib import Path

from klseg.errors import InvalidArgumentError, KlsegError, ModelError
from klseg.files import make_temp_dir

__all__ = ["export_saved_model", "pad_to_multiple"]


def pad_to_multiple(images, multiple):
    """Pad images at the bottom and right with zeros to a size multiple.

    This is the padding the exported serving signature applies before running
    the model; use it to compare ``model.predict`` with the served outputs on
    sizes that are not multiples.

    Args:
        images: numpy array ``(batch, height, width, channels)``.
        multiple: positive int, the model's size multiple.

    Returns:
        The padded numpy array (same dtype).
    """
    import numpy as np

    images = np.asarray(images)
    height, width = images.shape[1:3]
    pad_h = -height % multiple
    pad_w = -width % multiple
    return np.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


def _student(model):
    # A KLRegularizedModel (or anything wrapping a student) exports its
    # student; imported lazily to keep export independent of finetune.
    student = getattr(model, "student", None)
    return student if student is not None else model


def _size_multiple(model):
    from klseg import models as klseg_models

    try:
        multiple = klseg_models.size_multiple(model)
    except (KlsegError, ValueError, AttributeError, TypeError):
        multiple = 1
    return int(multiple)


def _class_names(model, num_classes, class_names):
    if class_names is None:
        from klseg import models as klseg_models

        try:
            class_names = klseg_models.get_class_names(model)
        except (KlsegError, ValueError, AttributeError, TypeError):
            class_names = None
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise InvalidArgumentError(
            f"`class_names` must have one name per output class "
            f"({num_classes}). Received: class_names={class_names}"
        )
    return class_names


def _check_model(model):
    """Number of classes of ``model``; raises for a model export cannot take."""
    import keras

    from klseg import models as klseg_models

    if isinstance(model, keras.Model) and not model.built:
        raise ModelError(
            "The model has not been built yet; call it on a batch of images "
            "(or build it from a keras.Input) before exporting."
        )
    return klseg_models.check_segmentation_model(model, "model")


def export_saved_model(model, path, *, class_names=None, size_multiple=None):
    """Export a segmentation model as a SavedModel with a uint8 signature.

    Args:
        model: a klseg segmentation model (images 0..255 in, per-pixel logits
            out), or a ``klseg.finetune.KLRegularizedModel`` (its student is
            exported).
        path: folder to create. An existing folder is replaced (atomically:
            the new export is written beside it and renamed into place);
            ``klseg export`` applies the output-folder policy first.
        class_names: names of the output classes. Defaults to the names the
            model carries (``klseg.models.get_class_names``).
        size_multiple: the model's size multiple (total stride). Defaults to
            ``klseg.models.size_multiple(model)``, or 1 for models without
            klseg's preprocessing layer.

    Returns:
        The ``pathlib.Path`` of the written SavedModel folder.

    Raises:
        InvalidArgumentError: if ``class_names`` does not match the number of
            classes.
        ModelError: if the model is not a built single-input model with
            per-pixel outputs.

    Example:

    ```python
    path = klseg.export.export_saved_model(model, "exported")
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = served(images=tf.constant(uint8_images))
    out["classes"], out["probabilities"]
    ```
    """
    import keras
    import tensorflow as tf

    model = _student(model)
    num_classes = _check_model(model)
    if size_multiple is None:
        size_multiple = _size_multiple(model)
    if not isinstance(size_multiple, int) or size_multiple < 1:
        raise InvalidArgumentError(
            "`size_multiple` must be a positive integer. "
            f"Received: size_multiple={size_multiple!r}"
        )
    names = _class_names(model, num_classes, class_names)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    archive = keras.export.ExportArchive()
    kwargs = {}
    if keras.backend.backend() == "jax":
        # Tell jax2tf that heights and widths are multiples of the stride.
        shapes = f"(b, {size_multiple}*h, {size_multiple}*w, 3)"
        kwargs["jax2tf_kwargs"] = {"polymorphic_shapes": [shapes]}
    logits_fn = archive.track_and_add_endpoint(
        "logits",
        model,
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)],
        **kwargs,
    )

    @tf.function(
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, "images")],
        autograph=False,
    )
    def serve(images):
        shape = tf.shape(images)
        height, width = shape[1], shape[2]

        def run_model():
            pad_h = tf.math.floormod(-height, size_multiple)
            pad_w = tf.math.floormod(-width, size_multiple)
            padded = tf.pad(images, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
            logits = logits_fn(tf.cast(padded, tf.float32))
            logits = tf.cast(logits[:, :height, :width, :], tf.float32)
            classes = tf.argmax(logits, axis=-1, output_type=tf.int32)
            return classes, tf.nn.softmax(logits, axis=-1)

        def no_pixels():
            # The model never sees an empty batch (or an image without
            # pixels): on JAX its converted function requires every
            # dimension to be at least 1.
            return (
                tf.zeros(shape[:3], tf.int32),
                tf.zeros(tf.concat([shape[:3], [num_classes]], 0), tf.float32),
            )

        classes, probabilities = tf.cond(tf.size(images) > 0, run_model, no_pixels)
        return {"classes": classes, "probabilities": probabilities}

    names_tensor = tf.constant(names, dtype=tf.string)

    @tf.function(input_signature=[], autograph=False)
    def class_names_fn():
        return {"class_names": tf.identity(names_tensor)}

    serve.get_concrete_function()
    class_names_fn.get_concrete_function()
    archive.add_endpoint("serving_default", serve)
    archive.add_endpoint("serve", serve)
    archive.add_endpoint("class_names", class_names_fn)

    tmp = make_temp_dir(path.parent, f".{path.name}.")
    try:
        archive.write_out(str(tmp / "export"), verbose=False)
        extra = tmp / "export" / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / "class_names.json").write_text(json.dumps(names, indent=1) + "\n")
        if path.exists():
            # Move the old export aside first so that a failure leaves it in
            # place, then swap the new one in.
            os.replace(path, tmp / "previous")
            try:
                os.replace(tmp / "export", path)
            except OSError:
                os.replace(tmp / "previous", path)
                raise
        else:
            os.replace(tmp / "export", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
