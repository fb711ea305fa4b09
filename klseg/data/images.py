"""The one image reader: which files are images, and how they are decoded.

Every part of klseg that reads images from disk (folder splits, domain-style
references, ``klseg predict``) lists them with ``list_images`` and decodes
them with ``read_image``, so all of them accept the same files:

- ``IMAGE_SUFFIXES``: ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``,
  ``.tiff``, ``.webp`` (lower or upper case), 8 bits per channel, grey, RGB
  or RGBA (converted to RGB);
- ``MASK_SUFFIXES``: ``.png`` only; a mask must be lossless and hold class
  indices (8 or 16 bit, or palette indices).

An image (or mask) with more than :func:`max_image_pixels` pixels is refused
from its header, naming the file, before its pixels are decoded: the limit is
``klseg.registry.MAX_IMAGE_PIXELS`` (178,956,970, Pillow's own hard limit)
unless the environment variable ``KLSEG_MAX_IMAGE_PIXELS`` sets another.

This module uses numpy, and Pillow inside the functions that decode.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np

from klseg.errors import DataError, InvalidArgumentError
from klseg.registry import IMAGE_PIXELS_VARIABLE, MAX_IMAGE_PIXELS

__all__ = [
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "check_headers",
    "check_unique_stems",
    "image_size",
    "list_images",
    "list_masks",
    "max_image_pixels",
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


def max_image_pixels():
    """The most pixels (width x height) an image klseg reads may have.

    ``KLSEG_MAX_IMAGE_PIXELS`` when set (a positive integer; ``_`` may group
    digits), else ``klseg.registry.MAX_IMAGE_PIXELS`` (178,956,970).

    Raises:
        InvalidArgumentError: the variable is set to anything else.
    """
    text = os.environ.get(IMAGE_PIXELS_VARIABLE, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise InvalidArgumentError(
            f"{IMAGE_PIXELS_VARIABLE} must be a positive integer (a pixel count). "
            f"Received: {IMAGE_PIXELS_VARIABLE}={text!r}"
        )
    return limit


@contextlib.contextmanager
def _open(path, what):
    """``PIL.Image.open`` that refuses an image over the pixel limit from its
    header (naming the file) and turns Pillow's errors into ``DataError``.

    Pillow refuses images over twice its own ``MAX_IMAGE_PIXELS`` (a
    ``DecompressionBombError``); when klseg's limit is higher, Pillow's is
    raised to match, in this process.
    """
    Image = _pil()
    limit = max_image_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = (limit + 1) // 2
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise DataError(_too_large(path, what, None, found, limit)) from None
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot decode {what} ({error}).") from None
    with image:
        width, height = image.size
        if width * height > limit:
            raise DataError(_too_large(path, what, (width, height), None, limit))
        yield image


def _too_large(path, what, size, found, limit):
    if size is not None:
        pixels = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    elif found is not None:
        pixels = f"{int(found.group(1)):,} pixels"
    else:
        pixels = "too many pixels"
    return (
        f"{path}: {what} has {pixels}, more than the limit of {limit:,} "
        f"(refused before decoding). Downscale it or tile it into smaller "
        f"files, or raise the limit with the environment variable "
        f"{IMAGE_PIXELS_VARIABLE}=N (a decoded image takes 3 bytes a pixel, "
        "more while it is resized)."
    )


def _check_bits(path, image):
    """Refuse an image of more than 8 bits per channel, from its header."""
    if image.mode in _WIDE_MODES or _wide_channels(image):
        bits = "16-bit colour" if image.mode not in _WIDE_MODES else image.mode
        raise DataError(
            f"{path}: image has more than 8 bits per channel ({bits}); klseg "
            "reads 8-bit images and refuses to clip wider values. Convert it "
            "to 8 bits per channel."
        )


def _wide_channels(image):
    """Whether a colour image stores more than 8 bits per channel (Pillow
    opens a 16-bit RGB PNG or TIFF in mode ``RGB`` and drops the low byte).

    A raw mode such as ``RGB;16B`` names the mode's own channels at 16 bits;
    ``BGR;16`` (a 16-bit-per-pixel BMP, 5 or 6 bits per channel) does not.
    """
    for tile in getattr(image, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else None
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            rawmode = args[0]
        if not rawmode or ";" not in rawmode:
            continue
        channels, _, bits = rawmode.partition(";")
        if channels == image.mode and re.match(r"(16|32|64)", bits):
            return True
    return False


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
        DataError: the file is missing, corrupt, not an image, has more
            than 8 bits per channel (grey or colour), or more pixels than
            :func:`max_image_pixels` (naming the file; the last two before
            decoding).
    """
    with _open(path, "image") as image:
        _check_bits(path, image)
        try:
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"{path}: cannot decode image ({error}).") from None


def check_headers(paths):
    """Refuses, from their headers alone, images that ``read_image`` would
    refuse for their size or bit depth (naming the first such file).

    A command calls it before it writes anything, so that an image over the
    pixel limit in the middle of a folder stops it before its output exists.
    Opens each file but decodes no pixels.

    Raises:
        DataError: as ``read_image``, for the first file that fails.
    """
    for path in paths:
        with _open(path, "image") as image:
            _check_bits(path, image)


def image_size(path, *, full=True):
    """Returns ``(width, height)`` of an image file.

    Args:
        path: The file.
        full: Decode the whole image (finds any corruption); with ``False``
            only the header is read and verified. Defaults to ``True``.

    Raises:
        DataError: naming the file, as ``read_image`` (an image over the
            pixel limit or of more than 8 bits per channel is refused in both
            cases).
    """
    if full:
        image = read_image(path)
        return image.shape[1], image.shape[0]
    with _open(path, "image") as image:
        _check_bits(path, image)
        try:
            size = image.size
            image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"{path}: cannot decode image ({error}).") from None
        return size


def read_mask(path):
    """Decodes a mask file to an integer ``(H, W)`` array of raw values.

    Single-channel PNGs (8 or 16 bit) give their values, palette PNGs their
    palette indices. A colour mask whose three channels are equal is read as
    grey; any other colour mask is rejected.

    Raises:
        DataError: the file is missing, corrupt, a colour mask, a colour
            mask of 16 bits per channel, or over the pixel limit (naming it).
    """
    with _open(path, "mask") as image:
        if _wide_channels(image):
            raise DataError(
                f"{path}: mask has {image.mode} channels of 16 bits; klseg reads "
                "masks of one channel (8 or 16 bit) or palette PNGs. Save the "
                "class indices as one channel."
            )
        try:
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
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"{path}: cannot decode mask ({error}).") from None
        raise DataError(
            f"{path}: mask has mode {mode!r} with colours; klseg expects a "
            "single-channel or palette PNG of class indices. Convert colours "
            "to indices first (or save as a palette PNG)."
        )
