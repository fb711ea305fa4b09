"""LiteRT (TFLite) export for one image size, with optional quantisation.

``export_litert`` writes one ``.tflite`` file: uint8 images ``(1, height,
width, 3)`` in, the int32 class map ``(1, height, width)`` out, with the
padding to the size multiple and the argmax inside the graph
(``klseg.export.serving_model``). It builds on Keras' own
``model.export(format="litert")``; quantisation goes through the TFLite
converter options Keras forwards. TensorFlow backend only. ``run_litert``
runs such a file.
"""

from klseg import registry
from klseg.errors import InvalidArgumentError
from klseg.export import export_utils
from klseg.export.serving import serving_model

__all__ = ["export_litert", "run_litert"]


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
    export_utils.require_tensorflow_backend("LiteRT")
    height, width = export_utils.image_size(image_size)
    options = _converter_options(quantize, representative_images, height, width)
    wrapper = serving_model(model, (height, width), size_multiple=size_multiple)

    def write(target):
        try:
            wrapper.export(str(target), format="litert", verbose=False, **options)
        except Exception as e:  # the converter raises many types
            raise export_utils.conversion_error("LiteRT", e) from e

    return export_utils.write_file(path, ".tflite", write)


def _converter_options(quantize, representative_images, height, width):
    """The TFLite converter options of ``quantize`` (checked)."""
    import tensorflow as tf

    if quantize not in registry.QUANTIZATIONS:
        raise InvalidArgumentError(
            f"`quantize` must be one of {list(registry.QUANTIZATIONS)}. "
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
    images = _representative_images(representative_images, height, width)

    def dataset():
        for image in images:
            yield [image[None]]

    return {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        "representative_dataset": dataset,
        "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
    }


def _representative_images(representative_images, height, width):
    """The int8 calibration images as a list of uint8 arrays (checked)."""
    import numpy as np

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
    return images


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
