"""ONNX export for one image size.

``export_onnx`` writes one ``.onnx`` file: uint8 images ``(batch, height,
width, 3)``, any batch size, in; the int32 class map ``(batch, height,
width)`` out, with the padding to the size multiple and the argmax inside
the graph (``klseg.export.serving_model``). It builds on Keras' own
``model.export(format="onnx")`` (``tf2onnx`` on the TensorFlow backend).
TensorFlow backend only.
"""

import warnings

from klseg.errors import InvalidArgumentError, ModelError
from klseg.export import export_utils
from klseg.export.serving import serving_model

__all__ = ["export_onnx"]


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
    export_utils.require_tensorflow_backend("ONNX")
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        raise ModelError(
            "ONNX export needs the tf2onnx and onnx packages: "
            'pip install "klseg[export]" (or pip install tf2onnx onnx).'
        ) from None
    height, width = export_utils.image_size(image_size)
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
            raise export_utils.conversion_error("ONNX", e) from e

    return export_utils.write_file(path, ".onnx", write)
