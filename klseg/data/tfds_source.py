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

import numpy as np

from klseg.data.split import Split, load_class_map
from klseg.errors import DataError

__all__ = ["KNOWN_DATASETS", "as_dataset", "load_tfds", "parse_spec"]

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
            ``klseg.data.split.load_class_map``). Defaults to ``None``.
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
    return Split(
        name=f"tfds:{name}:{split_name}",
        kind="tfds",
        images=None,
        masks=None,
        num_classes_seen=num_classes or 0,
        num_classes=num_classes,
        class_names=names,
        ignore_value=ignore_value,
        class_map=mapping,
        num_images=count,
        tfds_info={
            "name": name,
            "split": split_name,
            "data_dir": data_dir,
            "image": image_key,
            "mask": mask_key,
        },
    )


def as_dataset(split, *, seed=0):
    """The split's examples as a ``tf.data.Dataset`` of ``(image, raw_mask)``."""
    tfds = _import_tfds()
    info = split._tfds_info
    builder = tfds.builder(info["name"], data_dir=info["data_dir"])
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    dataset = builder.as_dataset(
        split=info["split"], shuffle_files=False, read_config=read_config
    )
    image_key, mask_key = info["image"], info["mask"]
    return dataset.map(lambda example: (example[image_key], example[mask_key]))


def to_classes(split, raw_mask, image_hw):
    """Raw TFDS mask ``(h, w[, 1])`` -> int32 classes at the image size.

    Masks of another size than the image (TFDS mock data) are resized with
    nearest neighbour. Values outside ``[0, num_classes)`` that are not the
    ignore value raise ``DataError`` when ``num_classes`` is known.
    """
    mask = np.asarray(raw_mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != tuple(image_hw):
        import cv2

        mask = cv2.resize(
            mask.astype(np.uint16),
            (int(image_hw[1]), int(image_hw[0])),
            interpolation=cv2.INTER_NEAREST,
        )
    classes = split.apply_class_map(mask)
    if split.class_map is None and split.num_classes is not None:
        bad = (classes != split.ignore_value) & (
            (classes < 0) | (classes >= split.num_classes)
        )
        if bad.any():
            raise DataError(
                f"{split.name}: mask values {np.unique(classes[bad])[:10].tolist()} "
                f"are neither a class index below num_classes={split.num_classes} "
                f"nor the ignore value {split.ignore_value}; pass a class_map."
            )
    return classes


def iterate_numpy(split):
    """Yields ``(image uint8 (H, W, 3), mask int32 (H, W))`` pairs."""
    for image, raw_mask in as_dataset(split).as_numpy_iterator():
        yield image, to_classes(split, raw_mask, image.shape[:2])


def read_all(split):
    """Reads the whole split into lists of arrays (sizes may differ)."""
    images, masks = [], []
    for image, mask in iterate_numpy(split):
        images.append(image)
        masks.append(mask)
    return images, masks
