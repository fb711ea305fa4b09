"""The padding the exported graphs apply, and the fixed-size serving model.

``serving_model`` is the Keras model the fixed-size files (LiteRT, ONNX)
convert: uint8 images in, the int32 class map out. ``pad_to_multiple`` is
the same padding in numpy, to compare ``model.predict`` with served outputs.
"""

from klseg.export import export_utils

__all__ = ["pad_to_multiple", "serving_model"]


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

    export_utils.require_tensorflow_backend("This")
    model = export_utils.student(model)
    export_utils.check_model(model)
    height, width = export_utils.image_size(image_size)
    if size_multiple is None:
        size_multiple = export_utils.size_multiple(model)
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
