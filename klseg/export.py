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

``export_litert`` and ``export_onnx`` write one file for a fixed image size
(phones, ONNX Runtime): uint8 images ``(batch, height, width, 3)`` in, the
int32 class map ``(batch, height, width)`` out, with the padding to the size
multiple and the argmax inside the graph (:func:`serving_model`). They build
on Keras' own ``model.export(format="litert" | "onnx")``; quantisation goes
through the TFLite converter options Keras forwards. Both need the
TensorFlow backend.
"""

import json
import os
import shutil
import warnings
from pathlib import Path

from klseg import registry
from klseg.errors import InvalidArgumentError, KlsegError, ModelError
from klseg.files import make_temp_dir

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "export_litert",
    "export_onnx",
    "export_saved_model",
    "pad_to_multiple",
    "run_litert",
    "serving_model",
]

#: What ``klseg export --format`` writes (``klseg.registry``).
FORMATS = registry.EXPORT_FORMATS

#: TFLite quantisations (``klseg.registry``).
QUANTIZATIONS = registry.QUANTIZATIONS


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
    if image_size is None:
        height = width = padded_height = padded_width = None
    else:
        height, width = _image_size(image_size)
        padded_height = height + (-height % size_multiple)
        padded_width = width + (-width % size_multiple)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    archive = keras.export.ExportArchive()
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
        if image_size is not None:
            raise _conversion_error("SavedModel", error) from None
        first = (_message_lines(error) or ["no message"])[0].strip()
        raise ModelError(
            "The model cannot be exported for images of any size: tracing it "
            "at an unknown height and width failed "
            f"({type(error).__name__}: {first}). Export it for one "
            "image size: image_size=(height, width) (klseg export --image-size "
            "HxW)."
        ) from None

    names_tensor = tf.constant(names, dtype=tf.string)

    @tf.function(input_signature=[], autograph=False)
    def class_names_fn():
        return {"class_names": tf.identity(names_tensor)}

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


# --------------------------------------------------------------------------
# Fixed-size exports: LiteRT (TFLite) and ONNX
# --------------------------------------------------------------------------


def _image_size(image_size):
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        height, width = image_size
    except (TypeError, ValueError):
        height = width = None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (height, width)):
        raise InvalidArgumentError(
            "`image_size` must be an int or a (height, width) pair of ints. "
            f"Received: image_size={image_size!r}"
        )
    if min(height, width) < 1:
        raise InvalidArgumentError(
            f"`image_size` must be positive. Received: image_size={image_size!r}"
        )
    return height, width


def _require_tensorflow_backend(what):
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ModelError(
            f"{what} export needs the TensorFlow backend of Keras; this process "
            f"runs {keras.backend.backend()!r}. Run it with KERAS_BACKEND=tensorflow."
        )


def serving_model(model, image_size, *, size_multiple=None, batch_size=1):
    """A Keras model for one image size: uint8 images in, class map out.

    The model casts the uint8 images ``(batch, height, width, 3)`` to float32
    (klseg models normalise 0..255 images themselves), pads them at the
    bottom and right with zeros up to the next multiple of the size multiple
    (as the SavedModel's signature does), runs ``model``, crops the logits
    back and returns their argmax, int32 ``(batch, height, width)``. This is
    what :func:`export_litert` and :func:`export_onnx` convert. TensorFlow
    backend only.

    Args:
        model: a klseg segmentation model (or a ``KLRegularizedModel``: its
            student).
        image_size: ``(height, width)``, or an int for a square.
        size_multiple: the model's size multiple. Defaults to
            ``klseg.models.size_multiple(model)``, or 1.
        batch_size: fixed batch size of the input, or ``None`` for any.
            Defaults to 1.

    Returns:
        A ``keras.Model`` with one uint8 input named ``images``.
    """
    import keras
    import tensorflow as tf

    _require_tensorflow_backend("This")
    model = _student(model)
    _check_model(model)
    height, width = _image_size(image_size)
    if size_multiple is None:
        size_multiple = _size_multiple(model)
    pad_h, pad_w = -height % size_multiple, -width % size_multiple

    class _Images(keras.layers.Layer):
        # uint8 -> float32 0..255, zero-padded to the size multiple.
        def call(self, images):
            images = tf.cast(images, tf.float32)
            return tf.pad(images, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])

    class _Classes(keras.layers.Layer):
        # tf.argmax rather than keras.ops.argmax: the latter adds a bitwise
        # negative-zero fix that TFLite runs only with the Flex delegate.
        def call(self, logits):
            logits = logits[:, :height, :width, :]
            return tf.argmax(logits, axis=-1, output_type=tf.int32)

    inputs = keras.Input(
        (height, width, 3), batch_size=batch_size, dtype="uint8", name="images"
    )
    logits = model(_Images(name="images_float")(inputs), training=False)
    outputs = _Classes(name="classes")(logits)
    return keras.Model(inputs, outputs, name=f"{model.name}_classes")


def _converter_options(quantize, representative_images, height, width):
    import numpy as np
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise InvalidArgumentError(
            f"`quantize` must be one of {list(QUANTIZATIONS)}. "
            f"Received: quantize={quantize!r}"
        )
    if quantize != "int8" and representative_images is not None:
        raise InvalidArgumentError(
            "`representative_images` calibrate int8 quantisation only. "
            f"Received: quantize={quantize!r} with representative images"
        )
    if quantize == "none":
        return {}
    if quantize == "float16":
        return {
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "target_spec": {"supported_types": [tf.float16]},
        }
    if representative_images is None:
        raise InvalidArgumentError(
            "int8 quantisation needs `representative_images` (uint8 images "
            f"of the export size {height}x{width}) to calibrate on. "
            "Received: representative_images=None"
        )
    images = [np.asarray(image) for image in representative_images]
    if not images:
        raise InvalidArgumentError(
            "`representative_images` is empty; give at least one image."
        )
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.shape != (height, width, 3):
            raise InvalidArgumentError(
                f"representative image {i} must be uint8 ({height}, {width}, 3), "
                "the export size (resize it first). "
                f"Received: {image.dtype} {image.shape}"
            )

    def dataset():
        for image in images:
            yield [image[None]]

    return {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        "representative_dataset": dataset,
        "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
    }


def _write_file(path, suffix, write):
    """Calls ``write(temporary path)`` beside ``path``, then renames it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f".{path.name}.")
    try:
        target = tmp / f"model{suffix}"
        write(target)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _message_lines(error):
    """The non-blank lines of an exception's message."""
    return [line for line in str(error).strip().splitlines() if line.strip()]


def _conversion_error(what, error):
    lines = _message_lines(error)
    detail = "\n".join(lines[:8]) if lines else type(error).__name__
    return ModelError(f"{what} conversion failed: {type(error).__name__}: {detail}")


def export_litert(
    model,
    path,
    *,
    image_size,
    quantize="none",
    representative_images=None,
    size_multiple=None,
):
    """Export a segmentation model as a LiteRT (TFLite) file for one size.

    The file takes uint8 images ``(1, height, width, 3)`` and returns the
    int32 class map ``(1, height, width)`` (see :func:`serving_model`). It
    is converted by Keras' ``model.export(format="litert")``, with the
    converter options of ``quantize``:

    - ``"none"``: float32 weights and maths.
    - ``"float16"``: float16 weights (about half the size), float32 maths.
    - ``"int8"``: full-integer quantisation (int8 weights and activations;
      the uint8 input is cast and quantised inside the graph), calibrated on
      ``representative_images``.

    Args:
        model: a klseg segmentation model, or a ``KLRegularizedModel``.
        path: the ``.tflite`` file to write (atomically: written beside it,
            then renamed into place).
        image_size: ``(height, width)`` or an int; any size (the graph pads
            to the size multiple).
        quantize: one of ``QUANTIZATIONS``. Defaults to ``"none"``.
        representative_images: for ``"int8"`` only: uint8 images
            ``(height, width, 3)`` at ``image_size``, typical of the inputs
            (a hundred or so is plenty).
        size_multiple: as in :func:`serving_model`.

    Returns:
        The ``pathlib.Path`` of the written file.

    Raises:
        InvalidArgumentError: a bad ``image_size``, ``quantize`` or set of
            representative images, or a path not ending in ``.tflite``.
        ModelError: not a segmentation model, not the TensorFlow backend, or
            the conversion failed (the converter's message).

    Example:

    ```python
    export_litert(model, "model.tflite", image_size=(256, 512), quantize="float16")
    classes = run_litert("model.tflite", uint8_images)  # (n, 256, 512) int32
    ```
    """
    if not str(path).endswith(".tflite"):
        raise InvalidArgumentError(
            f"`path` must end with .tflite. Received: path={str(path)!r}"
        )
    _require_tensorflow_backend("LiteRT")
    height, width = _image_size(image_size)
    options = _converter_options(quantize, representative_images, height, width)
    wrapper = serving_model(model, (height, width), size_multiple=size_multiple)

    def write(target):
        try:
            wrapper.export(str(target), format="litert", verbose=False, **options)
        except Exception as e:  # the converter raises many types
            raise _conversion_error("LiteRT", e) from e

    return _write_file(path, ".tflite", write)


def export_onnx(model, path, *, image_size, size_multiple=None):
    """Export a segmentation model as an ONNX file for one image size.

    As :func:`export_litert` without quantisation, through Keras'
    ``model.export(format="onnx")`` (``tf2onnx`` on the TensorFlow backend):
    uint8 images ``(batch, height, width, 3)``, any batch size, in; the
    int32 class map ``(batch, height, width)`` out.

    Raises:
        InvalidArgumentError: a bad ``image_size`` or a path not ending in
            ``.onnx``.
        ModelError: not a segmentation model, not the TensorFlow backend,
            ``tf2onnx`` missing, or the conversion failed.
    """
    import numpy as np

    if not str(path).endswith(".onnx"):
        raise InvalidArgumentError(
            f"`path` must end with .onnx. Received: path={str(path)!r}"
        )
    _require_tensorflow_backend("ONNX")
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        raise ModelError(
            "ONNX export needs the tf2onnx and onnx packages: "
            'pip install "klseg[export]" (or pip install tf2onnx onnx).'
        ) from None
    height, width = _image_size(image_size)
    wrapper = serving_model(
        model, (height, width), size_multiple=size_multiple, batch_size=None
    )
    wrapper(np.zeros((1, height, width, 3), np.uint8))  # Keras wants it called

    def write(target):
        try:
            with warnings.catch_warnings():
                # Keras' tf2onnx patch probes np.object (NumPy 2).
                warnings.filterwarnings("ignore", "In the future `np.object`")
                wrapper.export(str(target), format="onnx", verbose=False)
        except Exception as e:  # tf2onnx raises many types
            raise _conversion_error("ONNX", e) from e

    return _write_file(path, ".onnx", write)


def run_litert(path, images):
    """Class maps of uint8 ``images`` from a ``.tflite`` file of this module.

    Runs the file with the LiteRT runtime (``ai_edge_litert``; TensorFlow's
    ``tf.lite.Interpreter`` when that is not installed), one image at a time.

    Args:
        path: a file written by :func:`export_litert`.
        images: uint8 ``(n, height, width, 3)`` at the file's size.

    Returns:
        int32 numpy array ``(n, height, width)``.

    Raises:
        InvalidArgumentError: images of another size or type than the file's
            input.
    """
    import numpy as np

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    images = np.asarray(images)
    expected = tuple(int(v) for v in source["shape"][1:])
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise InvalidArgumentError(
            f"{path} takes uint8 images {expected}. "
            f"Received: {images.dtype} {images.shape[1:]}"
        )
    out = np.zeros(images.shape[:3], np.int32)
    for i, image in enumerate(images):
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        out[i] = interpreter.get_tensor(target["index"])[0]
    return out
