"""Where a ``Split``'s examples come from: the ``Source`` interface.

A source knows how many examples it holds, reads one as numpy arrays, and
hands ``tf.data`` a stream of example references. It deals in *raw* mask
values; the ``Split`` that holds it applies the class map and the checks.

- ``ArraySource`` (here): arrays in memory;
- ``klseg.data.folder.FolderSource``: image and mask files;
- ``klseg.data.tfds_source.TfdsSource``: a prepared TensorFlow Datasets split.

This module uses numpy only (TensorFlow inside ``tf_examples``).
"""

from __future__ import annotations

import numpy as np

from klseg.data.classes import mask_values

__all__ = ["ArraySource", "Source"]


class Source:
    """The interface a ``Split`` reads through.

    Subclasses set ``kind`` and implement ``num_images``, ``has_masks``,
    ``images``, ``masks`` and ``read``; the other methods have defaults built
    on ``read`` that a subclass replaces when it can do better (streaming,
    cached mask values).

    Attributes:
        kind: ``"folder"``, ``"arrays"`` or ``"tfds"``.
        name: A readable name for messages.
        in_memory: Whether examples are arrays already (caching them again
            would gain nothing).
    """

    kind = None
    in_memory = False

    def __init__(self, name):
        self.name = str(name)

    @property
    def num_images(self):
        """Number of examples, or ``None`` when not known without reading."""
        raise NotImplementedError

    @property
    def has_masks(self):
        """Whether every example has a mask."""
        raise NotImplementedError

    @property
    def images(self):
        """The images as the source keeps them (paths, an array, ...)."""
        raise NotImplementedError

    @property
    def masks(self):
        """The masks aligned with ``images``, or ``None``."""
        raise NotImplementedError

    def read(self, index):
        """``(image uint8 (H, W, 3), raw mask (H, W) or None)`` of one example.

        The mask has the image's height and width.
        """
        raise NotImplementedError

    def describe(self, index):
        """Where example ``index`` lives, for messages (a file, an index)."""
        return f"example {index}"

    def image_sizes(self):
        """``[(height, width), ...]`` per example, or ``None`` when not known
        without decoding every image (TFDS)."""
        return None

    def iterate_numpy(self):
        """Yields ``read(i)`` for every example, in order."""
        for index in range(self.num_images):
            yield self.read(index)

    def mask_values(self):
        """Yields ``(index, sorted distinct raw mask values)`` per example."""
        for index, (_, mask) in enumerate(self.iterate_numpy()):
            if mask is not None:
                yield index, mask_values(mask)

    def tf_examples(self, *, shuffle=False, seed=0, repeat=False):
        """A ``tf.data.Dataset`` of example references, in order or shuffled.

        Each element is the example's index, or a nested tuple whose first
        item is the index; ``load_example(*tf.nest.flatten(element))`` (numpy,
        inside ``tf.numpy_function``) turns it into arrays. By default the elements
        are indices, shuffled over the whole set, and ``read`` decodes them.
        """
        import tensorflow as tf

        count = self.num_images
        indices = tf.data.Dataset.range(count)
        if shuffle:
            indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            indices = indices.repeat()
        return indices

    def load_example(self, index, *payload):
        """Arrays of one element of ``tf_examples``: ``read(index)`` by default."""
        del payload
        return self.read(int(index))


class ArraySource(Source):
    """Examples held in memory.

    Args:
        images: ``uint8`` array ``(N, H, W, 3)`` (or a sequence of such
            images).
        masks: Integer array ``(N, H, W)`` of raw values, or ``None``.
        name: Name used in messages. Defaults to ``"arrays"``.
    """

    kind = "arrays"
    in_memory = True

    def __init__(self, images, masks=None, *, name="arrays"):
        super().__init__(name)
        self._images = images
        self._masks = masks
        self._values = None

    @property
    def num_images(self):
        return len(self._images)

    @property
    def has_masks(self):
        return self._masks is not None

    @property
    def images(self):
        return self._images

    @property
    def masks(self):
        return self._masks

    def read(self, index):
        image = np.asarray(self._images[index])
        mask = None if self._masks is None else np.asarray(self._masks[index])
        return image, mask

    def image_sizes(self):
        shape = getattr(self._images, "shape", None)
        if shape is not None and len(shape) == 4:
            return [tuple(int(v) for v in shape[1:3])] * int(shape[0])
        return [tuple(np.shape(image)[:2]) for image in self._images]

    def mask_values(self):
        if self._masks is None:
            return
        if self._values is None:
            self._values = [mask_values(mask) for mask in self._masks]
        yield from enumerate(self._values)
