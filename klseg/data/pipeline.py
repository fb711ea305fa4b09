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

from klseg.data.augment import Augmenter
from klseg.data.folder import load_folder
from klseg.data.layouts import is_layout_spec, load_layout
from klseg.data.resize import RESIZE_MODES, check_resize_mode, fit_to_size, size_pair
from klseg.data.split import Split
from klseg.data.tfds_source import load_tfds
from klseg.errors import DataError, InvalidArgumentError

# fit_to_size and RESIZE_MODES live in klseg.data.resize; they stay
# importable from here.
__all__ = ["RESIZE_MODES", "fit_to_size", "load_arrays", "load_split", "make_dataset"]


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
            ``train``), a data set in its own layout (``"cityscapes:PATH"``,
            ``"gta5:PATH"``, ... see ``klseg.data.layouts``), a ``Split``
            (returned as is), or an ``(images, masks)`` tuple of arrays.
        ignore_value: Mask value meaning "no label". Defaults to ``255``.
        class_map: Remaps raw mask values: a dict ``{raw: class}`` or a JSON
            file (see ``klseg.data.classes.load_class_map``). For TFDS it
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
        return load_tfds(
            spec,
            ignore_value=ignore_value,
            class_map=class_map,
            num_classes=num_classes,
            data_dir=data_dir,
        )
    if is_layout_spec(spec):
        return load_layout(
            spec,
            ignore_value=ignore_value,
            class_map=class_map,
            num_classes=num_classes,
            require_masks=require_masks,
            check=check,
        )
    return load_folder(
        spec,
        ignore_value=ignore_value,
        class_map=class_map,
        num_classes=num_classes,
        require_masks=require_masks,
        check=check,
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
    check_resize_mode(resize)
    size = size_pair(image_size)
    split = load_split(
        split_or_spec,
        ignore_value=ignore_value,
        class_map=class_map,
        num_classes=num_classes,
        require_masks=require_masks,
    )
    images, masks = [], []
    for image, mask in split.iterate_numpy():
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
    skip=0,
    crop_size=None,
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
        skip: Start after the first ``skip`` examples of the stream, as if
            they had been drawn: the examples that follow, their order and
            their augmentation are the same as in the stream started from the
            beginning. Only the example references are drawn and dropped (no
            image is decoded, except for a TFDS split streamed from disk,
            whose records are read). A resumed run uses it to continue
            exactly where the checkpointed one stopped. Defaults to ``0``.
        crop_size: Train on random crops: each example, once at
            ``image_size``, is cut to a random window of this size (an int
            or ``(height, width)``, at most ``image_size`` per side) before
            the augmentation, which is then built for the crop size. Extra
            maps move with the crop. Defaults to ``None`` (whole images).

    Returns:
        A ``tf.data.Dataset`` of ``(images uint8 (B, H, W, 3), masks int32
        (B, H, W))`` at ``crop_size`` when given, else at ``image_size``;
        with ``extra_maps``, of ``({"images": ..., name: ...}, masks)``.
        Masks of an unlabelled split are all ``ignore_value``.

    Raises:
        DataError: for problems with the data.
        InvalidArgumentError: for bad arguments.
    """
    import tensorflow as tf

    _check_stream_arguments(batch_size, resize, skip)
    size = size_pair(image_size)
    split = load_split(
        split_or_spec,
        ignore_value=ignore_value,
        class_map=class_map,
        num_classes=num_classes,
        require_masks=require_masks,
    )
    if cache and not split.source.in_memory:
        split = _in_memory(split, size, resize)
    extras = _check_extra_maps(extra_maps, split.num_images, size)
    augmenter = Augmenter(
        augment,
        size,
        ignore_value=split.ignore_value,
        extra_names=list(extras),
        crop_size=crop_size,
    )
    parallel = num_parallel_calls or tf.data.AUTOTUNE
    seed = int(seed)
    load_map = _example_loader(split, size, resize, style, augmenter, extras, seed)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    examples = split.source.tf_examples(shuffle=shuffle, seed=seed, repeat=repeat)
    # The references and their seeds are drawn before any image is loaded,
    # so skipping them is cheap and leaves the rest of the stream unchanged.
    references = tf.data.Dataset.zip(examples, seeds)
    if skip:
        references = references.skip(int(skip))
    dataset = references.map(load_map, num_parallel_calls=parallel, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _check_stream_arguments(batch_size, resize, skip):
    is_int = isinstance(batch_size, (int, np.integer)) and not isinstance(
        batch_size, bool
    )
    if not is_int or batch_size < 1:
        raise InvalidArgumentError(
            "`batch_size` must be a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    check_resize_mode(resize)
    if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or skip < 0:
        raise InvalidArgumentError(
            f"`skip` must be a non-negative integer. Received: skip={skip!r}"
        )


def _in_memory(split, size, resize):
    """``split`` decoded and fitted to ``size`` once, as an array split."""
    images, masks = load_arrays(split, size, resize=resize)
    return Split.from_arrays(
        images,
        masks if split.has_masks else None,
        name=split.name,
        num_classes=split.num_classes,
        class_names=split.class_names,
        ignore_value=split.ignore_value,
    )


def _example_loader(split, size, resize, style, augmenter, extras, seed):
    """The tf.data map from ``(example reference, element seed)`` to one
    decoded, fitted, restyled and augmented example."""
    import tensorflow as tf

    ignore = split.ignore_value
    names = list(extras)
    out_size = augmenter.size
    source = split.source

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
        image.set_shape((*out_size, 3))
        mask.set_shape(out_size)
        for name, value in zip(names, maps):
            value.set_shape((*out_size, extras[name].shape[-1]))
        if names:
            return {"images": image, **dict(zip(names, maps))}, mask
        return image, mask

    def load(index, *rest):
        *payload, element_seed = rest
        index = int(index)
        image, raw_mask = source.load_example(index, *payload)
        mask = None if raw_mask is None else split.to_classes(raw_mask, index=index)
        return process(image, mask, index, element_seed)

    def load_map(element, element_seed):
        inputs = [*tf.nest.flatten(element), element_seed]
        outputs = tf.numpy_function(load, inputs, out_types, name="klseg_load")
        return set_shapes(outputs)

    return load_map
