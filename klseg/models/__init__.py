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

from klseg.errors import InvalidArgumentError, ModelError
from klseg.models.backbones import BACKBONES
from klseg.models.deeplab import deeplabv3_plus
from klseg.models.layers import ClassLogits, ImagePreprocessing
from klseg.models.unet import unet

__all__ = [
    "BACKBONES",
    "ClassLogits",
    "ImagePreprocessing",
    "available_models",
    "build",
    "deeplabv3_plus",
    "get_class_names",
    "num_classes",
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
    import keras

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
