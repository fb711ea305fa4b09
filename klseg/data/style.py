"""Domain-style tools: restyle source images towards a target domain.

``DomainStyle`` wraps albumentations' domain-adaptation transforms and gives
them reference images from the target domain, one reference per call (the
``reference_images=`` argument of these transforms fails in albumentations
2.0.8; klseg passes the reference through the transform's metadata key):

- ``"fda"``: Fourier Domain Adaptation (swaps the low frequencies of the
  amplitude spectrum; global colour and lighting). About 22 ms per 256x256
  image on a 2-core CPU.
- ``"histogram"``: per-channel histogram matching. About 1 ms.
- ``"pda"``: pixel distribution adaptation: the image's colour distribution
  is mapped onto the reference's by a PCA (or standard / min-max) transform.
  klseg computes this one itself with the same parameters as
  albumentations' ``PixelDistributionAdaptation``: in albumentations 2.0.8
  that transform rescales pixels to [0, 1] and then casts them to uint8,
  which turns images almost black.

Use it on arrays (``style(images, seed=0)``) or inside the pipeline
(``make_dataset(..., style=DomainStyle(...))``), where it runs before the
augmentation. Only the image changes; masks and extra maps are untouched.

Example:

>>> from klseg.data import synthetic
>>> source, _ = synthetic.generate("source", 2, image_size=32)
>>> target, _ = synthetic.generate("target", 4, image_size=32, seed=1)
>>> style = DomainStyle("histogram", target)
>>> style(source, seed=0).shape
(2, 32, 32, 3)
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np

from klseg.data.augment import import_albumentations, reseed
from klseg.data.images import list_images, read_image
from klseg.data.resize import resize, size_pair
from klseg.data.split import Split
from klseg.errors import DataError, InvalidArgumentError

__all__ = ["METHODS", "ColourRandomization", "DomainStyle", "load_references"]

METHODS = {
    "fda": ("FDA", "fda_metadata"),
    "histogram": ("HistogramMatching", "hm_metadata"),
    "pda": ("PixelDistributionAdaptation", "pda_metadata"),
}
_ALIASES = {
    "fda": "fda",
    "histogram": "histogram",
    "histogram_matching": "histogram",
    "histogrammatching": "histogram",
    "pda": "pda",
    "pixel_distribution": "pda",
    "pixeldistributionadaptation": "pda",
}


def load_references(references, *, max_references=64, image_size=None):
    """Reads reference images of the target domain.

    Args:
        references: A folder (``images/`` inside or image files directly), a
            ``Split``, a ``uint8`` array ``(N, H, W, 3)`` or a list of
            ``(H, W, 3)`` arrays.
        max_references: Keep at most this many, evenly spread over the sorted
            list. Defaults to ``64``.
        image_size: Resize each reference to this size (int or
            ``(height, width)``) to save memory; ``None`` keeps them as they
            are. Defaults to ``None``.

    Returns:
        A list of ``uint8 (H, W, 3)`` arrays.

    Raises:
        DataError: for an empty or unreadable folder.
    """
    if isinstance(references, (str, Path)):
        paths = list_images(references)
        keep = _spread(len(paths), max_references)
        images = [read_image(paths[i]) for i in keep]
    elif isinstance(references, Split):
        keep = _spread(len(references), max_references)
        images = [references.read(i)[0] for i in keep]
    else:
        if isinstance(references, np.ndarray) and references.ndim == 3:
            references = references[None]
        items = list(references)
        keep = _spread(len(items), max_references)
        images = [np.asarray(items[i]) for i in keep]
    if not images:
        raise DataError(f"{references!r}: no reference images.")
    for index, image in enumerate(images):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise DataError(
                f"reference image {index} must be uint8 (H, W, 3). "
                f"Received: shape={image.shape}, dtype={image.dtype}"
            )
    if image_size is not None:
        size = size_pair(image_size)
        images = [resize(image, size, nearest=False) for image in images]
    return images


def _spread(count, limit):
    if count <= limit:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, limit)})


class DomainStyle:
    """Restyles images towards a domain given reference images of it.

    Args:
        method: ``"fda"``, ``"histogram"`` or ``"pda"`` (albumentations class
            names are accepted too).
        references: Target-domain images: a folder, a ``Split``, an array or
            a list of arrays (see ``load_references``).
        p: Probability of restyling each image. Defaults to ``1.0``.
        max_references: Defaults to ``64``.
        reference_size: Resize references on load (int or pair), or ``None``.
            Defaults to ``None``.
        **transform_kwargs: Passed to the albumentations transform, e.g.
            ``beta_limit=(0.0, 0.05)`` for FDA, ``blend_ratio=(0.5, 1.0)`` for
            histogram matching and PDA, ``transform_type="standard"`` for PDA.

    Raises:
        InvalidArgumentError: for an unknown method or a bad ``p``.
        DataError: when the references cannot be read.
    """

    def __init__(
        self,
        method,
        references,
        *,
        p=1.0,
        max_references=64,
        reference_size=None,
        **transform_kwargs,
    ):
        key = _ALIASES.get(str(method).lower())
        if key is None:
            raise InvalidArgumentError(
                f"`method` must be one of {sorted(METHODS)}. "
                f"Received: method={method!r}"
            )
        if not 0.0 <= float(p) <= 1.0:
            raise InvalidArgumentError(f"`p` must be in [0, 1]. Received: p={p!r}")
        for forbidden in ("reference_images", "read_fn", "metadata_key", "p"):
            if forbidden in transform_kwargs:
                raise InvalidArgumentError(
                    f"`{forbidden}` is managed by DomainStyle; pass references "
                    "as `references`."
                )
        self.method = key
        self.p = float(p)
        self.transform_kwargs = dict(transform_kwargs)
        self.references = load_references(
            references, max_references=max_references, image_size=reference_size
        )
        class_name, self._metadata_key = METHODS[key]
        if key == "pda":
            self._pda = _PixelDistribution(**self.transform_kwargs)
            self._template = None
        else:
            A = import_albumentations()
            self._template = getattr(A, class_name)(p=1.0, **self.transform_kwargs)
        self._local = threading.local()

    def __repr__(self):
        return (
            f"DomainStyle(method={self.method!r}, "
            f"references={len(self.references)}, p={self.p})"
        )

    def _transform(self):
        transform = getattr(self._local, "transform", None)
        if transform is None:
            transform = copy.deepcopy(self._template)
            self._local.transform = transform
        return transform

    def apply(self, image, *, seed=0):
        """Restyles one ``uint8 (H, W, 3)`` image; deterministic for a seed."""
        words = [int(s) & 0xFFFFFFFF for s in np.atleast_1d(seed)]
        rng = np.random.default_rng([0x57_1E, *words])
        if rng.random() >= self.p:
            return image
        reference = self.references[int(rng.integers(len(self.references)))]
        if self._template is None:
            return self._pda(image, reference, rng)
        transform = self._transform()
        reseed(transform, [0x57_1E, *words, 1])
        out = transform(image=image, **{self._metadata_key: [reference]})["image"]
        return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))

    def __call__(self, images, *, seed=0):
        """Restyles a batch ``(N, H, W, 3)`` (or one image); returns uint8."""
        images = np.asarray(images)
        if images.ndim == 3:
            return self.apply(images, seed=[seed, 0])
        return np.stack(
            [self.apply(image, seed=[seed, i]) for i, image in enumerate(images)]
        )


class ColourRandomization:
    """Domain randomisation of colour: no references, every image its own look.

    Each image gets a random permutation of its three colour channels (one
    of 6, uniform) and, with probability ``invert``, is inverted
    (``255 - x``). Global restyling (FDA, histogram matching, PDA) moves a
    source image's colours towards the target's as a whole; where each class
    changes its colour in its own way (the built-in benchmark's target
    reuses source colours for other classes), it cannot undo that, and a
    model trained on randomised colours has to use shape and layout instead
    (domain randomisation: Tobin et al. 2017; Yue et al., ICCV 2019).

    Args:
        invert: probability of inverting an image. Defaults to 0.3.

    Example:

    >>> import numpy as np
    >>> image = np.zeros((2, 2, 3), np.uint8); image[..., 0] = 200
    >>> out = ColourRandomization(invert=0.0).apply(image, seed=1)
    >>> sorted(out[0, 0].tolist())
    [0, 0, 200]
    """

    method = "random-colour"

    def __init__(self, invert=0.3):
        if not 0.0 <= float(invert) <= 1.0:
            raise InvalidArgumentError(
                f"`invert` must be in [0, 1]. Received: invert={invert!r}"
            )
        self.invert = float(invert)

    def __repr__(self):
        return f"ColourRandomization(invert={self.invert})"

    def apply(self, image, *, seed=0):
        """Randomises one ``uint8 (H, W, 3)`` image; deterministic for a seed."""
        words = [int(s) & 0xFFFFFFFF for s in np.atleast_1d(seed)]
        rng = np.random.default_rng([0xC0_10, *words])
        out = np.asarray(image)[..., rng.permutation(3)]
        if rng.random() < self.invert:
            out = 255 - out
        return np.ascontiguousarray(out.astype(np.uint8))

    def __call__(self, images, *, seed=0):
        """Randomises a batch ``(N, H, W, 3)`` (or one image)."""
        images = np.asarray(images)
        if images.ndim == 3:
            return self.apply(images, seed=[seed, 0])
        return np.stack(
            [self.apply(image, seed=[seed, i]) for i, image in enumerate(images)]
        )


class _PixelDistribution:
    """Pixel distribution adaptation in pixel units (0..255), numpy only.

    The image's pixels are standardised with a transform fitted to the image
    and mapped back with the same kind of transform fitted to the reference,
    then blended with the original by a ratio drawn from ``blend_ratio``.
    """

    def __init__(self, blend_ratio=(0.25, 1.0), transform_type="pca"):
        if transform_type not in ("pca", "standard", "minmax"):
            raise InvalidArgumentError(
                "`transform_type` must be 'pca', 'standard' or 'minmax'. "
                f"Received: transform_type={transform_type!r}"
            )
        low, high = (
            (blend_ratio, blend_ratio) if np.isscalar(blend_ratio) else blend_ratio
        )
        if not 0.0 <= float(low) <= float(high) <= 1.0:
            raise InvalidArgumentError(
                "`blend_ratio` must be a (low, high) pair in [0, 1]. "
                f"Received: blend_ratio={blend_ratio!r}"
            )
        self.blend_ratio = (float(low), float(high))
        self.transform_type = transform_type

    def _fit(self, pixels):
        mean = pixels.mean(0)
        if self.transform_type == "standard":
            scale = pixels.std(0) + 1e-6
            return mean, np.diag(1.0 / scale), np.diag(scale)
        if self.transform_type == "minmax":
            low, high = pixels.min(0), pixels.max(0)
            span = np.maximum(high - low, 1e-6)
            # express as an affine map around `low` (mean slot holds `low`)
            return low, np.diag(1.0 / span), np.diag(span)
        covariance = np.cov(pixels - mean, rowvar=False) + 1e-6 * np.eye(3)
        values, vectors = np.linalg.eigh(covariance)
        # a fixed sign per component, so image and reference axes agree
        vectors = vectors * np.where(vectors.sum(0) < 0, -1.0, 1.0)
        scale = np.sqrt(np.maximum(values, 1e-6))
        return mean, vectors / scale, (vectors * scale).T

    def __call__(self, image, reference, rng):
        pixels = image.reshape(-1, 3).astype(np.float64)
        ref = reference.reshape(-1, 3).astype(np.float64)
        mean, forward, _ = self._fit(pixels)
        ref_mean, _, backward = self._fit(ref)
        adapted = (pixels - mean) @ forward @ backward + ref_mean
        weight = rng.uniform(*self.blend_ratio)
        out = pixels * (1.0 - weight) + adapted * weight
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return out.reshape(image.shape)
