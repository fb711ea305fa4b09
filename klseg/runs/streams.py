"""The data streams of the training jobs: training, unlabelled, mixed, evaluation.

Every training stream of a run is shuffled, augmented and repeated by
:func:`klseg.data.make_dataset` with a seed of its own, the run's seed plus
the offset of its set (:data:`SEED_OFFSETS`: the labelled images, the
unlabelled images, the source-domain images). A resumed run starts every
stream where the checkpointed epochs left it (:func:`examples_drawn`), so
its batches are those of the uninterrupted run: the same images, in the
same order, with the same augmentation.

An epoch is ``steps_per_epoch`` steps, else one pass over the images it
covers (:func:`images_per_epoch`): the labelled images; with unlabelled
images mixed into the batches (:func:`mix_unlabeled`), both sets; with them
beside the labelled batches (a stream of their own, as the EMA teacher's),
the larger set. Evaluation streams (:func:`evaluation_stream`) are read in
order, once, at the training size.
"""

import math

from klseg.runs import inputs, runtime

__all__ = [
    "SEED_OFFSETS",
    "TrainingStreams",
    "domain_style",
    "evaluation_stream",
    "examples_drawn",
    "images_per_epoch",
    "mix_unlabeled",
    "steps_per_epoch",
    "training_stream",
    "with_source_images",
]

#: The seed of each set's training stream: the run's seed plus this offset.
SEED_OFFSETS = {"data": 0, "unlabeled_data": 1, "source_images": 2}


def examples_drawn(state, steps, batch_size):
    """Training examples the checkpointed epochs took from their stream.

    A resumed run skips them, so that its batches are those the
    uninterrupted run would have drawn. The count uses the steps per epoch
    the checkpoint records (the steps those epochs ran), else ``steps``.
    """
    if not state:
        return 0
    done = int(state.get("steps_per_epoch") or steps)
    return int(state["epoch"]) * done * int(batch_size)


def _count(split, batch_size):
    """The images of a set; one batch where the number is not known."""
    return inputs.num_images(split) or batch_size


def images_per_epoch(splits, batch_size, *, unlabeled=None):
    """The examples one epoch covers.

    Args:
        splits: ``{option: split}``; ``"data"`` holds the labelled images,
            ``"unlabeled_data"`` the unlabelled ones.
        batch_size: the run's batch size (the count of a set whose size is
            not known before reading it).
        unlabeled: ``None`` (the labelled images alone), ``"mixed"`` (both
            sets, mixed into one stream) or ``"paired"`` (the larger set: a
            labelled and an unlabelled batch every step). Defaults to None.
    """
    labeled = _count(splits["data"], batch_size)
    if unlabeled is None:
        return labeled
    other = _count(splits["unlabeled_data"], batch_size)
    return labeled + other if unlabeled == "mixed" else max(labeled, other)


def steps_per_epoch(cfg, images):
    """``cfg.steps_per_epoch``, else one pass over ``images`` examples."""
    return cfg.steps_per_epoch or max(1, math.ceil(images / cfg.batch_size))


def training_stream(cfg, split, image_size, *, seed, skip=0, maps=None, style=None):
    """Shuffled, augmented, repeated batches of ``split`` (``drop_remainder``),
    started ``skip`` examples in; ``maps`` are per-image maps that travel
    with the masks (:func:`klseg.data.make_dataset`'s ``extra_maps``);
    ``style`` restyles each image before the augmentation (a
    :class:`klseg.data.style.DomainStyle`)."""
    from klseg import data

    return data.make_dataset(
        split,
        batch_size=cfg.batch_size,
        image_size=image_size,
        crop_size=cfg.crop_size,
        augment=cfg.augment,
        shuffle=True,
        seed=seed,
        repeat=True,
        drop_remainder=True,
        ignore_value=cfg.ignore_value,
        extra_maps=maps,
        cache=inputs.cache_in_memory(split, image_size),
        skip=skip,
        style=style,
    )


class TrainingStreams:
    """The training streams of one run, each seeded for its set.

    Args:
        cfg: the run's config (batch size, crop, augmentation, ignore value,
            seed).
        splits: ``{option: split}`` of the run's sets.
        image_size: the training size.
        skip: examples every stream skips (:func:`examples_drawn`).
            Defaults to 0.
    """

    def __init__(self, cfg, splits, image_size, *, skip=0):
        self.cfg = cfg
        self.splits = splits
        self.image_size = image_size
        self.skip = skip

    def stream(self, key, maps=None, skip=None, style=None):
        """The stream of ``splits[key]`` with its seed (``SEED_OFFSETS``)."""
        return training_stream(
            self.cfg,
            self.splits[key],
            self.image_size,
            seed=self.cfg.seed + SEED_OFFSETS[key],
            skip=self.skip if skip is None else skip,
            maps=maps,
            style=style,
        )

    def mixed(self, maps=None):
        """Labelled and unlabelled images in one stream (:func:`mix_unlabeled`);
        ``maps(key)`` gives each set's extra maps (None: none)."""
        batch = self.cfg.batch_size

        def stream(key, skip):
            return self.stream(key, maps(key) if maps else None, skip)

        return mix_unlabeled(
            stream,
            _count(self.splits["data"], batch),
            _count(self.splits["unlabeled_data"], batch),
            batch,
            self.cfg.seed,
            self.skip,
        )


def mix_unlabeled(stream, n_labeled, n_unlabeled, batch_size, seed, skip):
    """One stream of batches drawing images from both sets in proportion.

    Whether each example comes from the labelled or the unlabelled set is
    drawn from a seeded stream of its own, so a resumed run can count how
    many of the first ``skip`` examples each set gave and start both sets
    there: the batches that follow are those of the uninterrupted run.
    ``stream(key, skip)`` makes the stream of one set (``"data"`` or
    ``"unlabeled_data"``).
    """
    import numpy as np
    import tensorflow as tf

    total = n_labeled + n_unlabeled

    def choices():
        return tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.cast(r % total >= n_labeled, tf.int64)
        )

    from_unlabeled = 0
    if skip:
        from_unlabeled = int(
            choices().take(skip).reduce(np.int64(0), lambda count, c: count + c)
        )
    mixed = tf.data.Dataset.choose_from_datasets(
        [
            stream("data", skip - from_unlabeled).unbatch(),
            stream("unlabeled_data", from_unlabeled).unbatch(),
        ],
        choices().skip(skip),
    )
    return mixed.batch(batch_size, drop_remainder=True).prefetch(2)


def with_source_images(batches, source_batches):
    """Zip a target stream with a stream of source-domain batches
    (:func:`klseg.finetune.pair_batches`)."""
    import tensorflow as tf

    from klseg import finetune as ft

    return tf.data.Dataset.zip((batches, source_batches)).map(ft.pair_batches)


def domain_style(cfg, references, image_size):
    """The restyling of ``cfg.style``: towards the images of the split
    ``references`` (:class:`klseg.data.style.DomainStyle`, at most 64 of
    them at ``image_size``), :class:`klseg.data.style.ColourRandomization`
    for ``"random-colour"``, or None for ``"none"``."""
    if cfg.style == "none":
        return None
    from klseg.data.style import ColourRandomization, DomainStyle, load_references

    if cfg.style == "random-colour":
        return ColourRandomization()
    return DomainStyle(cfg.style, load_references(references, image_size=image_size))


def evaluation_stream(cfg, split, image_size):
    """Batches of ``split`` in order, once, at ``image_size``; None for None."""
    if split is None:
        return None
    from klseg import data

    return runtime.distribute_options(
        data.make_dataset(
            split,
            batch_size=cfg.batch_size,
            image_size=image_size,
            ignore_value=cfg.ignore_value,
            cache=inputs.cache_in_memory(split, image_size),
        )
    )
