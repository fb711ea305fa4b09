"""KerasHub image segmenters as klseg models (``keras-hub:PRESET_OR_DIR``).

A spec names a KerasHub preset: a local folder written by
``segmenter.save_to_preset(DIR)`` (works offline) or a preset name or handle
that ``keras_hub.models.ImageSegmenter.from_preset`` downloads
(``deeplab_v3_plus_resnet50_pascalvoc``, ``kaggle://...``, ``hf://...``).

:func:`load_segmenter` returns a klseg model around the segmenter: images
in 0..255 -> ``ImagePreprocessing`` (the preset's image converter's scale
and offset, written as a mean and a standard deviation, and the size
multiple) -> the KerasHub segmenter -> a ``ClassLogits`` head that holds an
identity matrix (it carries the class names, returns float32 logits at the
input size and is frozen). Every klseg job, size check and ``.keras`` save
then treats it as one of its own models; loading the saved file needs
``keras_hub`` installed (:func:`klseg.runs.inputs.load_model` imports it).

KerasHub is imported only when a spec is used; without it the error says
``pip install "klseg[hub]"``.
"""

import os
import re
from pathlib import Path

from klseg import errors

__all__ = [
    "HUB_PREFIX",
    "check_spec",
    "import_keras_hub",
    "is_hub_spec",
    "load_segmenter",
    "needs_keras_hub",
]

HUB_PREFIX = "keras-hub:"
_INSTALL = 'pip install "klseg[hub]"'
# Used when a backbone does not say its strides (pyramid_outputs).
_DEFAULT_MULTIPLE = 32
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def is_hub_spec(value):
    """True for a string ``"keras-hub:PRESET_OR_DIR"``."""
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def _target(spec):
    target = spec[len(HUB_PREFIX) :].strip()
    if not target:
        raise errors.ModelError(
            f"{spec!r} names no preset: write keras-hub:PRESET_NAME or "
            "keras-hub:DIR (a folder saved with segmenter.save_to_preset(DIR))."
        )
    return target


def _local_folder(target):
    """The folder a target names, or None for a preset name or handle."""
    if "://" in target:
        return None
    path = Path(target).expanduser()
    if path.exists() or os.sep in target or "/" in target or target[0] in ".~":
        return path
    return None


def check_spec(spec):
    """The checks of :func:`load_segmenter` that need neither Keras nor
    KerasHub: a local preset folder exists, holds a ``config.json`` and its
    task does not end in a softmax or sigmoid. Returns the spec.

    Raises:
        klseg.errors.ModelError: naming the spec and the folder.
    """
    target = _target(spec)
    folder = _local_folder(target)
    if folder is None:
        return spec
    if not folder.exists():
        raise errors.ModelError(
            f"KerasHub preset folder {folder} does not exist (from {spec}); "
            "save one with segmenter.save_to_preset(DIR), or give a preset name."
        )
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise errors.ModelError(
            f"{folder} is not a KerasHub preset folder (no config.json; from "
            f"{spec}); save one with segmenter.save_to_preset(DIR)."
        )
    activation = _saved_activation(folder / "task.json")
    if activation in _PROBABILITY_ACTIVATIONS:
        raise _probabilities_error(spec, activation)
    return spec


def _saved_activation(path):
    """The ``activation`` a saved task's config names (``task.json``), or
    None."""
    import json

    try:
        config = json.loads(path.read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    activation = config.get("activation") if isinstance(config, dict) else None
    return activation if isinstance(activation, str) else None


def _probabilities_error(spec, activation):
    return errors.ModelError(
        f"the KerasHub segmenter {spec} applies activation={activation!r} to its "
        "output, so it outputs probabilities; klseg expects logits. Rebuild it "
        "with activation=None and save the preset again."
    )


def import_keras_hub(what="a keras-hub: model"):
    """``keras_hub``, or a ModelError that says how to install it."""
    try:
        import keras_hub
    except ImportError as e:
        raise errors.ModelError(
            f"{what} needs KerasHub, which is not installed ({e}): {_INSTALL}"
        ) from None
    return keras_hub


def needs_keras_hub(path):
    """True if a ``.keras`` archive holds KerasHub classes (read from its
    ``config.json`` without Keras)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read("config.json").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False
    return '"keras_hub' in text


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _from_preset(keras_hub, spec, num_classes):
    target = _target(spec)
    folder = _local_folder(target)
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    try:
        return keras_hub.models.ImageSegmenter.from_preset(
            str(folder) if folder is not None else target, **kwargs
        )
    except Exception as e:
        if folder is not None:
            raise errors.ModelError(
                f"cannot load the KerasHub preset folder {folder} (from {spec}): "
                f"{_first_line(e)}"
            ) from None
        raise errors.ModelError(
            f"could not download preset {target} (from {spec}): {_first_line(e)}. "
            "Pass a local preset folder saved with save_to_preset "
            "(keras-hub:DIR) to work offline."
        ) from None


def _normalisation(task):
    """``(mean, std)`` in 0..255 units equal to the preset's image converter
    (``x * scale + offset`` is ``(x - mean) / std``); identity without one."""
    import numpy as np

    converter = getattr(getattr(task, "preprocessor", None), "image_converter", None)
    scale = getattr(converter, "scale", None)
    offset = getattr(converter, "offset", None)
    scale = np.broadcast_to(np.asarray(1.0 if scale is None else scale, "f8"), (3,))
    offset = np.broadcast_to(np.asarray(0.0 if offset is None else offset, "f8"), (3,))
    if np.any(scale <= 0):
        raise errors.ModelError(
            f"the image converter's scale must be positive. Received: scale={scale}"
        )
    return [float(v) for v in -offset / scale], [float(v) for v in 1.0 / scale]


def _size_multiple(task):
    """``2**k`` for the deepest pyramid level ``P{k}`` of the backbone (or
    its image encoder); 32 if the backbone does not list its levels."""
    levels = []
    backbone = getattr(task, "backbone", None)
    for part in (backbone, getattr(backbone, "image_encoder", None)):
        for key in getattr(part, "pyramid_outputs", None) or {}:
            match = re.fullmatch(r"P(\d+)", str(key))
            if match:
                levels.append(int(match.group(1)))
    return 2 ** max(levels) if levels else _DEFAULT_MULTIPLE


def load_segmenter(spec, *, num_classes=None, class_names=None):
    """A KerasHub image segmenter as a klseg segmentation model.

    Args:
        spec: ``"keras-hub:PRESET_OR_DIR"``.
        num_classes: the classes to predict. ``None`` keeps the preset's;
            another count re-creates the segmenter's head (KerasHub's
            ``from_preset(num_classes=...)``: the backbone keeps the preset
            weights, the head starts fresh).
        class_names: the classes' names. Defaults to ``None`` (``class_0``,
            ``class_1``, ...).

    Returns:
        A Functional ``keras.Model``: images (B, H, W, 3) in 0..255 to
        float32 logits (B, H, W, num_classes); ``klseg.models.size_multiple``,
        ``get_class_names`` and ``set_training_size`` work on it.

    Raises:
        klseg.errors.ModelError: KerasHub is not installed, the preset folder
            is missing, the preset cannot be downloaded or is not an image
            segmenter, or the segmenter outputs probabilities (the message
            names the spec).
    """
    if not is_hub_spec(spec):
        raise errors.InvalidArgumentError(
            f"`spec` must be a string keras-hub:PRESET_OR_DIR. Received: spec={spec!r}"
        )
    check_spec(spec)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes is None:
            num_classes = len(class_names)
    keras_hub = import_keras_hub(spec)
    import keras
    import numpy as np

    from klseg import models

    task = _from_preset(keras_hub, spec, num_classes)
    if getattr(task, "activation", None) not in (None, "linear"):
        activation = keras.activations.get(task.activation)
        name = getattr(activation, "__name__", str(task.activation))
        if name != "linear":
            raise _probabilities_error(spec, name)
    try:
        count = models.check_segmentation_model(task, role=f"KerasHub segmenter {spec}")
    except errors.KlsegError as e:
        raise errors.ModelError(str(e)) from None
    if class_names is not None and len(class_names) != count:
        raise errors.InvalidArgumentError(
            f"`class_names` has {len(class_names)} names but the segmenter {spec} "
            f"predicts {count} classes. Received: class_names={class_names}"
        )
    mean, std = _normalisation(task)
    images = keras.Input((None, None, 3), name="images")
    x = models.ImagePreprocessing(
        mean=mean, std=std, size_multiple=_size_multiple(task), name="preprocessing"
    )(images)
    # The segmenter's network alone: the preset's preprocessor and compile
    # settings stay out of the klseg model and its .keras file.
    logits = keras.Model(task.input, task.output, name=task.name)(x)
    head = models.ClassLogits(
        num_classes=count, class_names=class_names, name="class_logits"
    )
    outputs = head([logits, images])
    head.set_weights([np.eye(count, dtype="float32"), np.zeros(count, "float32")])
    head.trainable = False
    return keras.Model(images, outputs, name=_model_name(task))


def _model_name(task):
    name = re.sub(r"[^0-9A-Za-z_]+", "_", str(getattr(task, "name", "segmenter")))
    return f"keras_hub_{name}".strip("_")
