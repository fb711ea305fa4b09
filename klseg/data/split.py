"""The ``Split`` object: one validated set of images (and masks).

A ``Split`` is what ``klseg.data.load_split`` returns and what
``klseg.data.make_dataset`` consumes. It holds a *source*
(``klseg.data.sources``: a folder of files, arrays in memory, or a TFDS
split) and the class information: the class map, the ignore value, the class
count and names. The checks that can run before training (files readable,
sizes matching, mask values known) have run by the time one exists;
``check_labels`` checks the mask values against a class count chosen later.
"""

from __future__ import annotations

import numpy as np

from klseg.data.classes import (
    apply_class_map,
    class_map_lut,
    format_offenders,
    load_class_map,
)
from klseg.data.sources import ArraySource, Source
from klseg.errors import DataError

# load_class_map and class_map_lut live in klseg.data.classes; they stay
# importable from here, where they were first documented.
__all__ = ["Split", "class_map_lut", "load_class_map"]

_NAMED_AT_MOST = 3


class Split:
    """A validated set of images, with masks or without.

    Args:
        source: A ``klseg.data.sources.Source``.
        num_classes_seen: See below. Defaults to ``0``.
        num_classes: See below. Defaults to ``None``.
        class_names: See below. Defaults to ``None``.
        ignore_value: See below. Defaults to ``255``.
        class_map: See below. Defaults to ``None``.

    Attributes:
        source: Where the examples come from.
        name: A readable name (the folder path, ``"tfds:NAME:SPLIT"``, or the
            name given to ``from_arrays``).
        kind: ``"folder"``, ``"arrays"`` or ``"tfds"``.
        images: For a folder, the list of image paths (sorted by file name);
            for arrays, the ``uint8`` array ``(N, H, W, 3)``; for TFDS, the
            split is read into memory on first item access (``len`` does not
            read it; prefer ``make_dataset``, which streams it).
        masks: Mask paths or raw mask arrays (before the class map) aligned
            with ``images``, or ``None`` for an unlabelled split; ``read(i)``
            gives the classes.
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
        source,
        *,
        num_classes_seen=0,
        num_classes=None,
        class_names=None,
        ignore_value=255,
        class_map=None,
    ):
        if not isinstance(source, Source):
            raise TypeError(
                "`source` must be a klseg.data.sources.Source. "
                f"Received: source={source!r}"
            )
        self.source = source
        self.num_classes_seen = int(num_classes_seen)
        self.num_classes = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.ignore_value = int(ignore_value)
        self.class_map = class_map
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
            DataError: for wrong shapes or dtypes, or mask values that are
                negative or not below ``num_classes`` (naming the examples).
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{name}: images must be a uint8 array of shape (N, H, W, 3). "
                f"Received: shape={images.shape}, dtype={images.dtype}"
            )
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
        split = cls(
            ArraySource(images, masks, name=name),
            num_classes=num_classes,
            class_names=class_names,
            ignore_value=ignore_value,
        )
        split.check_labels(num_classes, what=None)
        split.num_classes_seen = split.count_classes_seen()
        return split

    # ------------------------------------------------------------------
    @property
    def name(self):
        return self.source.name

    @property
    def kind(self):
        return self.source.kind

    @property
    def images(self):
        return self.source.images

    @property
    def masks(self):
        return self.source.masks

    @property
    def has_masks(self):
        return self.source.has_masks

    @property
    def num_images(self):
        """Number of images, or ``None`` when TFDS does not say (mock data)."""
        return self.source.num_images

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

    def image_size(self):
        """The ``(height, width)`` all the split's images share.

        Returns:
            ``(height, width)``, or ``None`` when the sizes are not known
            without decoding every image (TFDS) or the split is empty.

        Raises:
            DataError: the images differ in size (naming two of them).
        """
        sizes = self.source.image_sizes()
        if not sizes:
            return None
        first = tuple(sizes[0])
        for index, size in enumerate(sizes):
            if tuple(size) != first:
                return _different_sizes(self, (0, first), (index, tuple(size)))
        return first

    # ------------------------------------------------------------------
    def read(self, index):
        """Reads one example: ``(image uint8 (H, W, 3), mask int32 (H, W) | None)``.

        The class map is applied. For a TFDS split this reads the whole split
        into memory first (prefer ``make_dataset``, which streams it).
        """
        image, raw = self.source.read(index)
        return image, None if raw is None else self.to_classes(raw, index=index)

    def iterate_numpy(self):
        """Yields ``read(i)`` for every example in order (TFDS streams)."""
        for index, (image, raw) in enumerate(self.source.iterate_numpy()):
            yield image, None if raw is None else self.to_classes(raw, index=index)

    def apply_class_map(self, mask):
        """Maps raw mask values to class indices (identity without a map)."""
        return apply_class_map(mask, self.class_map, self.ignore_value, self._lut)

    def to_classes(self, raw_mask, *, index=None):
        """Raw mask values -> ``int32`` classes, checked when it is cheap.

        The class map is applied (values it does not name become the ignore
        value). Without a class map and with a known ``num_classes``, a value
        that is neither a class nor the ignore value raises ``DataError``
        naming the example (folders and arrays were checked when loaded; TFDS
        splits are checked here, as they are read).
        """
        classes = self.apply_class_map(raw_mask)
        if self.class_map is None and self.num_classes is not None:
            bad = (classes != self.ignore_value) & (
                (classes < 0) | (classes >= self.num_classes)
            )
            if bad.any():
                where = "" if index is None else f" in {self.source.describe(index)}"
                raise DataError(
                    f"{self.name}: mask values "
                    f"{np.unique(classes[bad])[:10].tolist()}{where} are neither a "
                    f"class index below num_classes={self.num_classes} nor the "
                    f"ignore value {self.ignore_value}; pass a class_map."
                )
        return classes

    # ------------------------------------------------------------------
    def _class_values(self):
        """Yields ``(index, distinct class values, ignore value left out)``."""
        for index, values in self.source.mask_values():
            classes = self.apply_class_map(values)
            yield index, np.unique(classes[classes != self.ignore_value])

    def count_classes_seen(self):
        """One more than the largest class index in the masks (0 if none).

        Reads every mask of sources that do not keep their values (TFDS).
        """
        if not self.has_masks:
            return 0
        largest = -1
        for _, classes in self._class_values():
            if classes.size:
                largest = max(largest, int(classes[-1]))
        return largest + 1

    def check_labels(self, num_classes, *, what="data"):
        """Checks that every mask value is a class index or the ignore value.

        With a class map whose targets are all in range nothing is read
        (after the map every value is a target or the ignore value). Folder
        splits keep each mask's values from loading, so they read no file
        either; arrays are scanned in memory; a TFDS split without a class
        map is read once.

        Args:
            num_classes: Mask values (after the class map) must lie in
                ``[0, num_classes)`` or equal the ignore value. ``None``
                checks only that no value is negative.
            what: Names the split's role in the message (for example
                ``"val_data"``), or ``None``. Defaults to ``"data"``.

        Raises:
            DataError: naming the first (up to 3) offending files (for TFDS
                and arrays: the split and the example index) with their
                values, and how many more hold such values.

        Example:

        >>> import numpy as np
        >>> split = Split.from_arrays(
        ...     np.zeros((2, 2, 2, 3), np.uint8), np.array([[[0, 1]] * 2, [[4, 1]] * 2])
        ... )
        >>> split.check_labels(5)
        >>> split.check_labels(3)
        Traceback (most recent call last):
        ...
        klseg.errors.DataError: data arrays: mask values [4] in example 1 are \
neither a class index below num_classes=3 nor the ignore value 255. Raise the \
number of classes, or map the values to classes with a class map.
        """
        if not self.has_masks:
            return
        limit = np.inf if num_classes is None else int(num_classes)
        if self.class_map is not None:
            # after the map every value is one of its targets or the ignore
            # value, so in-range targets settle it without reading anything
            targets = np.array(sorted(set(self.class_map.values())), np.int64)
            targets = targets[targets != self.ignore_value]
            if not ((targets < 0) | (targets >= limit)).any():
                return
        offenders, total = [], 0
        for index, classes in self._class_values():
            bad = classes[(classes < 0) | (classes >= limit)]
            if bad.size:
                total += 1
                if len(offenders) < _NAMED_AT_MOST:
                    offenders.append((self.source.describe(index), bad))
        if total:
            prefix = self.name if what is None else f"{what} {self.name}"
            below = "" if num_classes is None else f" below num_classes={limit}"
            raise DataError(
                f"{prefix}: mask values {format_offenders(offenders, total)} are "
                f"neither a class index{below} nor the ignore value "
                f"{self.ignore_value}. Raise the number of classes, or map the "
                "values to classes with a class map."
            )


def _different_sizes(split, first, other):
    def show(index, size):
        return f"{split.source.describe(index)} is {size[0]}x{size[1]}"

    raise DataError(
        f"{split.name}: the images differ in size ({show(*first)}, "
        f"{show(*other)}; height x width), so there is no one size to use. "
        "Give one with --image-size HxW (image_size=(H, W)); the images are "
        "resized to it."
    )
