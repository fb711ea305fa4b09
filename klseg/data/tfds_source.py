"""TensorFlow Datasets splits: ``"tfds:NAME[/CONFIG][:SPLIT][?image=F&mask=F]"``.

klseg reads TFDS data sets that are already prepared on disk and never
downloads at run time: a data set that is not prepared gives a ``DataError``
saying how to prepare it, at once (``tfds.load`` would instead retry the
network for minutes).

Known data sets (``KNOWN_DATASETS``): their image and mask features, which
mask channel holds the labels, and their class maps:

- ``oxford_iiit_pet``: ``image`` and ``segmentation_mask``; the trimap becomes
  two classes, ``background`` (trimap 2) and ``pet`` (trimap 1); the border
  (trimap 3) is ignored.
- ``cityscapes`` (configs ``semantic_segmentation`` and
  ``semantic_segmentation_extra``): ``image_left`` and ``segmentation_label``;
  the label ids 0..33 become the 19 Cityscapes training classes
  (``CITYSCAPES_CLASS_MAP``, the ``trainId`` column of cityscapesScripts'
  ``helpers/labels.py``); every other id is ignored.
- ``scene_parse150``: ``image`` and ``annotation``. TFDS builds it from the
  Places Challenge 2017 instance annotations: an RGB PNG whose red channel
  holds one of 100 object categories (1..100, 0 for everything else) and
  whose green channel numbers the instances. klseg reads the red channel;
  categories 1..100 become classes 0..99 and 0 is ignored.

Any other data set is read from its ``image`` and ``segmentation_mask``
features, or from the features the spec names (``?image=F&mask=F``), with
mask values as class indices, named by the mask feature's labels when it is a
``tfds.features.LabeledImage``. Pass ``class_map`` to remap: values a class
map does not name become the ignore value (TFDS data cannot be checked file
by file before training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from klseg.data.classes import load_class_map
from klseg.data.label_tables import CITYSCAPES
from klseg.data.resize import resize
from klseg.data.sources import Source
from klseg.data.split import Split
from klseg.errors import DataError

__all__ = [
    "CITYSCAPES_CLASS_MAP",
    "CITYSCAPES_CLASS_NAMES",
    "KNOWN_DATASETS",
    "SCENE_PARSE150_CLASS_NAMES",
    "TfdsSource",
    "TfdsSpec",
    "as_dataset",
    "fit_mask",
    "load_tfds",
    "parse_spec",
]

# The 19 training classes of Cityscapes and the label ids behind them: the
# ``trainId`` column of cityscapesScripts/helpers/labels.py
# (https://github.com/mcordts/cityscapesScripts). Ids with trainId 255
# (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic,
# ground, parking, rail track, guard rail, bridge, tunnel, polegroup,
# caravan, trailer) are ignored.
CITYSCAPES_CLASS_NAMES = list(CITYSCAPES.class_names)
CITYSCAPES_CLASS_MAP = {
    raw: target for raw, _, target in CITYSCAPES.rows if target is not None
}

# The 100 categories of the Places Challenge 2017 instance annotations, in
# the order of their ids 1..100 (instanceInfo100_train.txt and the
# "categories" of imgCatIds.json in
# https://github.com/CSAILVision/placeschallenge, instancesegmentation/).
SCENE_PARSE150_CLASS_NAMES = [
    "bed",
    "windowpane",
    "cabinet",
    "person",
    "door",
    "table",
    "curtain",
    "chair",
    "car",
    "painting",
    "sofa",
    "shelf",
    "mirror",
    "armchair",
    "seat",
    "fence",
    "desk",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sink",
    "fireplace",
    "refrigerator",
    "stairs",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "bookcase",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "arcade machine",
    "bus",
    "towel",
    "light",
    "truck",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "apparel",
    "pole",
    "bannister",
    "ottoman",
    "bottle",
    "van",
    "ship",
    "fountain",
    "washer",
    "plaything",
    "stool",
    "barrel",
    "basket",
    "bag",
    "minibike",
    "oven",
    "ball",
    "food",
    "step",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "dishwasher",
    "screen",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "plate",
    "monitor",
    "bulletin board",
    "radiator",
    "glass",
    "clock",
    "flag",
]

# Keyed by the TFDS name without its config. "channel": the mask channel that
# holds the labels (None: a single channel, or identical channels).
KNOWN_DATASETS = {
    "oxford_iiit_pet": {
        "image": "image",
        "mask": "segmentation_mask",
        "channel": None,
        "class_names": ["background", "pet"],
        "class_map": {1: 1, 2: 0, 3: 255},
    },
    "cityscapes": {
        "image": "image_left",
        "mask": "segmentation_label",
        "channel": None,
        "class_names": CITYSCAPES_CLASS_NAMES,
        "class_map": CITYSCAPES_CLASS_MAP,
    },
    "scene_parse150": {
        "image": "image",
        "mask": "annotation",
        "channel": 0,
        "class_names": SCENE_PARSE150_CLASS_NAMES,
        "class_map": {category: category - 1 for category in range(1, 101)},
    },
}
_DEFAULT_KEYS = {"image": "image", "mask": "segmentation_mask"}
_SYNTAX = (
    "'tfds:NAME[/CONFIG][:SPLIT][?image=FEATURE&mask=FEATURE[&channel=N]]', "
    "for example 'tfds:oxford_iiit_pet:test' or "
    "'tfds:cityscapes:validation?image=image_left&mask=segmentation_label'"
)


class TfdsSpec(NamedTuple):
    """A parsed ``tfds:`` spec.

    Attributes:
        name: The TFDS name, with its config if any (``"cityscapes/..."``).
        split: The split, ``"train"`` when the spec names none.
        image: The image feature the spec names, or ``None``.
        mask: The mask feature the spec names, or ``None``.
        channel: The mask channel the spec names, or ``None``.
    """

    name: str
    split: str
    image: str | None = None
    mask: str | None = None
    channel: int | None = None


def parse_spec(spec):
    """Parses ``"tfds:NAME[/CONFIG][:SPLIT][?image=F&mask=F[&channel=N]]"``.

    The query, when there is one, comes last. ``channel`` picks the mask
    channel that holds the labels (masks with one channel, or with identical
    channels, need none).

    Returns:
        A ``TfdsSpec``.

    Raises:
        DataError: a malformed spec.

    Example:

    >>> parse_spec("tfds:cityscapes:validation?image=image_left&mask=x")
    TfdsSpec(name='cityscapes', split='validation', image='image_left', mask='x', channel=None)
    """  # noqa: E501
    body, has_query, query = spec[len("tfds:") :].partition("?")
    name, _, split = body.partition(":")
    if not name or (has_query and not query):
        raise DataError(f"{spec!r}: expected {_SYNTAX}.")
    fields = {}
    for item in query.split("&") if query else []:
        key, has_value, value = item.partition("=")
        if key not in ("image", "mask", "channel"):
            raise DataError(
                f"{spec!r}: unknown key {key!r}; the spec takes image=, mask= and "
                f"channel=: {_SYNTAX}."
            )
        if key in fields:
            raise DataError(f"{spec!r}: {key}= is given twice.")
        if not has_value or not value:
            raise DataError(f"{spec!r}: {key}= needs a value: {_SYNTAX}.")
        if ":" in value:
            raise DataError(
                f"{spec!r}: {key}={value!r} holds ':'; the split goes before "
                f"the '?': {_SYNTAX}."
            )
        fields[key] = value
    channel = fields.pop("channel", None)
    if channel is not None:
        if not channel.isdigit():
            raise DataError(
                f"{spec!r}: channel= must be a channel index (0, 1, ...). "
                f"Received: channel={channel}"
            )
        channel = int(channel)
    return TfdsSpec(name, split or "train", channel=channel, **fields)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - declared dependency
        raise DataError(
            f"TFDS data sets need tensorflow-datasets ({error}). "
            "Install it with: pip install tensorflow-datasets importlib_resources"
        ) from None
    return tfds


def _prepare_hint(name, data_dir, manual):
    where = f" --data_dir {data_dir}" if data_dir else ""
    by_hand = (
        f"{name.split('/')[0]} cannot be downloaded by TFDS: fetch its files by "
        "hand first (see its TFDS catalogue page) and add --manual_dir DIR.\n"
        if manual
        else ""
    )
    return (
        f"Prepare it once on a machine with network access:\n"
        f"    tfds build {name}{where}\n"
        f"{by_hand}"
        f"(or in Python: tensorflow_datasets.builder({name!r}"
        f"{', data_dir=' + repr(str(data_dir)) if data_dir else ''})"
        ".download_and_prepare()), then copy the data folder here and point "
        "klseg at it with data_dir= or the TFDS_DATA_DIR environment variable."
    )


def _features_of(spec, parsed, features, known):
    """The image key, mask key and mask channel, checked against the data."""
    image_key = parsed.image or known.get("image", _DEFAULT_KEYS["image"])
    mask_key = parsed.mask or known.get("mask", _DEFAULT_KEYS["mask"])
    channel = parsed.channel
    if channel is None and mask_key == known.get("mask"):
        channel = known.get("channel")
    have = sorted(features.keys())
    missing = [key for key in (image_key, mask_key) if key not in features]
    if missing:
        name = parsed.name
        raise DataError(
            f"{spec}: {name} has no {' or '.join(map(repr, missing))} feature (it "
            f"has {have}). Name the image and mask features in the spec: "
            f"'tfds:{name}:{parsed.split}?image=FEATURE&mask=FEATURE'."
        )
    for role, key in (("image", image_key), ("mask", mask_key)):
        shape = getattr(features[key], "shape", None)
        if shape is None or len(shape) not in (2, 3):
            raise DataError(
                f"{spec}: feature {key!r} ({type(features[key]).__name__}, shape "
                f"{shape}) is not an image, so it cannot be the {role}; the "
                f"data set has {have}."
            )
    depth = features[mask_key].shape[-1] if len(features[mask_key].shape) == 3 else 1
    if channel is not None and depth is not None and channel >= depth:
        raise DataError(
            f"{spec}: the mask {mask_key!r} has {depth} channel(s). "
            f"Received: channel={channel}"
        )
    return image_key, mask_key, channel


def load_tfds(
    spec, *, ignore_value=255, class_map=None, num_classes=None, data_dir=None
):
    """Opens a prepared TFDS split without touching the network.

    Args:
        spec: ``"tfds:NAME[/CONFIG][:SPLIT][?image=F&mask=F[&channel=N]]"``.
            The split defaults to ``train`` (TFDS slicing such as
            ``train[:80%]`` works). Known data sets (``KNOWN_DATASETS``) need
            no query; others are read from ``image`` and ``segmentation_mask``
            unless the query names their features. ``channel`` picks the mask
            channel holding the labels.
        ignore_value: Defaults to ``255``.
        class_map: Replaces the known data set's class map (see
            ``klseg.data.classes.load_class_map``). Defaults to ``None``.
        num_classes: Defaults to the data set's (or the class map's) count.
        data_dir: Folder of prepared data sets. Defaults to TFDS's default.

    Returns:
        A ``Split`` of kind ``"tfds"``. Its class map and names are the known
        data set's when its own mask feature is read; otherwise the names
        come from the mask feature when it is a ``LabeledImage``.

    Raises:
        DataError: a malformed spec, an unknown data set or split, data not
            prepared, missing or non-image features (the error lists the
            features the data set has), or a first mask whose channels differ
            when the spec names no channel.
    """
    parsed = parse_spec(spec)
    name, split_name = parsed.name, parsed.split
    tfds = _import_tfds()
    known = KNOWN_DATASETS.get(name.split("/")[0], {})
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
    image_key, mask_key, channel = _features_of(spec, parsed, features, known)
    try:
        builder.as_dataset(split=split_name, shuffle_files=False)
    except AssertionError:
        manual = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
        raise DataError(
            f"{spec}: TFDS data set {name!r} is not prepared in "
            f"{getattr(builder, 'data_dir_root', data_dir)}. klseg does not download "
            "data at run time. " + _prepare_hint(name, data_dir, manual)
        ) from None
    except (ValueError, KeyError) as error:
        raise DataError(f"{spec}: unknown split {split_name!r} ({error}).") from None
    names, mapping = None, None
    if mask_key == known.get("mask"):
        names, mapping = known.get("class_names"), known.get("class_map")
    elif getattr(features[mask_key], "num_classes", None):
        names = list(features[mask_key].names)  # a LabeledImage
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
        mask_channel=channel,
        num_images=count,
    )
    mask_shape = features[mask_key].shape
    if channel is None and len(mask_shape) == 3 and mask_shape[-1] != 1:
        # Several mask channels and none chosen: a mask whose channels differ
        # fails here, at once, rather than mid-training.
        for image, raw_mask in source.as_tf_dataset().take(1).as_numpy_iterator():
            fit_mask(raw_mask, image.shape[:2], name=spec)
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
        mask_channel: The mask channel holding the labels, or ``None`` for
            masks with one channel (or identical channels). Defaults to
            ``None``.
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
        mask_channel=None,
        num_images=None,
    ):
        super().__init__(f"tfds:{dataset}:{split}")
        self.dataset = dataset
        self.split = split
        self.data_dir = data_dir
        self.image_key = image_key
        self.mask_key = mask_key
        self.mask_channel = mask_channel
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
        """The split as a ``tf.data.Dataset`` of ``(image, raw_mask)``.

        The raw mask keeps its trailing channel axis; with ``mask_channel``
        set, it is that one channel (``(h, w, 1)``).
        """
        tfds = _import_tfds()
        builder = tfds.builder(self.dataset, data_dir=self.data_dir)
        read_config = tfds.ReadConfig(shuffle_seed=seed)
        dataset = builder.as_dataset(
            split=self.split, shuffle_files=False, read_config=read_config
        )
        image_key, mask_key, channel = self.image_key, self.mask_key, self.mask_channel

        def pick(example):
            mask = example[mask_key]
            if channel is not None:
                mask = mask[..., channel : channel + 1]
            return example[image_key], mask

        return dataset.map(pick)

    def load_example(self, index, *payload):
        if not payload:  # an index: the split is in memory
            return self.read(int(index))
        image, raw_mask = payload
        return image, fit_mask(raw_mask, image.shape[:2], name=self.name)

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
            yield image, fit_mask(raw_mask, image.shape[:2], name=self.name)

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


def fit_mask(raw_mask, image_hw, *, name="tfds"):
    """A raw TFDS mask ``(h, w[, c])`` as ``(H, W)`` at the image's size.

    A mask with several channels must have identical channels (pick one in
    the spec with ``channel=N`` otherwise). Masks of another size than the
    image (TFDS mock data) are resized with nearest neighbour.

    Raises:
        DataError: a mask whose channels differ.
    """
    mask = np.asarray(raw_mask)
    if mask.ndim == 3:
        if mask.shape[-1] > 1 and (mask != mask[..., :1]).any():
            raise DataError(
                f"{name}: the mask has {mask.shape[-1]} channels that differ; "
                "say which one holds the labels with channel=N at the end of "
                "the spec ('tfds:NAME:SPLIT?mask=FEATURE&channel=0')."
            )
        mask = mask[..., 0]
    if mask.shape != tuple(image_hw):
        mask = resize(mask.astype(np.uint16), tuple(image_hw), nearest=True)
    return mask


def as_dataset(split, *, seed=0):
    """The examples of a TFDS ``Split`` as a ``tf.data.Dataset`` of
    ``(image, raw_mask)`` (``split.source.as_tf_dataset``)."""
    return split.source.as_tf_dataset(seed=seed)
