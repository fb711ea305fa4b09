"""The one model loader and the data loading of the jobs, checked up front.

Every job reads its models through :func:`load_model` and
:func:`model_info`, builds a new one through :func:`build_model`, and reads
its data through :func:`load_split`, so every command gives the same errors
for the same mistakes: a missing or corrupt ``.keras`` file, a model that is
not a klseg segmentation model (or outputs probabilities), mask values
beyond the model's classes (naming the first files that hold them), an
image size the model cannot take. What a ``.keras`` file records (its class
count, its training size) is read from the archive's ``config.json``
without Keras (:func:`archive_num_classes`, :func:`run_image_size`).
"""

import contextlib
import json
import zipfile
from pathlib import Path

import klseg
from klseg import errors
from klseg.files import read_yaml
from klseg.inference import check_size_multiple
from klseg.runs import hub
from klseg.runs.checks import check_crop_fits, size_pair, size_text

__all__ = [
    "archive_num_classes",
    "build_model",
    "cache_in_memory",
    "check_crop_size",
    "check_image_size",
    "check_labels",
    "data_image_size",
    "check_model_file",
    "default_image_size",
    "load_model",
    "load_split",
    "model_info",
    "model_kwargs",
    "num_images",
    "run_image_size",
]


def load_model(path_or_model):
    """Load a ``.keras`` model (uncompiled) or a ``keras-hub:PRESET_OR_DIR``
    segmenter (:func:`klseg.runs.hub.load_segmenter`); a ``keras.Model``
    passes through.

    Raises:
        klseg.errors.ModelError: the file is missing, not a ``.keras`` file,
            or not a loadable Keras model; it holds Python code (a Lambda
            layer), which klseg does not load; the preset cannot be loaded;
            the model needs KerasHub and it is not installed.
    """
    import keras

    if isinstance(path_or_model, keras.Model):
        return path_or_model
    if hub.is_hub_spec(path_or_model):
        return hub.load_segmenter(path_or_model)
    path = check_model_file(path_or_model)
    if hub.needs_keras_hub(path):
        hub.import_keras_hub(f"model {path}")
    try:
        return klseg.load_model(path, compile=False)
    except errors.KlsegError:
        raise
    except Exception as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise errors.ModelError(
            f"cannot load model: not a valid .keras file: {path} ({first})"
        ) from None


def build_model(cfg, num_classes, class_names):
    """A new model ``cfg.model`` for ``num_classes`` classes: a registry
    model (:func:`model_kwargs`), or a ``keras-hub:`` segmenter."""
    from klseg import models

    if hub.is_hub_spec(cfg.model):
        return hub.load_segmenter(
            cfg.model, num_classes=num_classes, class_names=class_names
        )
    return models.build(cfg.model, **model_kwargs(cfg, num_classes, class_names))


def model_kwargs(cfg, num_classes, class_names):
    """The ``klseg.models.build`` arguments a config's options give."""
    kwargs = {"num_classes": num_classes, "input_shape": (None, None, 3)}
    if class_names:
        kwargs["class_names"] = list(class_names)
    if cfg.backbone:
        kwargs["backbone"] = cfg.backbone
    if cfg.model == "unet":
        if cfg.base_filters:
            kwargs["base_filters"] = cfg.base_filters
        if cfg.depth:
            kwargs["depth"] = cfg.depth
    return kwargs


def check_model_file(path):
    """The checks of :func:`load_model` that need no Keras: the file exists,
    is a ``.keras`` file and a zip archive. Returns the ``Path`` (a
    ``keras-hub:`` spec is returned as given, once its folder is checked)."""
    if hub.is_hub_spec(path):
        return hub.check_spec(path)
    path = Path(path)
    if not path.exists():
        raise errors.ModelError(f"model file {path} does not exist.")
    if path.is_dir() or path.suffix != ".keras":
        raise errors.ModelError(
            f"model {path} is not a .keras file (klseg reads models saved with "
            "model.save('NAME.keras'); a SavedModel folder is for serving only)."
        )
    if not zipfile.is_zipfile(path):
        raise errors.ModelError(
            f"cannot load model: not a valid .keras file: {path} (it is not a "
            "zip archive; the file may be truncated or corrupt)."
        )
    return path


def model_info(model, path):
    """``(num_classes, size_multiple)`` of a klseg segmentation model (also
    one loaded from a ``keras-hub:`` spec; ``path`` names it in errors).

    Raises:
        klseg.errors.ModelError: not a klseg model, or it outputs
            probabilities (the message names the model file and the layer).
    """
    from klseg import models

    name = (
        str(path) if isinstance(path, (str, Path)) else getattr(model, "name", "model")
    )
    try:
        count = models.check_segmentation_model(model, role="model")
    except errors.KlsegError as e:
        raise errors.ModelError(
            f"model {name} is not a klseg segmentation model: {e}"
        ) from None
    try:
        return count, models.size_multiple(model)
    except errors.ModelError:
        raise errors.ModelError(
            f"model {name} is not a klseg segmentation model (no ClassLogits / "
            "ImagePreprocessing layer); build it with klseg.models."
        ) from None


def load_split(spec, cfg, *, require_masks=True, remap=True):
    """``klseg.data.load_split`` with the job's ignore value and class map."""
    from klseg import data

    return data.load_split(
        spec,
        ignore_value=cfg.ignore_value,
        class_map=getattr(cfg, "class_map", None) if remap else None,
        require_masks=require_masks,
    )


def check_labels(split, num_classes, option, hint):
    """Refuse masks with class values ``>= num_classes``, naming the first
    files that hold them, the option and what to do (``hint``)."""
    seen = getattr(split, "num_classes_seen", None) if split is not None else None
    if not seen or int(seen) <= num_classes:
        return
    try:
        split.check_labels(num_classes, what=option)
    except errors.DataError as e:
        raise errors.DataError(f"{e} {hint}".strip()) from None


def num_images(split):
    return getattr(split, "num_images", None)


# Decode and resize small sets once and keep them in memory (augmentation
# still runs every epoch); larger sets stream from disk.
_CACHE_BYTES = 256 * 2**20


def cache_in_memory(split, image_size):
    count = num_images(split)
    height, width = size_pair(image_size)
    return count is not None and count * height * width * 4 <= _CACHE_BYTES


def check_image_size(image_size, multiple, what="--image-size"):
    """Refuse a size (``N`` or ``(H, W)``) with a side that is no multiple
    of the model's size multiple, naming the option, the value and the
    nearest valid sides."""
    check_size_multiple(
        size_pair(image_size), multiple, name=what, shown=size_text(image_size)
    )


def check_crop_size(crop_size, image_size, multiple):
    """The crop fits in the image size and fits the model (per side)."""
    if crop_size is None:
        return
    check_crop_fits(crop_size, image_size)
    check_image_size(crop_size, multiple, what="--crop-size")


def data_image_size(split, option="--image-size"):
    """The one size of a split's images: ``N`` for a square, else ``(H, W)``.

    Raises:
        klseg.errors.DataError: the images differ in size, or their sizes
            are not known without reading them all (TFDS); the message asks
            for ``option``.
    """
    size = split.image_size()
    if size is None:
        raise errors.DataError(
            f"cannot tell the image size of {split.name} without reading every "
            f"image; give one with {option} HxW."
        )
    return size[0] if size[0] == size[1] else tuple(size)


def default_image_size(cfg, split, model=None):
    """``cfg.image_size``, else the training size of ``model`` (a model or
    its path: :func:`run_image_size`), else the size of the images of
    ``split`` (one for all); a ``cfg.crop_size`` must fit in it."""
    size = cfg.image_size
    if size is None and model is not None:
        loaded = None if isinstance(model, (str, Path)) else model
        size = run_image_size(model, loaded)
    if size is None:
        size = data_image_size(split)
    if cfg.crop_size is not None:
        check_crop_fits(cfg.crop_size, size)
    return size


def run_image_size(model_path, model=None):
    """The size a model was trained at: recorded in the model, else the
    ``image_size`` saved in its run's ``config.yaml``; ``None`` if unknown.
    ``N`` for a square, else ``(H, W)``."""
    if model is not None:
        from klseg import models

        with contextlib.suppress(errors.KlsegError):
            size = models.get_training_size(model)
            if size is not None:
                return size[0] if size[0] == size[1] else size
    if not isinstance(model_path, (str, Path)) or hub.is_hub_spec(model_path):
        return None
    if model is None:
        size = _archive_training_size(model_path)
        if size is not None:
            return size[0] if size[0] == size[1] else size
    config = Path(model_path).parent / "config.yaml"
    if config.is_file():
        with contextlib.suppress(Exception):
            size = read_yaml(config).get("image_size")
            if size is not None:
                pair = size_pair(size)
                if all(isinstance(v, int) and v > 0 for v in pair):
                    return pair[0] if pair[0] == pair[1] else tuple(pair)
    return None


def _archive_layer_configs(path, class_name):
    """The ``config`` of every ``class_name`` layer in a ``.keras`` file,
    read from the archive's ``config.json`` without Keras (none where the
    file cannot be read)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == class_name:
                found.append(node.get("config") or {})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    with contextlib.suppress(Exception):
        with zipfile.ZipFile(path) as archive:
            walk(json.loads(archive.read("config.json")))
    return [config for config in found if isinstance(config, dict)]


def archive_num_classes(path):
    """The class count of a ``.keras`` file's ``ClassLogits`` head (its last
    one), read without Keras; None where not found."""
    counts = []
    for config in _archive_layer_configs(path, "ClassLogits"):
        names = config.get("class_names")
        counts.append(config.get("num_classes") or (names and len(names)))
    counts = [c for c in counts if isinstance(c, int) and c > 0]
    return counts[-1] if counts else None


def _archive_training_size(path):
    """The training size recorded in a ``.keras`` file's ImagePreprocessing
    layer (read from the archive's ``config.json``, without Keras)."""
    for config in _archive_layer_configs(path, "ImagePreprocessing"):
        size = config.get("training_size")
        if (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)
        ):
            return (size[0], size[1])
    return None
