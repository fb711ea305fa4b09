"""From a split to batches: ``load_split``, ``make_dataset``, ``load_arrays``.

Each example goes through the same steps:

1. decode (folders: Pillow; arrays: a slice; TFDS: its own decoder) and map
   raw mask values to classes (class map);
2. fit to the training size (``resize="stretch"``, ``"crop"`` or ``"pad"``);
3. augment with a seed of its own (``klseg.data.augment``), optionally after
   restyling towards another domain (``klseg.data.style``);
4. batch and prefetch.

Steps 1-3 run in ``tf.numpy_function`` on parallel tf.data workers; since each
example carries its own seed (drawn by a seeded, per-epoch re-drawn stream),
the output is the same from run to run for a given ``seed`` and changes from
epoch to epoch. ``load_arrays`` runs steps 1-2 with numpy only.
"""

from __future__ import annotations

import numpy as np

from klseg.data.augment import Augmenter, _size_pair
from klseg.data.split import Split
from klseg.errors import DataError, InvalidArgumentError

__all__ = ["RESIZE_MODES", "fit_to_size", "load_arrays", "load_split", "make_dataset"]

RESIZE_MODES = ("stretch", "crop", "pad")


# ----------------------------------------------------------------------
# Loading a split
# ----------------------------------------------------------------------


def load_split(
    spec,
    *,
    ignore_value=255,
    class_map=None,
    require_masks=True,
    num_classes=None,
    check="full",
    data_dir=None,
):
    """Loads and checks a split.

    Args:
        spec: A folder (``DIR`` holding ``images/`` and ``masks/``, see
            ``klseg.data.folder``), ``"tfds:NAME"`` or ``"tfds:NAME:SPLIT"``
            (for example ``"tfds:oxford_iiit_pet:test"``; the split defaults to
            ``train``), a ``Split`` (returned as is), or an ``(images, masks)``
            tuple of arrays.
        ignore_value: Mask value meaning "no label". Defaults to ``255``.
        class_map: Remaps raw mask values: a dict ``{raw: class}`` or a JSON
            file (see ``klseg.data.split.load_class_map``). For TFDS it
            replaces the data set's built-in map. Defaults to ``None``.
        require_masks: Whether the split must be labelled. Defaults to
            ``True``.
        num_classes: When given, mask values must be class indices below it
            or the ignore value. Defaults to ``None``.
        check: Folders only: ``"full"`` decodes every image once to find
            corrupt files, ``"header"`` reads headers only. Defaults to
            ``"full"``.
        data_dir: TFDS only: where prepared data sets live. Defaults to
            TFDS's own default (``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).

    Returns:
        A ``Split``.

    Raises:
        DataError: for any problem with the data (naming the file).
    """
    if isinstance(spec, Split):
        if require_masks and not spec.has_masks:
            raise DataError(f"{spec.name}: unlabelled split, but masks are required.")
        return spec
    if isinstance(spec, tuple):
        if len(spec) not in (1, 2):
            raise InvalidArgumentError(
                "An array split is (images,) or (images, masks). "
                f"Received: a tuple of length {len(spec)}"
            )
        images, masks = (*spec, None)[:2]
        if require_masks and masks is None:
            raise DataError("arrays: no masks given, but masks are required.")
        return Split.from_arrays(
            images, masks, num_classes=num_classes, ignore_value=ignore_value
        )
    if isinstance(spec, str) and spec.startswith("tfds:"):
        from klseg.data import tfds_source

        return tfds_source.load_tfds(
            spec,
            ignore_value=ignore_value,
            class_map=class_map,
            num_classes=num_classes,
            data_dir=data_dir,
        )
    from klseg.data import folder

    return folder.load_folder(
        spec,
        ignore_value=ignore_value,
        class_map=class_map,
        num_classes=num_classes,
        require_masks=require_masks,
        check=check,
    )


# ----------------------------------------------------------------------
# Fitting one example to the training size (numpy + OpenCV)
# ----------------------------------------------------------------------


def _cv2():
    import cv2

    return cv2


def _resize(array, size, nearest):
    cv2 = _cv2()
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    if nearest:
        interpolation = cv2.INTER_NEAREST
    elif array.shape[0] > height and array.shape[1] > width:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_LINEAR
    squeeze = array.ndim == 2
    out = cv2.resize(array, (width, height), interpolation=interpolation)
    if out.ndim == 2 and not squeeze:
        out = out[..., None]
    return out


def fit_to_size(image, mask, size, *, mode="stretch", ignore_value=255):
    """Brings an (image, mask) pair to the training size.

    Args:
        image: ``uint8 (H, W, 3)``.
        mask: Integer ``(H, W)`` or ``None``.
        size: ``(height, width)``.
        mode: ``"stretch"`` resizes to the size (aspect ratio not kept);
            ``"crop"`` scales the shorter side to fit and crops the centre;
            ``"pad"`` scales the longer side to fit and pads (image with 0,
            mask with the ignore value).
        ignore_value: Used for padding. Defaults to ``255``.

    Returns:
        ``(image uint8, mask int32 or None)`` of the given size. Images are
        resized with area (down) or bilinear (up) interpolation, masks with
        nearest neighbour.
    """
    height, width = size
    if mask is not None:
        mask = np.asarray(mask, dtype=np.int32)
    if image.shape[:2] == (height, width):
        return image, mask
    # cv2 cannot resize int32 with INTER_NEAREST reliably on all builds;
    # masks go through uint16 (values here are classes or the ignore value).
    mask16 = None if mask is None else mask.astype(np.uint16)
    if mode == "stretch":
        image = _resize(image, size, nearest=False)
        mask16 = None if mask16 is None else _resize(mask16, size, nearest=True)
    else:
        h, w = image.shape[:2]
        scale = (max if mode == "crop" else min)(height / h, width / w)
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
        if mode == "crop":
            new = (max(new[0], height), max(new[1], width))
        image = _resize(image, new, nearest=False)
        mask16 = None if mask16 is None else _resize(mask16, new, nearest=True)
        if mode == "crop":
            top, left = (new[0] - height) // 2, (new[1] - width) // 2
            image = image[top : top + height, left : left + width]
            if mask16 is not None:
                mask16 = mask16[top : top + height, left : left + width]
        else:
            padded = np.zeros((height, width, 3), np.uint8)
            padded[: new[0], : new[1]] = image
            image = padded
            if mask16 is not None:
                full = np.full((height, width), ignore_value, np.uint16)
                full[: new[0], : new[1]] = mask16
                mask16 = full
    mask = None if mask16 is None else mask16.astype(np.int32)
    return np.ascontiguousarray(image), mask


def _check_mode(resize):
    if resize not in RESIZE_MODES:
        raise InvalidArgumentError(
            f"`resize` must be one of {list(RESIZE_MODES)}. Received: resize={resize!r}"
        )


# ----------------------------------------------------------------------
# Arrays (numpy only)
# ----------------------------------------------------------------------


def load_arrays(
    split_or_spec,
    image_size,
    *,
    resize="stretch",
    ignore_value=255,
    class_map=None,
    num_classes=None,
    require_masks=False,
):
    """Reads a whole split into memory at the training size (no augmentation).

    Meant for small sets and for numpy users (works without TensorFlow for
    folders and arrays).

    Args:
        split_or_spec: A ``Split`` or anything ``load_split`` accepts.
        image_size: An int or ``(height, width)``.
        resize: See ``fit_to_size``. Defaults to ``"stretch"``.
        ignore_value, class_map, num_classes: As in ``load_split``.
        require_masks: Defaults to ``False`` (unlabelled splits give masks
            that are all ``ignore_value``).

    Returns:
        ``(images uint8 (N, H, W, 3), masks int32 (N, H, W))``.
    """
    _check_mode(resize)
    size = _size_pair(image_size)
    split = load_split(
        split_or_spec,
        ignore_value=ignore_value,
        class_map=class_map,
        num_classes=num_classes,
        require_masks=require_masks,
    )
    if split.kind == "tfds" and split._images is None:
        from klseg.data import tfds_source

        pairs = tfds_source.iterate_numpy(split)
    else:
        pairs = (split.read(i) for i in range(len(split)))
    images, masks = [], []
    for image, mask in pairs:
        image, mask = fit_to_size(
            image, mask, size, mode=resize, ignore_value=split.ignore_value
        )
        if mask is None:
            mask = np.full(size, split.ignore_value, np.int32)
        images.append(image)
        masks.append(mask)
    if not images:
        return np.zeros((0, *size, 3), np.uint8), np.zeros((0, *size), np.int32)
    return np.stack(images), np.stack(masks)


# ----------------------------------------------------------------------
# tf.data
# ----------------------------------------------------------------------


def _check_extra_maps(extra_maps, count, size):
    checked = {}
    for name, value in (extra_maps or {}).items():
        if not isinstance(name, str) or not name or name in ("images", "masks"):
            raise InvalidArgumentError(
                "`extra_maps` keys must be non-empty strings other than 'images' "
                f"and 'masks'. Received: {name!r}"
            )
        value = np.asarray(value)
        if value.ndim == 3:
            value = value[..., None]
        if value.ndim != 4 or value.shape[1:3] != tuple(size):
            raise InvalidArgumentError(
                f"`extra_maps[{name!r}]` must have shape (N, {size[0]}, {size[1]}, C) "
                f"at the training size. Received: shape={value.shape}"
            )
        if count is not None and value.shape[0] != count:
            raise InvalidArgumentError(
                f"`extra_maps[{name!r}]` has {value.shape[0]} entries but the split "
                f"has {count} images (same order as the split's images)."
            )
        checked[name] = value
    return checked


def make_dataset(
    split_or_spec,
    *,
    batch_size,
    image_size,
    augment="none",
    shuffle=False,
    seed=0,
    repeat=False,
    drop_remainder=False,
    extra_maps=None,
    ignore_value=255,
    resize="stretch",
    style=None,
    class_map=None,
    num_classes=None,
    require_masks=False,
    cache=False,
    num_parallel_calls=None,
):
    """Builds a batched, prefetched ``tf.data.Dataset``.

    Args:
        split_or_spec: A ``Split`` or anything ``load_split`` accepts.
        batch_size: Examples per batch.
        image_size: Training size, an int or ``(height, width)``.
        augment: ``"none"``, ``"light"``, ``"strong"`` or an ``A.Compose``
            (see ``klseg.data.augment``). Defaults to ``"none"``.
        shuffle: Shuffle the examples (again every epoch). Defaults to
            ``False``.
        seed: Seed of the shuffle and the augmentation. Defaults to ``0``.
        repeat: Repeat forever. Defaults to ``False``.
        drop_remainder: Drop the last incomplete batch. Defaults to ``False``.
        extra_maps: ``{name: array (N, H, W, C)}`` per-pixel maps aligned with
            the split's images at the training size (for example stored
            source probabilities in float16); they move with the geometric
            augmentation. Defaults to ``None``.
        ignore_value: Mask value for unlabelled pixels. Defaults to ``255``.
        resize: ``"stretch"``, ``"crop"`` or ``"pad"`` (see ``fit_to_size``).
            Defaults to ``"stretch"``.
        style: A ``klseg.data.style.DomainStyle`` applied to each image before
            the augmentation (restyling towards another domain), or ``None``.
        class_map, num_classes: As in ``load_split`` (for a spec).
        require_masks: Whether a spec must be labelled. Defaults to ``False``.
        cache: Decode and resize every example once and keep them in memory
            (augmentation still runs every epoch). Good for small sets.
            Defaults to ``False``.
        num_parallel_calls: Parallel workers. Defaults to ``tf.data.AUTOTUNE``.

    Returns:
        A ``tf.data.Dataset`` of ``(images uint8 (B, H, W, 3), masks int32
        (B, H, W))``; with ``extra_maps``, of ``({"images": ..., name: ...},
        masks)``. Masks of an unlabelled split are all ``ignore_value``.

    Raises:
        DataError: for problems with the data.
        InvalidArgumentError: for bad arguments.
    """
    import tensorflow as tf

    is_int = isinstance(batch_size, (int, np.integer)) and not isinstance(
        batch_size, bool
    )
    if not is_int or batch_size < 1:
        raise InvalidArgumentError(
            "`batch_size` must be a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    _check_mode(resize)
    size = _size_pair(image_size)
    split = load_split(
        split_or_spec,
        ignore_value=ignore_value,
        class_map=class_map,
        num_classes=num_classes,
        require_masks=require_masks,
    )
    ignore = split.ignore_value
    if cache and split.kind != "arrays":
        images, masks = load_arrays(split, size, resize=resize)
        split = Split.from_arrays(
            images,
            masks if split.has_masks else None,
            name=split.name,
            num_classes=split.num_classes,
            class_names=split.class_names,
            ignore_value=ignore,
        )
    extras = _check_extra_maps(extra_maps, split.num_images, size)
    names = list(extras)
    augmenter = Augmenter(augment, size, ignore_value=ignore, extra_names=names)
    parallel = num_parallel_calls or tf.data.AUTOTUNE
    seed = int(seed)

    def process(image, mask, index, element_seed):
        if mask is None:
            mask = np.full(image.shape[:2], ignore, np.int32)
        image, mask = fit_to_size(image, mask, size, mode=resize, ignore_value=ignore)
        rng_words = [seed, int(element_seed) & 0xFFFFFFFF, int(element_seed) >> 32]
        if style is not None:
            image = style.apply(image, seed=[*rng_words, 1])
        maps = {name: extras[name][index] for name in names}
        image, mask, maps = augmenter(image, mask, maps, seed=rng_words)
        return (image, mask.astype(np.int32), *(maps[name] for name in names))

    out_types = [tf.uint8, tf.int32, *(tf.as_dtype(extras[n].dtype) for n in names)]

    def set_shapes(outputs):
        image, mask, *maps = outputs
        image.set_shape((*size, 3))
        mask.set_shape(size)
        for name, value in zip(names, maps):
            value.set_shape((*size, extras[name].shape[-1]))
        if names:
            return {"images": image, **dict(zip(names, maps))}, mask
        return image, mask

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    if split.kind == "tfds" and split._images is None:
        from klseg.data import tfds_source

        examples = tfds_source.as_dataset(split, seed=seed).enumerate()
        if shuffle:
            buffer = min(split.num_images or 1024, 1024)
            examples = examples.shuffle(
                buffer, seed=seed, reshuffle_each_iteration=True
            )
        if repeat:
            examples = examples.repeat()

        def load_tfds(index, image, raw_mask, element_seed):
            mask = tfds_source.to_classes(split, raw_mask, image.shape[:2])
            return process(image, mask, int(index), element_seed)

        def tfds_map(pair, element_seed):
            index, (image, raw_mask) = pair
            outputs = tf.numpy_function(
                load_tfds,
                [index, image, raw_mask, element_seed],
                out_types,
                name="klseg_load",
            )
            return set_shapes(outputs)

        dataset = tf.data.Dataset.zip(examples, seeds).map(
            tfds_map, num_parallel_calls=parallel, deterministic=True
        )
    else:
        count = len(split)
        indices = tf.data.Dataset.range(count)
        if shuffle:
            indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            indices = indices.repeat()

        def load_index(index, element_seed):
            image, mask = split.read(int(index))
            return process(image, mask, int(index), element_seed)

        def index_map(index, element_seed):
            outputs = tf.numpy_function(
                load_index, [index, element_seed], out_types, name="klseg_load"
            )
            return set_shapes(outputs)

        dataset = tf.data.Dataset.zip(indices, seeds).map(
            index_map, num_parallel_calls=parallel, deterministic=True
        )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)
