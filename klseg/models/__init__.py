"""Segmentation models: U-Net and DeepLabV3+, a registry and model helpers.

Every model takes images (B, H, W, 3) with values in 0..255 (uint8 or
float), normalises them itself (``ImagePreprocessing``) and returns float32
per-pixel logits (B, H, W, num_classes) from a ``ClassLogits`` head that
carries the class names. Heights and widths must be multiples of the model's
size multiple (``size_multiple(model)``).

Example:

>>> import klseg.models
>>> model = klseg.models.build("unet", num_classes=3, base_filters=8, depth=2)
>>> klseg.models.size_multiple(model), klseg.models.num_classes(model)
(4, 3)
>>> klseg.models.get_class_names(model)
['class_0', 'class_1', 'class_2']
"""

import keras

from klseg.errors import InvalidArgumentError, ModelError
from klseg.models.backbones import BACKBONES
from klseg.models.deeplab import deeplabv3_plus
from klseg.models.layers import ClassLogits, ImagePreprocessing, check_training_size
from klseg.models.unet import unet

__all__ = [
    "BACKBONES",
    "ClassLogits",
    "ImagePreprocessing",
    "available_models",
    "build",
    "check_segmentation_model",
    "deeplabv3_plus",
    "get_class_names",
    "get_training_size",
    "num_classes",
    "predict_logits",
    "set_batch_norm",
    "set_training_size",
    "size_multiple",
    "unet",
    "with_classes",
]

_REGISTRY = {
    "deeplabv3_plus": deeplabv3_plus,
    "unet": unet,
}


def available_models():
    """The names ``build`` accepts, sorted."""
    return sorted(_REGISTRY)


def build(name, **kwargs):
    """Builds a model by registry name.

    Args:
        name: one of ``available_models()``.
        **kwargs: arguments of the builder (``num_classes`` is required).

    Returns:
        A ``keras.Model``.

    Raises:
        ValueError: (``InvalidArgumentError``) for an unknown name; the
            message lists the valid names.
    """
    if name not in _REGISTRY:
        raise InvalidArgumentError(
            f"Unknown model {name!r}. Valid names: {', '.join(available_models())}. "
            f"Received: name={name!r}"
        )
    return _REGISTRY[name](**kwargs)


# Layers that pass their input's values on (moved, cropped, resized, copied,
# never rescaled): a probability map stays one after them. An Activation
# layer passes values on only with activation="linear".
_PASS_THROUGH = (
    "BilinearUpsampling",
    "Cropping2D",
    "Dropout",
    "GaussianDropout",
    "Identity",
    "Permute",
    "Reshape",
    "Resizing",
    "SpatialDropout2D",
    "UpSampling2D",
    "ZeroPadding2D",
)
# Activations whose outputs are probabilities, not logits.
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def _model_outputs(model):
    try:
        return list(getattr(model, "outputs", None) or [])
    except (AttributeError, ValueError):  # an unbuilt Sequential
        return []


def _activation_name(operation):
    return getattr(getattr(operation, "activation", None), "__name__", None)


def _probability_activation(operation):
    """'softmax' or 'sigmoid' if ``operation`` outputs probabilities."""
    name = type(operation).__name__
    if name in ("Softmax", "Sigmoid"):
        # keras.layers.Softmax, or keras.ops.softmax / sigmoid applied to a
        # symbolic tensor (a keras.ops operation of that name).
        return name.lower()
    activation = _activation_name(operation)
    return activation if activation in _PROBABILITY_ACTIVATIONS else None


def _passes_values(operation):
    if type(operation).__name__ == "Activation":
        return _activation_name(operation) == "linear"
    return type(operation).__name__ in _PASS_THROUGH


def _trailing_probability_layer(model):
    """(path of the layer, activation) of an output softmax/sigmoid, or None.

    Follows the output back through layers that pass values on and into
    nested models.
    """
    tensor, prefix = _model_outputs(model)[0], model.name
    for _ in range(10_000):  # a bound, in case of a malformed graph
        history = getattr(tensor, "_keras_history", None)
        if not history:
            return None
        operation, node_index, tensor_index = history[:3]
        path = f"{prefix}/{operation.name}"
        activation = _probability_activation(operation)
        if activation is not None:
            return path, activation
        inner = _model_outputs(operation) if isinstance(operation, keras.Model) else []
        if inner:
            tensor, prefix = inner[min(tensor_index, len(inner) - 1)], path
            continue
        nodes = getattr(operation, "_inbound_nodes", None) or []
        if not _passes_values(operation) or node_index >= len(nodes):
            return None
        inputs = list(nodes[node_index].input_tensors)
        if len(inputs) != 1:
            return None
        tensor = inputs[0]
    return None


def predict_logits(model, images):
    """``model.predict_on_batch(images)``, also under a multi-replica strategy.

    Under a ``tf.distribute`` strategy with several replicas, Keras 3's
    ``predict_on_batch`` runs the whole batch on every replica and
    concatenates the results: 12 images on 2 replicas give 24 outputs
    (Keras 3.15, TensorFlow 2.21). A model built under such a strategy is
    predicted with ``predict`` instead, which splits the batch between the
    replicas. Elsewhere this is ``predict_on_batch`` (Keras' compiled
    predict function, traced once per input shape).

    Args:
        model: a ``keras.Model``.
        images: a batch of inputs.

    Returns:
        The model's outputs for ``images``, one per image, as numpy.
    """
    strategy = getattr(model, "distribute_strategy", None)
    if getattr(strategy, "num_replicas_in_sync", 1) > 1:
        return model.predict(images, batch_size=len(images), verbose=0)
    return model.predict_on_batch(images)


def check_segmentation_model(model, role="model"):
    """Checks that ``model`` maps images to per-pixel logits.

    The one check every entry point applies to a model it loads or wraps
    (fine-tuning, stored predictions, evaluation, export): a built
    Functional model with one image input and one output of shape (batch,
    height, width, num_classes) that holds logits. An output that is a
    probability map is refused: a trailing ``Softmax`` layer, a layer with
    ``activation="softmax"`` or ``"sigmoid"``, ``keras.ops.softmax`` applied
    in a Functional graph, also when it sits inside a nested model (a klseg
    model wrapped in another model) or is followed only by layers that move
    values without rescaling them (cropping, resizing, dropout, identity).
    klseg's losses apply ``log_softmax`` themselves; probabilities fed to
    them give wrong losses without any error.

    Args:
        model: the model to check.
        role: how messages name the model (``"student"``, ``"source"``).
            Defaults to ``"model"``.

    Returns:
        The number of classes (channels of the output).

    Raises:
        klseg.errors.InvalidArgumentError: ``model`` is not a ``keras.Model``.
        klseg.errors.ModelError: the model is not built, has several inputs
            or outputs, does not output per-pixel values, or outputs
            probabilities (the message names the layer).

    Example:

    >>> import keras
    >>> model = build("unet", num_classes=3, base_filters=4, depth=2)
    >>> check_segmentation_model(model)
    3
    >>> probs = keras.Model(model.input, keras.layers.Softmax()(model.output))
    >>> check_segmentation_model(probs, "source")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    klseg.errors.ModelError: The source model's output layer ...
    """
    if not isinstance(model, keras.Model):
        raise InvalidArgumentError(
            f"`{role}` must be a keras.Model. Received: {role}={model!r}"
        )
    outputs = _model_outputs(model)
    if not outputs:
        raise ModelError(
            f"The {role} model must be a built Functional model with one output "
            "(build it from a keras.Input, as klseg.models does)."
        )
    inputs = list(getattr(model, "inputs", None) or [])
    if len(outputs) != 1 or len(inputs) != 1:
        raise ModelError(
            f"The {role} model must have one image input and one logits output. "
            f"Received: {len(inputs)} inputs, {len(outputs)} outputs."
        )
    shape = tuple(outputs[0].shape)
    if len(shape) != 4 or shape[-1] is None:
        raise ModelError(
            f"The {role} model must output per-pixel logits of shape (batch, "
            f"height, width, num_classes). Received: output_shape={shape}"
        )
    found = _trailing_probability_layer(model)
    if found is not None:
        path, activation = found
        raise ModelError(
            f"The {role} model's output layer '{path}' applies {activation}, "
            "so the model outputs probabilities; klseg expects logits. Remove "
            "the activation (use activation=None) and let the losses apply "
            "log_softmax."
        )
    return int(shape[-1])


def _walk_layers(model):
    stack = [model]
    seen = set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        stack.extend(reversed(getattr(layer, "layers", None) or []))


def _find(model, layer_type):
    for layer in _walk_layers(model):
        if isinstance(layer, layer_type):
            return layer
    raise ModelError(
        f"Model {getattr(model, 'name', model)!r} has no klseg {layer_type.__name__} "
        "layer; build it with klseg.models (unet, deeplabv3_plus or build)."
    )


def size_multiple(model):
    """The model's size multiple: valid heights and widths are multiples of it.

    Raises:
        klseg.errors.ModelError: if ``model`` is not a klseg model.
    """
    return int(_find(model, ImagePreprocessing).size_multiple)


def num_classes(model):
    """Number of classes (channels of the logits) of a klseg model."""
    return int(_find(model, ClassLogits).num_classes)


def get_class_names(model):
    """Class names stored in the model, or ``["class_0", ...]`` if none."""
    head = _find(model, ClassLogits)
    if head.class_names is None:
        return [f"class_{i}" for i in range(head.num_classes)]
    return list(head.class_names)


def get_training_size(model):
    """``(height, width)`` the model was trained at, or ``None`` if unknown.

    ``klseg train`` and ``klseg finetune`` record it
    (:func:`set_training_size`); later runs use it as their default size.
    """
    size = _find(model, ImagePreprocessing).training_size
    return None if size is None else (int(size[0]), int(size[1]))


def set_training_size(model, size):
    """Records the training size ``(height, width)`` (or an int for a square)
    in the model; it is saved with it.

    Example:

    >>> model = unet(2, base_filters=4, depth=2)
    >>> set_training_size(model, (32, 64))
    >>> get_training_size(model)
    (32, 64)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    layer = _find(model, ImagePreprocessing)
    layer.training_size = check_training_size(size)


def set_batch_norm(model, policy):
    """Apply a BatchNorm policy to every BatchNormalization layer of
    ``model``: ``"frozen"`` (not trainable: moving statistics, fixed scale
    and offset), ``"synchronized"`` (under a ``tf.distribute`` strategy the
    batch statistics of the global batch, Keras' ``synchronized=True``; a
    JAX step computes them over the whole batch already, so nothing
    changes there) or ``"trainable"`` (nothing changes)."""
    synchronized = policy == "synchronized" and keras.backend.backend() == "tensorflow"
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            if policy == "frozen":
                layer.trainable = False
            elif synchronized:
                layer.synchronized = True


def with_classes(model, class_names, *, name=None):
    """``model`` with a new, freshly initialised head for other classes.

    The new model shares every layer of ``model`` (and so its weights) up
    to the ``ClassLogits`` head, which is replaced by one with
    ``class_names`` (same upsampling and initializer, new weights). Use it
    to fine-tune a model towards a different class set; call it on a copy
    (``klseg.finetune.clone_student(source, class_names=...)`` does) to keep
    the original intact.

    Args:
        model: a klseg segmentation model.
        class_names: the new classes' names, in order (unique strings).
        name: name of the new model. Defaults to ``model.name``.

    Returns:
        A ``keras.Model`` with ``len(class_names)`` output channels.

    Raises:
        klseg.errors.ModelError: ``model`` is not a klseg model or its
            ``ClassLogits`` layer is not its output.
        ValueError: (``InvalidArgumentError``) for empty or repeated names.

    Example:

    >>> model = unet(3, base_filters=4, depth=2, class_names=["a", "b", "c"])
    >>> new = with_classes(model, ["a", "bc"])
    >>> get_class_names(new), new.output.shape[-1]
    (['a', 'bc'], 2)
    """
    head = _find(model, ClassLogits)
    if len(model.outputs) != 1 or head.output is not model.outputs[0]:
        raise ModelError(
            f"Model {model.name!r}: its ClassLogits layer {head.name!r} is not "
            "its output, so the head cannot be replaced."
        )
    names = [str(c) for c in class_names] if class_names is not None else []
    if not names:
        raise InvalidArgumentError(
            "`class_names` must list at least one class. "
            f"Received: class_names={class_names!r}"
        )
    new_head = ClassLogits(
        class_names=names,
        upsample=head.upsample,
        kernel_initializer=head.kernel_initializer,
        name=head.name,
    )
    return keras.Model(model.input, new_head(head.input), name=name or model.name)
