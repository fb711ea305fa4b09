"""The field's data sets, read in the folder layouts they are distributed in.

``load_layout(spec)`` reads a spec of ``klseg.data.layout_specs`` and returns
a checked ``Split`` whose class map, class names and ignore value come from
the data set's label table (``klseg.data.label_tables``), so a run needs no
``--num-classes``. Layouts (``PATH`` is the data set's top folder):

=================================  ==========================================
spec                               images + labels
=================================  ==========================================
``cityscapes:PATH[:SPLIT]``        ``leftImg8bit/SPLIT/CITY/X_leftImg8bit.png``
                                   + ``gtFine/SPLIT/CITY/X_gtFine_labelIds.png``
``gta5:PATH``                      ``images/X.png`` + ``labels/X.png``
``synthia:PATH[:16|13]``           ``RGB/X.png`` + ``GT/LABELS/X.png``
``acdc:PATH[:CONDITION[:SPLIT]]``  ``rgb_anon/CONDITION/SPLIT/SEQ/X_rgb_anon.png``
                                   + ``gt/CONDITION/SPLIT/SEQ/X_gt_labelIds.png``
``darkzurich:PATH[:SPLIT]``        ``rgb_anon/SPLIT/night/SEQ/X_rgb_anon.png``
                                   + ``gt/SPLIT/night/SEQ/X_gt_labelIds.png``
``voc:PATH[:SPLIT]``               ``ImageSets/Segmentation/SPLIT.txt`` lists X:
                                   ``JPEGImages/X.jpg``
                                   + ``SegmentationClass/X.png``
``ade20k:PATH[:SPLIT]``            ``images/SPLIT/X.jpg``
                                   + ``annotations/SPLIT/X.png``
=================================  ==========================================

Cityscapes, GTA5, ACDC and Dark Zurich labels hold Cityscapes label ids;
SYNTHIA labels are 16-bit PNGs whose first channel holds the class id; VOC
labels are palette PNGs whose palette index is the class; ADE20K labels hold
0..150. Everything is checked when the split is loaded, as for a folder: a
missing folder, an image without its label (or a label without its image),
an image and label of different sizes, or a label value that is not in the
data set's table gives a ``DataError`` naming the file.

This module uses numpy, Pillow and (for SYNTHIA labels) OpenCV; no
TensorFlow.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from klseg import progress
from klseg.data import label_tables
from klseg.data.classes import class_map_lut, load_class_map, mask_values
from klseg.data.folder import FolderSource
from klseg.data.images import image_size, read_image, read_mask
from klseg.data.layout_specs import (
    is_layout_spec,
    parse_layout_spec,
    syntax,
)
from klseg.data.split import Split
from klseg.errors import DataError

__all__ = [
    "LayoutSource",
    "is_layout_spec",
    "layout_image_paths",
    "load_layout",
    "read_synthia_label",
]

_LIST_AT_MOST = 5
_ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


class _Part(NamedTuple):
    """One folder pair: images under ``images`` matching ``depth`` folder
    levels and ``image_suffix``, labels likewise under ``labels``; an image
    and a label pair up when their paths relative to their folders agree
    once the suffixes are removed."""

    images: Path
    labels: Path
    image_suffix: str
    label_suffix: str
    depth: int


class LayoutSource(FolderSource):
    """Image files and label files of a data set layout, paired explicitly.

    A ``FolderSource`` whose labels are read with ``read_label`` (SYNTHIA's
    16-bit labels need their own reader).

    Args:
        name: The spec (the split's name in messages).
        image_paths: Image files, in the split's order.
        label_paths: Label files aligned with ``image_paths``, or ``None``.
        read_label: ``path -> raw (H, W) array``. Defaults to
            ``klseg.data.images.read_mask``.
        mask_values: The distinct raw values of each label when known.
        image_sizes: ``(height, width)`` of each image when known.
    """

    def __init__(
        self,
        name,
        image_paths,
        label_paths=None,
        *,
        read_label=read_mask,
        mask_values=None,
        image_sizes=None,
    ):
        super().__init__(
            name, image_paths, label_paths, mask_values, image_sizes=image_sizes
        )
        self._read_label = read_label

    def read(self, index):
        image = read_image(self.images[index])
        if self.masks is None:
            return image, None
        return image, self._read_label(self.masks[index])

    def mask_values(self):
        if self.masks is None:
            return
        if self._values is None:
            self._values = [mask_values(self._read_label(p)) for p in self.masks]
        yield from enumerate(self._values)


def read_synthia_label(path):
    """A SYNTHIA label (16-bit PNG, class id in the first channel) as ``(H, W)``.

    Pillow cannot read 16-bit colour PNGs, so OpenCV reads it; OpenCV orders
    the channels blue, green, red, so the file's first channel is its last.

    Raises:
        DataError: the file is missing or cannot be decoded (naming it).
    """
    import cv2

    if not Path(path).is_file():
        raise DataError(f"{path}: label file not found.")
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DataError(f"{path}: cannot decode label (expected a PNG).")
    if array.ndim == 3:
        array = array[..., 2] if array.shape[-1] >= 3 else array[..., 0]
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------
# Where each layout keeps its files
# --------------------------------------------------------------------------


def _cityscapes(root, options):
    split = options["split"]
    return [
        _Part(
            root / "leftImg8bit" / split,
            root / "gtFine" / split,
            "_leftImg8bit.png",
            "_gtFine_labelIds.png",
            1,
        )
    ]


def _gta5(root, options):
    del options
    return [_Part(root / "images", root / "labels", ".png", ".png", 0)]


def _synthia(root, options):
    del options
    return [_Part(root / "RGB", root / "GT" / "LABELS", ".png", ".png", 0)]


def _acdc(root, options):
    condition, split = options["condition"], options["split"]
    conditions = _ACDC_CONDITIONS if condition == "all" else (condition,)
    return [
        _Part(
            root / "rgb_anon" / name / split,
            root / "gt" / name / split,
            "_rgb_anon.png",
            "_gt_labelIds.png",
            1,
        )
        for name in conditions
    ]


def _darkzurich(root, options):
    split = options["split"]
    return [
        _Part(
            root / "rgb_anon" / split / "night",
            root / "gt" / split / "night",
            "_rgb_anon.png",
            "_gt_labelIds.png",
            1,
        )
    ]


def _ade20k(root, options):
    split = options["split"]
    return [
        _Part(root / "images" / split, root / "annotations" / split, ".jpg", ".png", 0)
    ]


_PARTS = {
    "cityscapes": _cityscapes,
    "gta5": _gta5,
    "synthia": _synthia,
    "acdc": _acdc,
    "darkzurich": _darkzurich,
    "ade20k": _ade20k,
}


def _table(parsed):
    if parsed.layout == "synthia":
        return (
            label_tables.SYNTHIA13
            if parsed.options["classes"] == "13"
            else label_tables.SYNTHIA16
        )
    if parsed.layout == "voc":
        return label_tables.VOC
    if parsed.layout == "ade20k":
        return label_tables.ADE20K
    return label_tables.CITYSCAPES


def _runs(values):
    """``"0..20, 255"``: sorted integers as runs, for messages."""
    runs = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


def _few(items):
    items = [str(item) for item in items]
    shown = ", ".join(items[:_LIST_AT_MOST])
    more = len(items) - _LIST_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


def _files(folder, suffix, depth):
    pattern = "*/" * depth + "*" + suffix
    return {
        path.relative_to(folder).as_posix()[: -len(suffix)]: path
        for path in sorted(folder.glob(pattern))
        if path.is_file() and not path.name.startswith(".")
    }


def _pairs_of_part(spec, part, labels_wanted):
    images = _files(part.images, part.image_suffix, part.depth)
    if not images:
        where = "SUBFOLDER/" * part.depth
        raise DataError(
            f"{spec}: no images in {part.images} (expected "
            f"{part.images}/{where}*{part.image_suffix})."
        )
    if labels_wanted is None or not part.labels.is_dir():
        if labels_wanted:
            raise DataError(
                f"{spec}: label folder {part.labels} does not exist, but labels "
                "are required here."
            )
        return [(path, None) for path in images.values()]
    labels = _files(part.labels, part.label_suffix, part.depth)
    missing = [path for key, path in images.items() if key not in labels]
    if missing:
        key = next(k for k, p in images.items() if p == missing[0])
        raise DataError(
            f"{missing[0]}: image without its label "
            f"{part.labels / (key + part.label_suffix)} ({len(missing)} of "
            f"{len(images)} images have none: {_few(missing)})."
        )
    orphans = [path for key, path in labels.items() if key not in images]
    if orphans:
        key = next(k for k, p in labels.items() if p == orphans[0])
        raise DataError(
            f"{orphans[0]}: label without its image "
            f"{part.images / (key + part.image_suffix)} ({len(orphans)} labels "
            f"have none: {_few(orphans)})."
        )
    return [(path, labels[key]) for key, path in images.items()]


def _voc_pairs(spec, root, options, labels_wanted):
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012").is_dir():
        root = root / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    listing = lists / f"{options['split']}.txt"
    for folder in (root / "JPEGImages", lists):
        if not folder.is_dir():
            raise DataError(
                f"{spec}: folder {folder} does not exist; {syntax('voc')} expects "
                "PATH to hold JPEGImages/, SegmentationClass/ and "
                "ImageSets/Segmentation/ (the VOC2012 folder)."
            )
    if not listing.is_file():
        have = sorted(path.stem for path in lists.glob("*.txt"))
        raise DataError(
            f"{listing}: split list not found (the lists there: "
            f"{', '.join(have) or 'none'})."
        )
    names = [line.strip() for line in listing.read_text().splitlines()]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{listing}: the split list names no image.")
    labels = root / "SegmentationClass"
    labelled = labels_wanted is not None and labels.is_dir()
    if labels_wanted and not labelled:
        raise DataError(
            f"{spec}: label folder {labels} does not exist, but labels are "
            "required here."
        )
    pairs = []
    for name in names:
        image = root / "JPEGImages" / f"{name}.jpg"
        label = labels / f"{name}.png" if labelled else None
        if not image.is_file():
            raise DataError(f"{image}: image listed in {listing} not found.")
        if label is not None and not label.is_file():
            raise DataError(
                f"{image}: image without its label {label} (listed in {listing})."
            )
        pairs.append((image, label))
    return pairs


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _pairs(spec, parsed, labels_wanted):
    """``[(image, label or None), ...]``; ``labels_wanted`` is ``True``
    (required), ``False`` (read when present) or ``None`` (not read)."""
    root = Path(parsed.path)
    if not root.is_dir():
        raise DataError(
            f"{spec}: folder {root} does not exist (expected {syntax(parsed.layout)})."
        )
    if parsed.layout == "voc":
        return _voc_pairs(spec, root, parsed.options, labels_wanted)
    parts = _PARTS[parsed.layout](root, parsed.options)
    for part in parts:
        if not part.images.is_dir():
            raise DataError(
                f"{spec}: folder {part.images} does not exist; "
                f"{syntax(parsed.layout)} expects images in it."
            )
    pairs = [p for part in parts for p in _pairs_of_part(spec, part, labels_wanted)]
    if len({label is None for _, label in pairs}) > 1:
        bare = next(part.labels for part in parts if not part.labels.is_dir())
        raise DataError(f"{spec}: label folder {bare} does not exist.")
    return pairs


def _classes(spec, table, class_map, num_classes, ignore_value):
    """The class map, the class names and the count: the table's, or the
    user's class map in its place."""
    if class_map is not None:
        mapping, names = load_class_map(class_map)
        targets = [t for t in mapping.values() if t != ignore_value]
        count = len(names) if names else (max(targets) + 1 if targets else None)
    else:
        names = list(table.class_names)
        mapping, count = table.class_map(ignore_value), len(names)
        if 0 <= ignore_value < count:
            raise DataError(
                f"{spec}: the ignore value {ignore_value} is the class "
                f"{names[ignore_value]!r} of {table.name}; use an ignore value "
                f"of {count} or more (255 by default)."
            )
    if num_classes is not None and count is not None and num_classes != count:
        what = "the class map" if class_map is not None else table.name
        raise DataError(
            f"{spec}: {what} has {count} classes but num_classes="
            f"{num_classes}; leave the class count out, or map the labels to "
            "your classes with a class map."
        )
    return mapping, names, count if num_classes is None else num_classes


def _check_values(spec, pairs, values, mapping, table, ignore_value, user_map):
    """Every raw label value must be a row of the table (or of the user's
    class map, where the ignore value also passes)."""
    lut = class_map_lut(mapping)
    for (_, label), raw in zip(pairs, values):
        if user_map and ignore_value not in mapping:
            raw = raw[raw != ignore_value]
        unknown = [int(v) for v in raw if v < 0 or v >= lut.size or lut[int(v)] < 0]
        if unknown:
            what = "the class map" if user_map else f"{table.name}'s label table"
            raise DataError(
                f"{label}: label values {unknown[:10]} are not in {what} (it "
                f"holds {_runs(mapping)}). Is this the right data set, and the right "
                "label file (label ids, not colours or train ids)?"
            )


def _size_mismatches(spec, layout, pairs, sizes, label_sizes):
    bad = [
        (image, label, sizes[i], label_sizes[i])
        for i, (image, label) in enumerate(pairs)
        if label is not None and label_sizes[i] != sizes[i]
    ]
    if not bad:
        return
    image, label, (h, w), (lh, lw) = bad[0]
    hint = ""
    if layout == "gta5":
        hint = (
            " GTA5 holds a few such pairs: move each listed image and its label "
            "out of images/ and labels/ (for example into a sibling folder) and "
            "run again."
        )
    others = f" Also: {_few(b[0].name for b in bad[1:])}." if len(bad) > 1 else ""
    raise DataError(
        f"{spec}: image {image} is {w}x{h} but its label {label} is {lw}x{lh} "
        f"(width x height); they must be the same size ({len(bad)} pair(s) "
        f"differ).{others}{hint}"
    )


def load_layout(
    spec,
    *,
    ignore_value=255,
    class_map=None,
    num_classes=None,
    require_masks=True,
    check="full",
    num_workers=None,
):
    """Loads and checks a data set kept in its own folder layout.

    Args:
        spec: ``"cityscapes:PATH[:SPLIT]"``, ``"gta5:PATH"``,
            ``"synthia:PATH[:16|13]"``, ``"acdc:PATH[:CONDITION[:SPLIT]]"``,
            ``"darkzurich:PATH[:SPLIT]"``, ``"voc:PATH[:SPLIT]"`` or
            ``"ade20k:PATH[:SPLIT]"`` (see ``klseg.data.layout_specs``).
        ignore_value: What the ignored labels become. Defaults to ``255``.
        class_map: Replaces the data set's label table (see
            ``klseg.data.classes.load_class_map``; every raw value must be
            in it). Defaults to ``None``.
        num_classes: When given, must equal the table's class count.
            Defaults to ``None``.
        require_masks: Whether a missing label folder is an error. Defaults
            to ``True``; with ``False`` the images alone form an unlabelled
            split when the label folder is absent.
        check: ``"full"`` decodes every image once; ``"header"`` reads only
            headers. Labels are always decoded. Defaults to ``"full"``.
        num_workers: Threads for the checks. Defaults to the CPU count (at
            most 8).

    Returns:
        A ``Split`` of kind ``"folder"`` with the table's class map, class
        names and class count.

    Raises:
        DataError: a malformed spec, a missing folder or split list, an
            image without its label or a label without its image, an image
            and label of different sizes, or a label value outside the table
            (each naming the file).

    Example:

    >>> load_layout("gta5:/no/such/folder")
    Traceback (most recent call last):
    ...
    klseg.errors.DataError: gta5:/no/such/folder: folder /no/such/folder does \
not exist (expected gta5:PATH).
    """
    if check not in ("full", "header"):
        raise ValueError(
            f"`check` must be 'full' or 'header'. Received: check={check!r}"
        )
    parsed = parse_layout_spec(spec)
    table = _table(parsed)
    mapping, names, count = _classes(spec, table, class_map, num_classes, ignore_value)
    pairs = _pairs(spec, parsed, bool(require_masks))
    reader = read_synthia_label if parsed.layout == "synthia" else read_mask
    sizes, label_sizes = [None] * len(pairs), [None] * len(pairs)

    def check_one(index):
        image, label = pairs[index]
        width, height = image_size(image, full=check == "full")
        sizes[index] = (height, width)
        if label is None:
            return None
        raw = reader(label)
        label_sizes[index] = raw.shape[:2]
        return mask_values(raw)

    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        values = list(
            progress.iterate(
                pool.map(check_one, range(len(pairs))),
                total=len(pairs),
                label=f"Checking {spec}",
                unit="image",
            )
        )
    labelled = pairs[0][1] is not None
    if labelled:
        _size_mismatches(spec, parsed.layout, pairs, sizes, label_sizes)
        _check_values(
            spec, pairs, values, mapping, table, ignore_value, class_map is not None
        )
    split = Split(
        LayoutSource(
            spec,
            [image for image, _ in pairs],
            [label for _, label in pairs] if labelled else None,
            read_label=reader,
            mask_values=values if labelled else None,
            image_sizes=sizes,
        ),
        num_classes=count,
        class_names=names,
        ignore_value=ignore_value,
        class_map=mapping,
    )
    split.check_labels(count, what=None)
    split.num_classes_seen = split.count_classes_seen()
    return split


def layout_image_paths(spec):
    """The image files of a layout spec, in the split's order (labels are
    neither needed nor read): what ``klseg predict`` reads from a spec.

    Raises:
        DataError: as ``load_layout`` for a malformed spec or missing folder.
    """
    parsed = parse_layout_spec(spec)
    return [image for image, _ in _pairs(spec, parsed, None)]
