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

With ``image_size=(height, width)`` the signatures take that one size
instead (``images`` uint8 ``(batch, height, width, 3)``; ``logits`` at the
padded size): for models that cannot be traced at an unknown size, such as
KerasHub's DeepLabV3 (Keras' bilinear ``UpSampling2D`` needs a known size in
a TensorFlow graph).

The folder is written atomically: into a temporary folder beside ``path``,
then renamed into place, so a crash never leaves half an export behind.
"""

import json
import os
import shutil
from pathlib import Path

from klseg.errors import InvalidArgumentError, KlsegError, ModelError
from klseg.export import export_utils
from klseg.files import make_temp_dir

__all__ = ["export_saved_model"]


def export_saved_model(
    model, path, *, class_names=None, size_multiple=None, image_size=None
):
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
        image_size: ``(height, width)`` or an int: the one image size the
            signatures take. Defaults to None (any size).

    Returns:
        The ``pathlib.Path`` of the written SavedModel folder.

    Raises:
        InvalidArgumentError: if ``class_names`` does not match the number of
            classes, or for a bad ``image_size``.
        ModelError: if the model is not a built single-input model with
            per-pixel outputs, or cannot be traced at an unknown image size
            (the message says to give ``image_size``).

    Example:

    ```python
    path = klseg.export.export_saved_model(model, "exported")
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = served(images=tf.constant(uint8_images))
    out["classes"], out["probabilities"]
    ```
    """
    model = export_utils.student(model)
    num_classes = export_utils.check_model(model)
    if size_multiple is None:
        size_multiple = export_utils.size_multiple(model)
    if not isinstance(size_multiple, int) or size_multiple < 1:
        raise InvalidArgumentError(
            "`size_multiple` must be a positive integer. "
            f"Received: size_multiple={size_multiple!r}"
        )
    names = export_utils.class_names(model, num_classes, class_names)
    if image_size is not None:
        image_size = export_utils.image_size(image_size)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    archive = _archive(model, names, size_multiple, image_size)
    _write_archive(archive, names, path)
    return path


def _archive(model, names, size_multiple, image_size):
    """The ``ExportArchive`` with the ``logits``, ``serving_default``,
    ``serve`` and ``class_names`` endpoints."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    serve = _add_model(archive, model, len(names), size_multiple, image_size)

    names_tensor = tf.constant(names, dtype=tf.string)

    @tf.function(input_signature=[], autograph=False)
    def class_names_fn():
        return {"class_names": tf.identity(names_tensor)}

    class_names_fn.get_concrete_function()
    archive.add_endpoint("serving_default", serve)
    archive.add_endpoint("serve", serve)
    archive.add_endpoint("class_names", class_names_fn)
    return archive


def _add_model(archive, model, num_classes, size_multiple, image_size):
    """Traces the model into ``archive`` as ``logits``; returns the serving
    function built on it. ``image_size`` is ``(height, width)`` or None."""
    import keras
    import tensorflow as tf

    if image_size is None:
        height = width = padded_height = padded_width = None
    else:
        height, width = image_size
        padded_height = height + (-height % size_multiple)
        padded_width = width + (-width % size_multiple)
    kwargs = {}
    if keras.backend.backend() == "jax" and image_size is None:
        # Tell jax2tf that heights and widths are multiples of the stride.
        shapes = f"(b, {size_multiple}*h, {size_multiple}*w, 3)"
        kwargs["jax2tf_kwargs"] = {"polymorphic_shapes": [shapes]}
    try:
        logits_fn = archive.track_and_add_endpoint(
            "logits",
            _inference(model),
            input_signature=[
                tf.TensorSpec((None, padded_height, padded_width, 3), tf.float32)
            ],
            **kwargs,
        )
        serve = _serving_function(
            logits_fn, size_multiple, num_classes, (height, width)
        )
        serve.get_concrete_function()
    except KlsegError:
        raise
    except Exception as error:  # tracing errors of any kind, from any layer
        raise _tracing_error(error, image_size) from None
    return serve


def _tracing_error(error, image_size):
    """The ``ModelError`` for a model that could not be traced."""
    if image_size is not None:
        return export_utils.conversion_error("SavedModel", error)
    first = (export_utils.message_lines(error) or ["no message"])[0].strip()
    return ModelError(
        "The model cannot be exported for images of any size: tracing it "
        "at an unknown height and width failed "
        f"({type(error).__name__}: {first}). Export it for one "
        "image size: image_size=(height, width) (klseg export --image-size "
        "HxW)."
    )


def _write_archive(archive, names, path):
    """Writes ``archive`` and ``assets.extra/class_names.json`` to ``path``
    through a temporary folder beside it; an old export there is replaced
    only once the new one is complete."""
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


def _inference(model):
    """A layer that calls ``model`` with ``training=False``.

    Keras' export calls a model without ``training``; a model whose layers
    read an unset ``training`` otherwise than ``False`` would then be
    exported in another mode than ``predict`` runs it (measured: a KerasHub
    DeepLabV3 loaded from a ``.keras`` file, 2.4 apart in its pyramid
    pooling's output)."""
    import keras

    class _Inference(keras.layers.Layer):
        def __init__(self, model):
            super().__init__(name=f"{model.name}_inference", dtype=model.dtype_policy)
            self.model = model
            self.built = True

        def call(self, images):
            return self.model(images, training=False)

    return _Inference(model)


def _serving_function(logits_fn, size_multiple, num_classes, image_size):
    """The ``serving_default`` function: uint8 images in, classes and
    probabilities out, padded to the size multiple and cropped back."""
    import tensorflow as tf

    @tf.function(
        input_signature=[tf.TensorSpec((None, *image_size, 3), tf.uint8, "images")],
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

    return serve
