"""Folder datasets: ``images/`` (+ ``masks/``) with matching file stems.

Layout::

    DIR/images/0001.jpg   DIR/masks/0001.png
    DIR/images/0002.png   DIR/masks/0002.png
    ...

Images are PNG or JPEG (grey, RGB or RGBA; converted to RGB). Masks are
single-channel PNGs holding class indices; a palette-mode PNG is read as its
indices, not its colours. A folder with only ``images/`` (or a folder of image
files) is an unlabelled set. Everything is checked when the split is loaded,
before any training, and each problem is reported as a ``DataError`` that
names the file.

This module uses numpy and Pillow only (no TensorFlow).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from klseg.data.images import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    image_size,
    read_image,
    read_mask,
)
from klseg.data.split import Split, class_map_lut, load_class_map
from klseg.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "load_folder",
    "read_image",
    "read_mask",
]

# The suffixes of klseg.data.images, under this module's older names.
IMAGE_EXTENSIONS = IMAGE_SUFFIXES
MASK_EXTENSIONS = MASK_SUFFIXES
_LIST_AT_MOST = 5


def _image_size(path, full):
    return image_size(path, full=full)


def _list_files(folder, extensions, what):
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in extensions:
            continue
        if path.stem in files:
            raise DataError(
                f"{folder}: two {what} share the stem {path.stem!r} "
                f"({files[path.stem].name}, {path.name}); rename one."
            )
        files[path.stem] = path
    return files


def _few(items):
    items = [str(item) for item in items]
    shown = ", ".join(items[:_LIST_AT_MOST])
    more = len(items) - _LIST_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


def _find_classes_json(root):
    """Looks for ``classes.json`` (written by ``write_benchmark``) nearby."""
    for folder in (root, root.parent, root.parent.parent):
        path = folder / "classes.json"
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(info, dict) and isinstance(info.get("class_names"), list):
                return info
            return None
    return None


def load_folder(
    root,
    *,
    ignore_value=255,
    class_map=None,
    num_classes=None,
    require_masks=True,
    check="full",
    num_workers=None,
):
    """Loads and checks a folder split.

    Args:
        root: The folder. It holds ``images/`` and, when labelled, ``masks/``;
            a folder that holds image files directly is an unlabelled set.
        ignore_value: Mask value meaning "no label". Defaults to ``255``.
        class_map: ``None``, a dict ``{raw: class}`` or a JSON file path (see
            ``load_class_map``). Every raw value in the masks must be covered.
        num_classes: When given, every (mapped) mask value must be a class
            index below it or the ignore value. Defaults to ``None`` (taken
            from the class map's or ``classes.json``'s class names if any).
        require_masks: Whether a missing ``masks/`` folder is an error.
            Defaults to ``True``. With ``False`` an existing ``masks/`` folder
            is still used (and must be complete).
        check: ``"full"`` decodes every image once to find corrupt files;
            ``"header"`` reads only headers (fast for large sets; PNG files are
            still checksummed). Masks are always decoded. Defaults to
            ``"full"``.
        num_workers: Threads for the checks. Defaults to the CPU count (at
            most 8).

    Returns:
        A ``Split`` of kind ``"folder"``.

    Raises:
        DataError: missing or empty folder, unreadable image or mask, images
            without masks, image/mask size mismatch, unknown mask values, or a
            class map that does not cover the mask values.
    """
    if check not in ("full", "header"):
        raise ValueError(
            f"`check` must be 'full' or 'header'. Received: check={check!r}"
        )
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: folder does not exist.")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected images/ and masks/ inside).")
    image_dir = root / "images"
    mask_dir = root / "masks"
    if not image_dir.is_dir():
        direct = _list_files(root, IMAGE_EXTENSIONS, "images")
        if direct and not mask_dir.is_dir():
            image_dir = root
        else:
            raise DataError(
                f"{root}: no images/ folder. Expected {root}/images/ with PNG or "
                f"JPEG files (and {root}/masks/ with PNG masks for a labelled set)."
            )
    images = _list_files(image_dir, IMAGE_EXTENSIONS, "images")
    if not images:
        raise DataError(
            f"{image_dir}: no images found (expected files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)})."
        )
    stems = list(images)
    labelled = mask_dir.is_dir()
    if require_masks and not labelled:
        raise DataError(
            f"{root}: no masks/ folder, so this is an unlabelled set, but labels "
            "are required here. Add masks/ with one PNG per image (same file "
            "stem), or use the folder where unlabelled images are accepted."
        )
    masks = None
    if labelled:
        mask_files = _list_files(mask_dir, MASK_EXTENSIONS, "masks")
        missing = [images[stem].name for stem in stems if stem not in mask_files]
        if missing:
            orphans = sorted(set(mask_files) - set(images))
            hint = f" Masks without an image: {_few(orphans)}." if orphans else ""
            raise DataError(
                f"{root}: {len(missing)} of {len(stems)} images have no mask in "
                f"{mask_dir}: {_few(missing)}. Each image needs masks/<stem>.png "
                f"(e.g. images/{missing[0]} -> masks/{Path(missing[0]).stem}.png)."
                + hint
            )
        masks = [mask_files[stem] for stem in stems]
    image_paths = [images[stem] for stem in stems]

    mapping, names = (None, None)
    if class_map is not None:
        mapping, names = load_class_map(class_map)
    if names is None:
        info = _find_classes_json(root)
        if info is not None and class_map is None:
            names = info["class_names"]
    if num_classes is None and names is not None:
        num_classes = len(names)
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise DataError(
            f"{root}: {len(names)} class names but num_classes={num_classes}."
        )
    lut = None if mapping is None else class_map_lut(mapping)

    def check_one(index):
        image_path = image_paths[index]
        width, height = _image_size(image_path, check == "full")
        if masks is None:
            return None
        mask = read_mask(masks[index])
        if mask.shape != (height, width):
            raise DataError(
                f"{masks[index]}: mask is {mask.shape[1]}x{mask.shape[0]} but its "
                f"image {image_path} is {width}x{height} (width x height); they "
                "must be the same size."
            )
        if mask.dtype == np.uint8:
            counts = np.bincount(mask.ravel(), minlength=256)
            return np.flatnonzero(counts)
        return np.unique(mask)

    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check_one, range(len(image_paths))))

    seen = 0
    if masks is not None:
        where = f" {class_map}" if isinstance(class_map, (str, Path)) else ""
        all_classes = set()
        for path, values in zip(masks, results):
            classes = values.astype(np.int64)
            if lut is not None:
                raw = (
                    values
                    if ignore_value in mapping
                    else values[values != ignore_value]
                )
                unmapped = [int(v) for v in raw if v >= lut.size or lut[int(v)] < 0]
                if unmapped:
                    raise DataError(
                        f"{path}: mask values {unmapped[:10]} are not in the class "
                        f"map{where} (it maps {sorted(mapping)[:20]}). Add them to "
                        f"the map, or map them to the ignore value {ignore_value}."
                    )
                classes = np.array(
                    [lut[int(v)] if v < lut.size else ignore_value for v in values],
                    dtype=np.int64,
                )
                if ignore_value not in mapping:
                    classes[values == ignore_value] = ignore_value
            classes = classes[classes != ignore_value]
            if num_classes is not None:
                bad = classes[(classes < 0) | (classes >= num_classes)]
                if bad.size:
                    raise DataError(
                        f"{path}: mask values {bad[:10].tolist()} are neither a "
                        f"class index below num_classes={num_classes} nor the "
                        f"ignore value {ignore_value}."
                    )
            all_classes.update(int(c) for c in classes)
        seen = max(all_classes) + 1 if all_classes else 0

    return Split(
        name=str(root),
        kind="folder",
        images=image_paths,
        masks=masks,
        num_classes_seen=seen,
        num_classes=num_classes,
        class_names=names,
        ignore_value=ignore_value,
        class_map=mapping,
    )
