"""Augmentation with albumentations: presets and the aligned, seeded applier.

Presets (built for a square or rectangular training size ``(H, W)``):

- ``"none"``: nothing.
- ``"light"``: horizontal flip; random resized crop (scale 0.5-1); mild
  colour jitter.
- ``"strong"``: the light transforms with a wider crop range plus an affine
  warp (scale, rotation, shift), stronger colour jitter, gamma, blur and noise.

With a crop size (``Augmenter(..., crop_size=(h, w))``), each example is
first cut to a random ``h x w`` window of the image at the training size
(``A.RandomCrop``; image, mask and extra maps together), and the preset is
built for the crop size and applied to the crop.

A user can pass an ``A.Compose`` instead. Geometric transforms move the image,
the mask and any extra per-pixel maps (for example stored source-model
probabilities, ``(H, W, C)`` floats) together; colour transforms touch the
image only. Pixels that a transform fills (outside a rotated image) become
the ignore value in the mask and zeros in the extra maps, so leave
``fill_mask`` at its default 0 in a custom ``A.Compose``.

Each example is augmented with a seed of its own, so results do not depend on
which worker thread runs it: the same seed gives the same output.

albumentations is imported on first use (with ``NO_ALBUMENTATIONS_UPDATE=1``
set unless the user set it, so the import does not query the network).
"""

from __future__ import annotations

import copy
import os
import threading

import numpy as np

from klseg.data.resize import size_pair
from klseg.errors import InvalidArgumentError
from klseg.registry import AUGMENT as PRESETS

__all__ = ["PRESETS", "Augmenter", "import_albumentations", "preset", "reseed"]


def import_albumentations():
    """Imports albumentations without its network version check."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def preset(name, image_size):
    """Builds a preset as an ``A.Compose`` (``None`` for ``"none"``).

    Args:
        name: ``"none"``, ``"light"`` or ``"strong"``.
        image_size: Output size, an int or ``(height, width)``.

    Returns:
        An ``A.Compose`` whose output has the size ``image_size``, or ``None``.

    Raises:
        InvalidArgumentError: for an unknown name.
    """
    if name not in PRESETS:
        raise InvalidArgumentError(
            f"`augment` must be one of {list(PRESETS)} or an albumentations "
            f"Compose. Received: augment={name!r}"
        )
    if name == "none":
        return None
    A = import_albumentations()
    size = size_pair(image_size)
    if name == "light":
        transforms = [
            A.HorizontalFlip(p=0.5),
            A.RandomResizedCrop(size=size, scale=(0.5, 1.0), p=0.5),
            A.ColorJitter(
                brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5
            ),
        ]
    else:
        transforms = [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.8, 1.25),
                rotate=(-15, 15),
                translate_percent=(-0.1, 0.1),
                fill=0,
                fill_mask=0,
                p=0.5,
            ),
            A.RandomResizedCrop(size=size, scale=(0.3, 1.0), p=0.7),
            A.ColorJitter(
                brightness=0.35, contrast=0.35, saturation=0.35, hue=0.05, p=0.8
            ),
            A.RandomGamma(gamma_limit=(70, 140), p=0.3),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur()], p=0.2),
            A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
        ]
    return A.Compose(transforms)


def _seed_int(words):
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def reseed(node, words):
    """Gives every transform in the tree its own stream derived from ``words``.

    ``Compose.set_random_seed`` hands the same seed to every transform, which
    makes their "apply or not" draws identical; this keeps them independent.
    """
    seed = _seed_int(words)
    node.set_random_seed(seed)
    for index, child in enumerate(getattr(node, "transforms", None) or []):
        if hasattr(child, "set_random_seed"):
            reseed(child, [*words, index + 1])


def _walk(node):
    yield node
    for child in getattr(node, "transforms", None) or []:
        yield from _walk(child)


class Augmenter:
    """Applies an augmentation to (image, mask, extra maps) with a seed per call.

    Thread-safe: each thread uses its own copy of the transforms.

    Args:
        augment: ``"none"``, ``"light"``, ``"strong"``, ``None`` or an
            ``A.Compose``.
        image_size: Training size, an int or ``(height, width)``: the size
            of the examples given; the output has this size unless
            ``crop_size`` is given.
        ignore_value: Mask value for pixels without a label (also given to
            pixels a transform fills). Defaults to ``255``.
        extra_names: Names of extra per-pixel maps that move with the mask.
        crop_size: Cut a random window of this size (an int or ``(height,
            width)``, at most ``image_size`` per side) before the
            augmentation; the output then has this size. Defaults to
            ``None`` (no crop).

    Raises:
        InvalidArgumentError: for an unknown preset, a non-Compose object, or
            a transform with ``fill_mask`` other than 0.
    """

    def __init__(
        self, augment, image_size, *, ignore_value=255, extra_names=(), crop_size=None
    ):
        self.input_size = size_pair(image_size)
        self.size = self.input_size if crop_size is None else size_pair(crop_size)
        if self.size[0] > self.input_size[0] or self.size[1] > self.input_size[1]:
            raise InvalidArgumentError(
                f"`crop_size` {self.size} does not fit in `image_size` "
                f"{self.input_size} (height, width). Received: crop_size={crop_size!r}"
            )
        self.ignore_value = int(ignore_value)
        self.extra_names = tuple(extra_names)
        if augment is None or isinstance(augment, str):
            self.name = augment or "none"
            compose = preset(self.name, self.size)
        else:
            A = import_albumentations()
            if not isinstance(augment, A.BaseCompose):
                raise InvalidArgumentError(
                    "`augment` must be 'none', 'light', 'strong' or an "
                    f"albumentations Compose. Received: augment={augment!r}"
                )
            self.name = "custom"
            compose = copy.deepcopy(augment)
            for node in _walk(compose):
                fill_mask = getattr(node, "fill_mask", None)
                if fill_mask not in (None, 0) and np.any(np.asarray(fill_mask) != 0):
                    raise InvalidArgumentError(
                        f"{type(node).__name__} has fill_mask={fill_mask!r}; leave it "
                        "at 0: klseg marks filled pixels with the ignore value "
                        "itself (and fills extra maps with 0)."
                    )
        crop = None
        if self.size != self.input_size:
            A = import_albumentations()
            crop = A.Compose([A.RandomCrop(height=self.size[0], width=self.size[1])])
        for part in (compose, crop):
            if part is not None and self.extra_names:
                part.add_targets({self._key(n): "mask" for n in self.extra_names})
        self._template = compose
        self._crop_template = crop
        self._local = threading.local()

    @staticmethod
    def _key(name):
        return f"klseg_extra_{name}"

    @property
    def is_identity(self):
        return self._template is None and self._crop_template is None

    def _compose(self):
        if not hasattr(self._local, "compose"):
            self._local.compose = copy.deepcopy(self._template)
            self._local.crop = copy.deepcopy(self._crop_template)
        return self._local.compose

    def __call__(self, image, mask=None, extras=None, *, seed=0):
        """Augments one example.

        Args:
            image: ``uint8 (H, W, 3)``, already at ``image_size``.
            mask: Integer ``(H, W)`` class indices (ignore allowed) or ``None``.
            extras: ``{name: (H, W, C) array}`` moved with the mask.
            seed: Integer seed (or a sequence of integers) for this example.

        Returns:
            ``(image, mask, extras)`` at the output size (``crop_size``, else
            ``image_size``); ``mask`` int32 (``None`` stays ``None``), extras
            in their input dtype.
        """
        extras = dict(extras or {})
        if self.is_identity:
            return image, mask, extras
        compose = self._compose()
        words = [int(s) & 0xFFFFFFFF for s in np.atleast_1d(seed)]
        data = {"image": image}
        if mask is not None:
            # Shift by one so that 0 marks pixels a transform filled.
            data["mask"] = (np.asarray(mask, np.int64) + 1).astype(np.uint16)
        dtypes = {}
        for name in self.extra_names:
            value = np.asarray(extras[name])
            dtypes[name] = value.dtype
            data[self._key(name)] = value.astype(np.float32, copy=False)
        out = data
        if self._local.crop is not None:
            reseed(self._local.crop, [0xC809, *words])
            out = self._local.crop(**out)
        if compose is not None:
            reseed(compose, [0x5EED, *words])
            out = compose(**out)
        new_image = out["image"]
        if new_image.shape[:2] != self.size:
            raise InvalidArgumentError(
                f"The augmentation changed the image size from {self.size} to "
                f"{new_image.shape[:2]}; end it with a crop or resize to the "
                "training size."
            )
        new_mask = None
        if mask is not None:
            shifted = out["mask"].astype(np.int32)
            new_mask = np.where(shifted == 0, self.ignore_value, shifted - 1)
            new_mask = new_mask.astype(np.int32)
        new_extras = {}
        for name in self.extra_names:
            value = out[self._key(name)]
            if value.ndim == 2 and np.ndim(extras[name]) == 3:
                value = value[..., None]
            new_extras[name] = value.astype(dtypes[name], copy=False)
        return np.ascontiguousarray(new_image, dtype=np.uint8), new_mask, new_extras
