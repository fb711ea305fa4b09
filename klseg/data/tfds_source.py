"""TensorFlow Datasets splits: ``"tfds:NAME[:SPLIT]"``.

klseg reads TFDS data sets that are already prepared on disk and never
downloads at run time: a data set that is not prepared gives a ``DataError``
saying how to prepare it, at once (``tfds.load`` would instead retry the
network for minutes).

Known data sets and their class maps:

- ``oxford_iiit_pet``: the trimap becomes two classes, ``background`` (trimap
  2) and ``pet`` (trimap 1); the border (trimap 3) is ignored.

Any other data set with ``image`` and ``segmentation_mask`` features is read
with its mask values as class indices (pass ``class_map`` to remap). Values a
class map does not name become the ignore value (TFDS data cannot be checked
file by file before training).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from klseg.data.classes import load_class_map
from klseg.data.resize import resize
from klseg.data.sources import Source
from klseg.data.split import Split
from klseg.errors import DataError

__all__ = ["KNOWN_DATASETS", "TfdsSource", "as_dataset", "load_tfds", "parse_spec"]

KNOWN_DATASETS = {
    "oxford_iiit_pet": {
        "image": "image",
        "mask": "segmentation_mask",
        "class_names": ["background", "pet"],
        "class_map": {1: 1, 2: 0, 3: 255},
    },
}
_DEFAULT_KEYS = {"image": "image", "mask": "segmentation_mask"}


def parse_spec(spec):
    """Splits ``"tfds:NAME[:SPLIT]"`` into ``(name, split)``."""
    body = spec[len("tfds:") :]
    name, _, split = body.partition(":")
    if not name:
        raise DataError(
            f"{spec!r}: expected 'tfds:NAME' or 'tfds:NAME:SPLIT', "
            "for example 'tfds:oxford_iiit_pet:test'."
        )
    return name, split or "train"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - declared dependency
        raise DataError(
            f"TFDS data sets need tensorflow-datasets ({error}). "
            "Install it with: pip install tensorflow-datasets importlib_resources"
        ) from None
    return tfds


def _prepare_hint(name, data_dir):
    where = f" --data_dir {data_dir}" if data_dir else ""
    return (
        f"Prepare it once on a machine with network access:\n"
        f"    tfds build {name}{where}\n"
        f"(or in Python: tensorflow_datasets.builder({name!r}"
        f"{', data_dir=' + repr(str(data_dir)) if data_dir else ''})"
        ".download_and_prepare()), then copy the data folder here and point "
        "klseg at it with data_dir= or the TFDS_DATA_DIR environment variable."
    )


def load_tfds(
    spec, *, ignore_value=255, class_map=None, num_classes=None, data_dir=None
):
    """Opens a prepared TFDS split without touching the network.

    Args:
        spec: ``"tfds:NAME"`` or ``"tfds:NAME:SPLIT"`` (split defaults to
            ``train``; TFDS slicing such as ``train[:80%]`` works).
        ignore_value: Defaults to ``255``.
        class_map: Replaces the known data set's class map (see
            ``klseg.data.classes.load_class_map``). Defaults to ``None``.
        num_classes: Defaults to the data set's (or the class map's) count.
        data_dir: Folder of prepared data sets. Defaults to TFDS's default.

    Returns:
        A ``Split`` of kind ``"tfds"``.

    Raises:
        DataError: unknown data set or split, data not prepared, or no image
            and segmentation-mask features.
    """
    name, split_name = parse_spec(spec)
    tfds = _import_tfds()
    known = KNOWN_DATASETS.get(name, {})
    data_dir = None if data_dir is None else str(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # DatasetNotFoundError and friends
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"{spec}: not a TFDS data set ({first_line}). Check the name against "
            "https://www.tensorflow.org/datasets/catalog/overview."
        ) from None
    features = builder.info.features
    image_key = known.get("image", _DEFAULT_KEYS["image"])
    mask_key = known.get("mask", _DEFAULT_KEYS["mask"])
    missing = [key for key in (image_key, mask_key) if key not in features]
    if missing:
        raise DataError(
            f"{spec}: the data set has no {missing} feature(s) (it has "
            f"{sorted(features.keys())}); klseg reads '{image_key}' and "
            f"'{mask_key}'."
        )
    try:
        builder.as_dataset(split=split_name, shuffle_files=False)
    except AssertionError:
        raise DataError(
            f"{spec}: TFDS data set {name!r} is not prepared in "
            f"{getattr(builder, 'data_dir_root', data_dir)}. klseg does not download "
            "data at run time. " + _prepare_hint(name, data_dir)
        ) from None
    except (ValueError, KeyError) as error:
        raise DataError(f"{spec}: unknown split {split_name!r} ({error}).") from None
    names = known.get("class_names")
    mapping = known.get("class_map")
    if class_map is not None:
        mapping, names = load_class_map(class_map)
    if num_classes is None:
        if names is not None:
            num_classes = len(names)
        elif mapping:
            targets = [t for t in mapping.values() if t != ignore_value]
            num_classes = max(targets) + 1 if targets else None
    try:
        count = int(builder.info.splits[split_name].num_examples) or None
    except Exception:  # mock data and unprepared metadata have no split info
        count = None
    source = TfdsSource(
        name,
        split_name,
        data_dir=data_dir,
        image_key=image_key,
        mask_key=mask_key,
        num_images=count,
    )
    return Split(
        source,
        num_classes_seen=num_classes or 0,
        num_classes=num_classes,
        class_names=names,
        ignore_value=ignore_value,
        class_map=mapping,
    )


class TfdsSource(Source):
    """A prepared TFDS split, streamed (or read into memory on demand).

    Args:
        dataset: The TFDS data set name.
        split: The TFDS split (slicing such as ``train[:80%]`` works).
        data_dir: Folder of prepared data sets, or ``None`` for TFDS's own.
        image_key: The image feature. Defaults to ``"image"``.
        mask_key: The mask feature. Defaults to ``"segmentation_mask"``.
        num_images: The example count when TFDS knows it, else ``None``.
    """

    kind = "tfds"

    def __init__(
        self,
        dataset,
        split,
        *,
        data_dir=None,
        image_key="image",
        mask_key="segmentation_mask",
        num_images=None,
    ):
        super().__init__(f"tfds:{dataset}:{split}")
        self.dataset = dataset
        self.split = split
        self.data_dir = data_dir
        self.image_key = image_key
        self.mask_key = mask_key
        self._count = num_images
        self._examples = None  # (images, raw masks) once read into memory

    @property
    def num_images(self):
        if self._examples is not None:
            return len(self._examples[0])
        return self._count

    @property
    def has_masks(self):
        return True

    @property
    def images(self):
        return _LazySequence(self, 0)

    @property
    def masks(self):
        return _LazySequence(self, 1)

    def as_tf_dataset(self, *, seed=0):
        """The split as a ``tf.data.Dataset`` of ``(image, raw_mask)``."""
        tfds = _import_tfds()
        builder = tfds.builder(self.dataset, data_dir=self.data_dir)
        read_config = tfds.ReadConfig(shuffle_seed=seed)
        dataset = builder.as_dataset(
            split=self.split, shuffle_files=False, read_config=read_config
        )
        image_key, mask_key = self.image_key, self.mask_key
        return dataset.map(lambda example: (example[image_key], example[mask_key]))

    def load_example(self, index, *payload):
        if not payload:  # an index: the split is in memory
            return self.read(int(index))
        image, raw_mask = payload
        return image, fit_mask(raw_mask, image.shape[:2])

    def tf_examples(self, *, shuffle=False, seed=0, repeat=False):
        if self._examples is not None:
            return super().tf_examples(shuffle=shuffle, seed=seed, repeat=repeat)
        examples = self.as_tf_dataset(seed=seed).enumerate()
        if shuffle:
            buffer = min(self._count or 1024, 1024)
            examples = examples.shuffle(
                buffer, seed=seed, reshuffle_each_iteration=True
            )
        if repeat:
            examples = examples.repeat()
        return examples

    def iterate_numpy(self):
        if self._examples is not None:
            yield from zip(*self._examples)
            return
        for image, raw_mask in self.as_tf_dataset().as_numpy_iterator():
            yield image, fit_mask(raw_mask, image.shape[:2])

    def read_all(self):
        """Reads the whole split into memory (once); returns (images, masks)."""
        if self._examples is None:
            images, masks = [], []
            for image, mask in self.iterate_numpy():
                images.append(image)
                masks.append(mask)
            self._examples = (images, masks)
        return self._examples

    def read(self, index):
        images, masks = self.read_all()
        return images[index], masks[index]


class _LazySequence(Sequence):
    """A TFDS split's images or masks, read into memory on first item access.

    ``len()`` uses the split's example count when TFDS knows it, so counting
    does not read the data.
    """

    def __init__(self, source, position):
        self._source = source
        self._position = position

    def __len__(self):
        count = self._source.num_images
        if count is None:
            count = len(self._source.read_all()[self._position])
        return count

    def __getitem__(self, index):
        return self._source.read_all()[self._position][index]


def fit_mask(raw_mask, image_hw):
    """A raw TFDS mask ``(h, w[, 1])`` as ``(H, W)`` at the image's size.

    Masks of another size than the image (TFDS mock data) are resized with
    nearest neighbour.
    """
    mask = np.asarray(raw_mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != tuple(image_hw):
        mask = resize(mask.astype(np.uint16), tuple(image_hw), nearest=True)
    return mask


def as_dataset(split, *, seed=0):
    """The examples of a TFDS ``Split`` as a ``tf.data.Dataset`` of
    ``(image, raw_mask)`` (``split.source.as_tf_dataset``)."""
    return split.source.as_tf_dataset(seed=seed)
