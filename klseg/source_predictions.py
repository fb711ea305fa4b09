"""Source predictions computed once and stored, instead of a live source model.

``KLRegularizedModel`` can take the source model's probabilities from the
batch (``x["source_probs"]``, ``x["source_images_probs"]``) instead of
running the source model every step. :func:`store_source_predictions`
computes them once, in float16, after checking that they fit in memory
(:func:`estimate_predictions_bytes` against :func:`available_memory_bytes`).
"""

import os

import numpy as np
from keras import ops

from klseg import models as klseg_models
from klseg import progress
from klseg.errors import InvalidArgumentError, ResourceError

__all__ = [
    "available_memory_bytes",
    "estimate_predictions_bytes",
    "format_bytes",
    "store_source_predictions",
]


def estimate_predictions_bytes(num_images, height, width, num_classes):
    """Bytes needed to store source probabilities in float16."""
    return int(num_images) * int(height) * int(width) * int(num_classes) * 2


def available_memory_bytes():
    """MemAvailable from /proc/meminfo, or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n):
    """``n`` bytes as text in binary units (``"1.5 MiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def store_source_predictions(
    source,
    images,
    *,
    batch_size=16,
    max_bytes=None,
    memory_fraction=0.5,
    verbose=1,
):
    """Compute the source model's probabilities once, stored as float16.

    The memory needed (``N * H * W * C * 2`` bytes) is estimated and checked
    before any work: it must fit in ``max_bytes``, by default
    ``memory_fraction`` of the memory available now. Feed the result to
    ``klseg.data.make_dataset(split, extra_maps={"source_probs": probs},
    ...)`` so that it moves with the geometric augmentation the student
    sees (colour augmentation does not touch it: the stored predictions are
    those of the un-augmented colours), and give the batches to
    ``KLRegularizedModel`` as ``x["source_probs"]`` (or, for source-domain
    images, as ``x["source_images_probs"]``, see ``pair_batches``).

    float16 keeps about three significant digits; probabilities below about
    6e-8 are stored as 0 (a zero-probability class, which the KL loss
    handles exactly).

    Args:
        source: the source model (per-pixel logits).
        images: uint8 (or float 0..255) array ``(N, H, W, 3)``.
        batch_size: images per forward pass. Defaults to 16.
        max_bytes: memory budget in bytes for the result. Defaults to
            ``memory_fraction`` of the available memory.
        memory_fraction: share of the available memory the result may use
            when ``max_bytes`` is None. Defaults to 0.5.
        verbose: 1 prints the estimate and a progress bar. Defaults to 1.

    Returns:
        float16 numpy array ``(N, H, W, C_source)`` of probabilities.

    Raises:
        ResourceError: before any work, when the result would not fit.
        ModelError: for a model that does not output per-pixel logits.
    """
    num_classes = klseg_models.check_segmentation_model(source, "source")
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise InvalidArgumentError(
            f"`images` must be an array of shape (N, H, W, 3). Received: shape={shape}"
        )
    n, h, w = shape[:3]
    needed = estimate_predictions_bytes(n, h, w, num_classes)
    if max_bytes is None:
        available = available_memory_bytes()
        budget = None if available is None else int(available * memory_fraction)
        where = f"{memory_fraction:.0%} of the available memory"
    else:
        budget = int(max_bytes)
        where = "max_bytes"
    if verbose:
        print(
            f"Stored source predictions: {n} images x {h}x{w} x {num_classes} "
            f"classes in float16 = {format_bytes(needed)}"
            + ("" if budget is None else f" (budget {format_bytes(budget)})")
        )
    if budget is not None and needed > budget:
        raise ResourceError(
            f"Storing source predictions needs {format_bytes(needed)} "
            f"({n} images x {h}x{w} x {num_classes} classes x 2 bytes), more "
            f"than {where} ({format_bytes(budget)}). Use fewer or smaller "
            "images, or run the source model live (no stored predictions)."
        )
    out = np.empty((n, h, w, num_classes), dtype="float16")
    with progress.Progress(
        n, "Storing source predictions", unit="image", verbose=verbose
    ) as shown:
        for start in range(0, n, batch_size):
            batch = np.asarray(images[start : start + batch_size])
            logits = klseg_models.predict_logits(source, batch)
            probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
            out[start : start + len(batch)] = ops.convert_to_numpy(probs).astype(
                "float16"
            )
            shown.update(len(batch))
    return out
