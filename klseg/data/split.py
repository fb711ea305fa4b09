"""The ``Split`` object: one validated set of images (and masks), and class maps.

A ``Split`` is what ``klseg.data.load_split`` returns and what
``klseg.data.make_dataset`` consumes. It comes from a folder (file paths), from
arrays in memory, or from TensorFlow Datasets; the checks that can run before
training (files readable, sizes matching, mask values known) have run by the
time one exists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from klseg.errors import DataError

__all__ = ["Split", "load_class_map", "class_map_lut"]


class Split:
    """A validated set of images, with masks or without.

    Attributes:
        name: A readable name (the folder path, ``"tfds:NAME:SPLIT"``, or the
            name given to ``from_arrays``).
        kind: ``"folder"``, ``"arrays"`` or ``"tfds"``.
        images: For a folder, the list of image paths (sorted by file name);
            for arrays, the ``uint8`` array ``(N, H, W, 3)``; for TFDS, the
            split is read into memory on first item access (``len`` does not
            read it; prefer ``make_dataset``, which streams it).
        masks: Mask paths or arrays aligned with ``images``, or ``None`` for an
            unlabelled split.
        has_masks: Whether every image has a mask.
        num_classes_seen: One more than the largest class index found in the
            masks (after the class map), ignoring the ignore value; ``0`` for
            an unlabelled split. For TFDS the class count of the data set.
        num_classes: The class count given by the user, the class map or the
            data set, or ``None`` when unknown.
        class_names: Class names when known (class map, ``classes.json`` next
            to the folder, TFDS), else ``None``.
        ignore_value: The mask value that marks pixels without a label.
        class_map: ``{raw mask value: class index or ignore}`` or ``None``.
    """

    def __init__(
        self,
        *,
        name,
        kind,
        images,
        masks=None,
        num_classes_seen=0,
        num_classes=None,
        class_names=None,
        ignore_value=255,
        class_map=None,
        num_images=None,
        tfds_info=None,
    ):
        self.name = name
        self.kind = kind
        self._images = images
        self._masks = masks
        self.num_classes_seen = int(num_classes_seen)
        self.num_classes = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.ignore_value = int(ignore_value)
        self.class_map = class_map
        self._num_images = num_images
        self._tfds_info = tfds_info
        self._lut = None if class_map is None else class_map_lut(class_map)

    # ------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        images,
        masks=None,
        *,
        name="arrays",
        num_classes=None,
        class_names=None,
        ignore_value=255,
    ):
        """Wraps in-memory arrays (for example ``synthetic.generate`` output).

        Args:
            images: ``uint8`` array ``(N, H, W, 3)``.
            masks: Integer array ``(N, H, W)`` of class indices, or ``None``.
            name: Name used in messages. Defaults to ``"arrays"``.
            num_classes: When given, mask values must be below it or equal to
                ``ignore_value``. Defaults to ``None``.
            class_names: Optional class names.
            ignore_value: Defaults to ``255``.

        Raises:
            DataError: for wrong shapes or dtypes, or unknown mask values.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{name}: images must be a uint8 array of shape (N, H, W, 3). "
                f"Received: shape={images.shape}, dtype={images.dtype}"
            )
        seen = 0
        if masks is not None:
            masks = np.asarray(masks)
            if masks.ndim == 4 and masks.shape[-1] == 1:
                masks = masks[..., 0]
            if masks.shape != images.shape[:3]:
                raise DataError(
                    f"{name}: masks must have shape {images.shape[:3]} to match the "
                    f"images. Received: masks.shape={masks.shape}"
                )
            if not np.issubdtype(masks.dtype, np.integer):
                raise DataError(
                    f"{name}: masks must hold integer class indices. "
                    f"Received: dtype={masks.dtype}"
                )
            values = np.unique(masks)
            valid = values[values != ignore_value]
            bad = valid[(valid < 0) | (valid >= (num_classes or np.inf))]
            if bad.size:
                raise DataError(
                    f"{name}: mask values {bad[:10].tolist()} are neither a class "
                    f"index below num_classes={num_classes} nor the ignore value "
                    f"{ignore_value}."
                )
            seen = int(valid.max()) + 1 if valid.size else 0
        return cls(
            name=name,
            kind="arrays",
            images=images,
            masks=masks,
            num_classes_seen=seen,
            num_classes=num_classes,
            class_names=class_names,
            ignore_value=ignore_value,
        )

    # ------------------------------------------------------------------
    @property
    def images(self):
        if self.kind == "tfds" and self._images is None:
            return _LazyList(self, "_images")
        return self._images

    @property
    def masks(self):
        if self.kind == "tfds" and self._images is None:
            return _LazyList(self, "_masks")
        return self._masks

    @property
    def has_masks(self):
        if self.kind == "tfds":
            return True
        return self._masks is not None

    @property
    def num_images(self):
        """Number of images, or ``None`` when TFDS does not say (mock data)."""
        if self._num_images is not None:
            return self._num_images
        if self._images is not None:
            return len(self._images)
        return None

    def __len__(self):
        count = self.num_images
        if count is None:
            raise TypeError(f"{self.name}: the number of images is not known")
        return count

    def __repr__(self):
        labelled = "labelled" if self.has_masks else "unlabelled"
        return (
            f"Split(name={self.name!r}, kind={self.kind!r}, "
            f"num_images={self.num_images}, {labelled}, "
            f"num_classes_seen={self.num_classes_seen})"
        )

    # ------------------------------------------------------------------
    def read(self, index):
        """Reads one example: ``(image uint8 (H, W, 3), mask int32 (H, W) | None)``.

        For folders the file is decoded here; the class map is applied. For a
        TFDS split this reads the whole split into memory first (prefer
        ``make_dataset``, which streams it).
        """
        from klseg.data import folder

        if self.kind == "folder":
            image = folder.read_image(self._images[index])
            mask = None
            if self._masks is not None:
                mask = folder.read_mask(self._masks[index])
        elif self.kind == "tfds":
            # materialised TFDS masks already hold classes
            return np.asarray(self.images[index]), np.asarray(self.masks[index])
        else:
            image = np.asarray(self._images[index])
            mask = None if self._masks is None else np.asarray(self._masks[index])
        if mask is not None:
            mask = self.apply_class_map(mask)
        return image, mask

    def check_labels(self, num_classes, *, what="data"):
        """Checks that every mask value is a class index or the ignore value.

        Args:
            num_classes: Mask values (after the class map) must be below it,
                or equal to the ignore value.
            what: Names the split in the message (for example
                ``"--val-data"``). Defaults to ``"data"``.

        Raises:
            DataError: naming the first (up to 3) offending files (for TFDS
                and arrays: the split and the example index) and their
                values, and how many more there are.
        """
        from klseg.data.classes import format_offenders, mask_values

        if not self.has_masks:
            return
        num_classes = int(num_classes)
        offenders, total = [], 0
        for index in range(len(self)):
            _, mask = self.read(index)
            classes = mask_values(mask)
            classes = classes[classes != self.ignore_value]
            bad = classes[(classes < 0) | (classes >= num_classes)]
            if bad.size:
                total += 1
                if len(offenders) < 3:
                    where = (
                        str(self._masks[index])
                        if self.kind == "folder"
                        else f"example {index}"
                    )
                    offenders.append((where, bad))
        if total:
            raise DataError(
                f"{what} {self.name}: mask values {format_offenders(offenders, total)}"
                f" are neither a class index below num_classes={num_classes} nor "
                f"the ignore value {self.ignore_value}. Raise the number of "
                "classes, or map the values to classes with a class map."
            )

    def apply_class_map(self, mask):
        """Maps raw mask values to class indices (identity without a map)."""
        mask = np.asarray(mask).astype(np.int32, copy=False)
        if self._lut is None:
            return mask
        lut = self._lut
        out = np.full(mask.shape, self.ignore_value, dtype=np.int32)
        inside = (mask >= 0) & (mask < lut.size)
        out[inside] = lut[mask[inside]]
        if self.ignore_value not in self.class_map:
            out[mask == self.ignore_value] = self.ignore_value
        # values the map does not name were rejected when the split was
        # validated (folders) or are documented to become ignore (TFDS)
        out[out < 0] = self.ignore_value
        return out

    def _materialize(self):
        from klseg.data import tfds_source

        self._images, self._masks = tfds_source.read_all(self)


class _LazyList(Sequence):
    """A TFDS split's images or masks, read into memory on first item access.

    ``len()`` uses the split's example count when TFDS knows it, so counting
    does not read the data.
    """

    def __init__(self, split, attribute):
        self._split = split
        self._attribute = attribute

    def _items(self):
        if self._split._images is None:
            self._split._materialize()
        return getattr(self._split, self._attribute)

    def __len__(self):
        if self._split._images is None and self._split._num_images is not None:
            return self._split._num_images
        return len(self._items())

    def __getitem__(self, index):
        return self._items()[index]


# ----------------------------------------------------------------------
# Class maps
# ----------------------------------------------------------------------


def load_class_map(class_map):
    """Reads a class map.

    A class map says which class each raw mask value becomes. Accepted forms:

    - a dict ``{raw value: class index}`` (keys may be strings of integers);
    - a JSON file holding such a dict, or an object
      ``{"map": {...}, "class_names": [...]}``.

    A raw value may map to the ignore value (for example a border label).
    The ignore value itself stays ignored unless the map names it.

    Returns:
        ``(mapping, class_names)`` with ``mapping`` a ``{int: int}`` dict and
        ``class_names`` a list or ``None``.

    Raises:
        DataError: the file is missing or not valid JSON, or an entry is not
            an integer.
    """
    source = "class_map"
    class_names = None
    if isinstance(class_map, (str, Path)):
        source = str(class_map)
        path = Path(class_map)
        if not path.is_file():
            raise DataError(f"{path}: class map file not found.")
        try:
            class_map = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: class map is not valid JSON ({error}).") from None
    if not isinstance(class_map, Mapping):
        raise DataError(
            f"{source}: a class map must be a JSON object / dict of "
            f"{{raw value: class index}}. Received: {type(class_map).__name__}"
        )
    if "map" in class_map:
        class_names = class_map.get("class_names")
        class_map = class_map["map"]
        if not isinstance(class_map, Mapping):
            raise DataError(f"{source}: 'map' must be an object of raw value: class.")
    mapping = {}
    for key, value in class_map.items():
        try:
            raw, target = int(key), int(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: class map entries must be integers; got {key!r}: {value!r}."
            ) from None
        if raw < 0 or target < 0:
            raise DataError(
                f"{source}: class map values must be >= 0; got {key!r}: {value!r}."
            )
        mapping[raw] = target
    if class_names is not None:
        class_names = [str(name) for name in class_names]
    return mapping, class_names


def class_map_lut(mapping):
    """A lookup table ``lut[raw] = class`` with ``-1`` for unmapped values."""
    size = max(mapping) + 1 if mapping else 1
    lut = np.full(size, -1, dtype=np.int32)
    for raw, target in mapping.items():
        lut[raw] = target
    return lut
