"""Fitting an example to the training size: ``fit_to_size`` and friends.

A leaf module (numpy, and OpenCV inside the functions that resize).
"""

from __future__ import annotations

import numpy as np

from klseg.errors import InvalidArgumentError

__all__ = ["RESIZE_MODES", "check_resize_mode", "fit_to_size", "resize", "size_pair"]

RESIZE_MODES = ("stretch", "crop", "pad")


def size_pair(image_size):
    """``(height, width)`` from an int or a pair.

    Raises:
        InvalidArgumentError: for anything else.
    """
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        return int(image_size), int(image_size)
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            "`image_size` must be an int or a (height, width) pair. "
            f"Received: image_size={image_size!r}"
        ) from None
    return height, width


def check_resize_mode(resize):
    """Raises ``InvalidArgumentError`` unless ``resize`` is in ``RESIZE_MODES``."""
    if resize not in RESIZE_MODES:
        raise InvalidArgumentError(
            f"`resize` must be one of {list(RESIZE_MODES)}. Received: resize={resize!r}"
        )


def _cv2():
    import cv2

    return cv2


def resize(array, size, *, nearest):
    """Resizes an ``(H, W[, C])`` array to ``size`` ``(height, width)``.

    Nearest neighbour when ``nearest`` (masks), else area (down) or bilinear
    (up) interpolation.
    """
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
        image = resize(image, size, nearest=False)
        mask16 = None if mask16 is None else resize(mask16, size, nearest=True)
    else:
        h, w = image.shape[:2]
        scale = (max if mode == "crop" else min)(height / h, width / w)
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
        if mode == "crop":
            new = (max(new[0], height), max(new[1], width))
        image = resize(image, new, nearest=False)
        mask16 = None if mask16 is None else resize(mask16, new, nearest=True)
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
