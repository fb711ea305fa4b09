"""Folder datasets: ``images/`` (+ ``masks/``) with matching file stems.

Layout::

    DIR/images/0001.jpg   DIR/masks/0001.png
    DIR/images/0002.png   DIR/masks/0002.png
    ...

Images are any of ``klseg.data.images.IMAGE_SUFFIXES`` (grey, RGB or RGBA;
converted to RGB). Masks are single-channel PNGs holding class indices; a
palette-mode PNG is read as its indices, not its colours. A folder with only
``images/`` (or a folder of image files) is an unlabelled set. Everything is
checked when the split is loaded, before any training, and each problem is
reported as a ``DataError`` that names the file.

This module uses numpy and Pillow only (no TensorFlow).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from klseg import progress
from klseg.data.classes import (
    class_map_lut,
    find_classes_json,
    format_offenders,
    load_class_map,
    mask_values,
)
from klseg.data.images import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    check_unique_stems,
    image_size,
    list_images,
    list_masks,
    read_image,
    read_mask,
)
from klseg.data.sources import Source
from klseg.data.split import Split
from klseg.errors import DataError

# read_image and read_mask live in klseg.data.images (the one image reader);
# they and the suffix lists stay importable from here under their old names.
__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "FolderSource",
    "load_folder",
    "read_image",
    "read_mask",
]

IMAGE_EXTENSIONS = IMAGE_SUFFIXES
MASK_EXTENSIONS = MASK_SUFFIXES
_LIST_AT_MOST = 5
_NAMED_AT_MOST = 3


class FolderSource(Source):
    """Image files, with a mask file per image or without.

    Args:
        root: The split's folder (its name in messages).
        image_paths: Image files, in the split's order.
        mask_paths: Mask files aligned with ``image_paths``, or ``None``.
        mask_values: The distinct raw values of each mask, when already
            known (``load_folder`` finds them while checking), so that
            ``mask_values()`` reads no file. Defaults to ``None``.
        image_sizes: ``(height, width)`` of each image when already known
            (``load_folder`` reads them while checking). Defaults to
            ``None`` (read from the file headers when asked).
    """

    kind = "folder"

    def __init__(
        self, root, image_paths, mask_paths=None, mask_values=None, image_sizes=None
    ):
        super().__init__(root)
        self._image_paths = list(image_paths)
        self._mask_paths = None if mask_paths is None else list(mask_paths)
        self._values = None if mask_values is None else list(mask_values)
        self._sizes = None if image_sizes is None else list(image_sizes)

    @property
    def num_images(self):
        return len(self._image_paths)

    @property
    def has_masks(self):
        return self._mask_paths is not None

    @property
    def images(self):
        return self._image_paths

    @property
    def masks(self):
        return self._mask_paths

    def read(self, index):
        image = read_image(self._image_paths[index])
        if self._mask_paths is None:
            return image, None
        return image, read_mask(self._mask_paths[index])

    def describe(self, index):
        paths = self._image_paths if self._mask_paths is None else self._mask_paths
        return str(paths[index])

    def image_sizes(self):
        if self._sizes is None:
            self._sizes = [
                image_size(path, full=False)[::-1] for path in self._image_paths
            ]
        return list(self._sizes)

    def mask_values(self):
        if self._mask_paths is None:
            return
        if self._values is None:
            self._values = [mask_values(read_mask(p)) for p in self._mask_paths]
        yield from enumerate(self._values)


def _few(items):
    items = [str(item) for item in items]
    shown = ", ".join(items[:_LIST_AT_MOST])
    more = len(items) - _LIST_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


def _by_stem(paths):
    return {path.stem: path for path in paths}


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
    _check_root(root)
    image_paths = list_images(root, unique_stems=True)
    mask_paths = _pair_masks(root, image_paths, require_masks)
    mapping, names, num_classes = _class_names(root, class_map, num_classes)
    sizes, values = _check_files(root, image_paths, mask_paths, check, num_workers)
    if mapping is not None and mask_paths is not None:
        _check_map_covers(mask_paths, values, mapping, class_map, ignore_value)
    split = Split(
        FolderSource(
            root,
            image_paths,
            mask_paths,
            None if mask_paths is None else values,
            image_sizes=sizes,
        ),
        num_classes=num_classes,
        class_names=names,
        ignore_value=ignore_value,
        class_map=mapping,
    )
    split.check_labels(num_classes, what=None)
    split.num_classes_seen = split.count_classes_seen()
    return split


def _check_root(root):
    """The folder exists and holds ``images/`` (or image files directly)."""
    if not root.exists():
        raise DataError(f"{root}: folder does not exist.")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected images/ and masks/ inside).")
    has_image_dir = (root / "images").is_dir()
    if not has_image_dir and ((root / "masks").is_dir() or not _holds_images(root)):
        raise DataError(
            f"{root}: no images/ folder. Expected {root}/images/ with image files "
            f"({', '.join(IMAGE_SUFFIXES)}) and, for a labelled set, "
            f"{root}/masks/ with PNG masks."
        )


def _pair_masks(root, image_paths, require_masks):
    """The mask of each image (same stem in ``masks/``), or ``None`` for an
    unlabelled set."""
    mask_dir = root / "masks"
    labelled = mask_dir.is_dir()
    if require_masks and not labelled:
        raise DataError(
            f"{root}: no masks/ folder, so this is an unlabelled set, but labels "
            "are required here. Add masks/ with one PNG per image (same file "
            "stem), or use the folder where unlabelled images are accepted."
        )
    if not labelled:
        return None
    mask_files = check_unique_stems(list_masks(mask_dir), what="masks")
    missing = [path.name for path in image_paths if path.stem not in mask_files]
    if missing:
        orphans = sorted(set(mask_files) - set(_by_stem(image_paths)))
        hint = f" Masks without an image: {_few(orphans)}." if orphans else ""
        raise DataError(
            f"{root}: {len(missing)} of {len(image_paths)} images have no mask "
            f"in {mask_dir}: {_few(missing)}. Each image needs "
            f"masks/<stem>.png (e.g. images/{missing[0]} -> "
            f"masks/{Path(missing[0]).stem}.png)." + hint
        )
    return [mask_files[path.stem] for path in image_paths]


def _class_names(root, class_map, num_classes):
    """``(mapping, names, num_classes)`` from the class map, else from a
    ``classes.json`` in or above ``root``."""
    mapping, names = (None, None)
    if class_map is not None:
        mapping, names = load_class_map(class_map)
    if names is None and class_map is None:
        info = find_classes_json(root)
        if info is not None:
            names = info["class_names"]
    if num_classes is None and names is not None:
        num_classes = len(names)
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise DataError(
            f"{root}: {len(names)} class names but num_classes={num_classes}."
        )
    return mapping, names, num_classes


def _check_files(root, image_paths, mask_paths, check, num_workers):
    """Read every image (header or whole) and mask on worker threads.

    Returns:
        ``(sizes, values)``: each image's ``(height, width)``, and each
        mask's distinct raw values (``None`` entries without masks).
    """

    def check_one(index):
        image_path = image_paths[index]
        width, height = image_size(image_path, full=check == "full")
        sizes[index] = (height, width)
        if mask_paths is None:
            return None
        mask = read_mask(mask_paths[index])
        if mask.shape != (height, width):
            raise DataError(
                f"{mask_paths[index]}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                f"its image {image_path} is {width}x{height} (width x height); they "
                "must be the same size."
            )
        return mask_values(mask)

    sizes = [None] * len(image_paths)
    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        values = list(
            progress.iterate(
                pool.map(check_one, range(len(image_paths))),
                total=len(image_paths),
                label=f"Checking {root}",
                unit="image",
            )
        )
    return sizes, values


def _holds_images(folder):
    return any(
        path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
        for path in folder.iterdir()
    )


def _check_map_covers(mask_paths, values, mapping, class_map, ignore_value):
    """Every raw mask value must be in the class map (or be the ignore value)."""
    lut = class_map_lut(mapping)
    offenders, total = [], 0
    for path, raw in zip(mask_paths, values):
        if ignore_value not in mapping:
            raw = raw[raw != ignore_value]
        unmapped = [int(v) for v in raw if v < 0 or v >= lut.size or lut[int(v)] < 0]
        if unmapped:
            total += 1
            if len(offenders) < _NAMED_AT_MOST:
                offenders.append((path, unmapped))
    if not total:
        return
    where = f" {class_map}" if isinstance(class_map, (str, Path)) else ""
    first_path, first_values = offenders[0]
    also = ""
    if total > 1:
        also = f" Also {format_offenders(offenders[1:], total - 1)}."
    raise DataError(
        f"{first_path}: mask values {first_values[:10]} are not in the class "
        f"map{where} (it maps {sorted(mapping)[:20]}).{also} Add them to the map, "
        f"or map them to the ignore value {ignore_value}."
    )
