"""The one model loader and the data loading of the jobs, checked up front.

Every job reads its models through :func:`load_model` and
:func:`model_info` and its data through :func:`load_split`, so every
command gives the same errors for the same mistakes: a missing or corrupt
``.keras`` file, a model that is not a klseg segmentation model (or outputs
probabilities), mask values beyond the model's classes (naming the first
files that hold them), an image size the model cannot take.
"""

import contextlib
import json
import zipfile
from pathlib import Path

import klseg
from klseg import errors
from klseg.files import read_yaml
from klseg.runs import hub
from klseg.runs.checks import check_crop_fits, fail, size_pair, size_text

__all__ = [
    "cache_in_memory",
    "check_crop_size",
    "check_image_size",
    "check_labels",
    "data_image_size",
    "check_model_file",
    "load_model",
    "load_split",
    "model_info",
    "num_images",
    "run_image_size",
]


def load_model(path_or_model):
    """Load a ``.keras`` model (uncompiled) or a ``keras-hub:PRESET_OR_DIR``
    segmenter (:func:`klseg.runs.hub.load_segmenter`); a ``keras.Model``
    passes through.

    Raises:
        klseg.errors.ModelError: the file is missing, not a ``.keras`` file,
            or not a loadable Keras model; the preset cannot be loaded; the
            model needs KerasHub and it is not installed.
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
    except Exception as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise errors.ModelError(
            f"cannot load model: not a valid .keras file: {path} ({first})"
        ) from None


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
    bad = [side for side in size_pair(image_size) if side % multiple]
    if bad:
        side = bad[0]
        lower = max(multiple, side // multiple * multiple)
        upper = lower + multiple if lower < side else lower
        fail(
            f"{what} must be a multiple of the model's size multiple {multiple} "
            f"in height and width; the nearest valid sizes for {side} are "
            f"{lower} and {upper}. Received: {what}={size_text(image_size)}"
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


def _archive_training_size(path):
    """The training size recorded in a ``.keras`` file's ImagePreprocessing
    layer (read from the archive's ``config.json``, without Keras)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "ImagePreprocessing":
                found.append((node.get("config") or {}).get("training_size"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    with contextlib.suppress(Exception):
        with zipfile.ZipFile(path) as archive:
            walk(json.loads(archive.read("config.json")))
    for size in found:
        if (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)
        ):
            return (size[0], size[1])
    return None
