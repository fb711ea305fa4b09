"""The one image reader: which files are images, and how they are decoded.

Every part of klseg that reads images from disk (folder splits, domain-style
references, ``klseg predict``) lists them with ``list_images`` and decodes
them with ``read_image``, so all of them accept the same files:

- ``IMAGE_SUFFIXES``: ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``,
  ``.tiff``, ``.webp`` (lower or upper case), 8 bits per channel, grey, RGB
  or RGBA (converted to RGB);
- ``MASK_SUFFIXES``: ``.png`` only; a mask must be lossless and hold class
  indices (8 or 16 bit, or palette indices).

This module uses numpy, and Pillow inside the functions that decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from klseg.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "check_unique_stems",
    "image_size",
    "list_images",
    "list_masks",
    "read_image",
    "read_mask",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png",)

# Pillow modes with more than 8 bits per channel: converting them to RGB
# clips every value above 255, so they are refused instead.
_WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def _pil():
    from PIL import Image

    return Image


def _files_with_suffixes(folder, suffixes):
    return sorted(
        path
        for path in Path(folder).iterdir()
        if not path.name.startswith(".")
        and path.suffix.lower() in suffixes
        and path.is_file()
    )


def list_images(folder, *, unique_stems=False):
    """Lists the images of a folder, sorted by file name.

    Args:
        folder: A folder of images, or a folder holding an ``images/``
            subfolder (then that subfolder is listed).
        unique_stems: Also refuse two images with one file stem (``x.jpg``
            and ``x.png``), whose outputs or masks would share a name.
            Defaults to ``False``.

    Returns:
        A sorted list of ``pathlib.Path``, one per file whose suffix is in
        ``IMAGE_SUFFIXES``; hidden files are skipped.

    Raises:
        DataError: the folder is missing, not a folder, or holds no images
            (naming the folder), or two images share a stem (naming both).

    Example:

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("b.JPG", "a.png", "notes.txt"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> [path.name for path in list_images(folder)]
    ['a.png', 'b.JPG']
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist.")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images.")
    if (folder / "images").is_dir():
        folder = folder / "images"
    paths = _files_with_suffixes(folder, IMAGE_SUFFIXES)
    if not paths:
        raise DataError(
            f"{folder}: no images found (expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)})."
        )
    if unique_stems:
        check_unique_stems(paths)
    return paths


def list_masks(folder):
    """Lists the mask files (``MASK_SUFFIXES``) of a folder, sorted by name.

    Raises:
        DataError: the folder is missing (naming it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: mask folder does not exist.")
    return _files_with_suffixes(folder, MASK_SUFFIXES)


def check_unique_stems(paths, *, what="images"):
    """Refuses two paths with the same file stem (``x.jpg`` and ``x.png``).

    Files named after their image (masks, predictions) would otherwise
    overwrite each other.

    Args:
        paths: Paths to check.
        what: What the files are, for the message. Defaults to ``"images"``.

    Returns:
        ``{stem: path}`` in the order of ``paths``.

    Raises:
        DataError: naming both files of the first clash.

    Example:

    >>> sorted(check_unique_stems(["a.png", "b.png"]))
    ['a', 'b']
    """
    by_stem = {}
    for path in paths:
        path = Path(path)
        if path.stem in by_stem:
            first = by_stem[path.stem]
            raise DataError(
                f"{path.parent}: two {what} share the stem {path.stem!r} "
                f"({first.name}, {path.name}): {first} and {path}; files named "
                "after them would overwrite each other. Rename one."
            )
        by_stem[path.stem] = path
    return by_stem


def read_image(path):
    """Decodes an image file to ``uint8 (H, W, 3)`` RGB.

    Grey images are repeated to three channels; an alpha channel is dropped;
    a palette image gives its colours. EXIF orientation is not applied (masks
    carry none), as in ``tf.io.decode_jpeg``. A multi-frame file (TIFF, WebP)
    gives its first frame.

    Raises:
        DataError: the file is missing, corrupt, not an image, or has more
            than 8 bits per channel (naming the file).
    """
    Image = _pil()
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _WIDE_MODES:
                raise DataError(
                    f"{path}: image has mode {image.mode!r} (more than 8 bits per "
                    "channel); klseg reads 8-bit images. Convert it to 8 bits."
                )
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot decode image ({error}).") from None


def image_size(path, *, full=True):
    """Returns ``(width, height)`` of an image file.

    Args:
        path: The file.
        full: Decode the whole image (finds any corruption); with ``False``
            only the header is read and verified. Defaults to ``True``.

    Raises:
        DataError: naming the file, as ``read_image``.
    """
    if full:
        image = read_image(path)
        return image.shape[1], image.shape[0]
    Image = _pil()
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot decode image ({error}).") from None


def read_mask(path):
    """Decodes a mask file to an integer ``(H, W)`` array of raw values.

    Single-channel PNGs (8 or 16 bit) give their values, palette PNGs their
    palette indices. A colour mask whose three channels are equal is read as
    grey; any other colour mask is rejected.

    Raises:
        DataError: the file is missing, corrupt, or a colour mask (naming it).
    """
    Image = _pil()
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "1":
                return np.asarray(image, dtype=np.uint8)
            if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                array = np.asarray(image)
                if array.dtype.kind not in "ui" or array.dtype.itemsize > 2:
                    array = array.astype(np.int32)
                return array
            if mode in ("RGB", "RGBA", "LA"):
                array = np.asarray(image)
                channels = array[..., :3] if mode != "LA" else array[..., :1]
                if mode == "LA" or (
                    np.array_equal(channels[..., 0], channels[..., 1])
                    and np.array_equal(channels[..., 0], channels[..., 2])
                ):
                    return np.ascontiguousarray(channels[..., 0])
            raise DataError(
                f"{path}: mask has mode {mode!r} with colours; klseg expects a "
                "single-channel or palette PNG of class indices. Convert colours "
                "to indices first (or save as a palette PNG)."
            )
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot decode mask ({error}).") from None
