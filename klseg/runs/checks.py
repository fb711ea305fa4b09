"""Checks of config fields: each raises ``klseg.errors.InvalidArgumentError``
naming the field and the value. Standard library only, like
:mod:`klseg.runs.configs`.
"""

import math
import os

from klseg import errors
from klseg.runs.hub import HUB_PREFIX, is_hub_spec

__all__ = [
    "check_choice",
    "check_crop_fits",
    "check_flag",
    "check_int",
    "check_model_name",
    "check_model_source",
    "check_names",
    "check_number",
    "check_path",
    "check_positive",
    "check_size",
    "fail",
    "size_pair",
    "size_text",
]


def fail(message):
    raise errors.InvalidArgumentError(message)


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        fail(
            f"{name} must be one of {', '.join(map(str, choices))}. "
            f"Received: {name}={value!r}"
        )


def check_int(name, value, *, minimum=None, maximum=None, allow_none=False):
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        if minimum == 1 and maximum is None:
            what = "a positive integer"
        elif minimum is not None and maximum is not None:
            what = f"an integer in {minimum}..{maximum}"
        elif minimum is not None:
            what = f"an integer >= {minimum}"
        else:
            what = "an integer"
        fail(f"{name} must be {what}. Received: {name}={value!r}")


def check_positive(name, value, *, allow_none=False, integer=True):
    if integer:
        check_int(name, value, minimum=1, allow_none=allow_none)
    else:
        check_number(name, value, minimum=0, open_min=True, allow_none=allow_none)


def check_number(
    name, value, *, minimum=None, open_min=False, maximum=None, allow_none=False
):
    """A finite int or float within the bounds (NaN and inf are refused)."""
    if value is None and allow_none:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (minimum is None or value > minimum or (value == minimum and not open_min))
        and (maximum is None or value <= maximum)
    )
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if open_min else '>='} {minimum:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        what = " and ".join(bounds)
        fail(
            f"{name} must be a finite number{' ' + what if what else ''}. "
            f"Received: {name}={value!r}"
        )


def check_path(name, value, *, allow_none=True):
    if value is None and allow_none:
        return
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        fail(f"{name} must be a path (a string). Received: {name}={value!r}")


def size_text(size):
    """``"HxW"`` for a size ``(h, w)``, ``"N"`` for a square given as ``N``."""
    if isinstance(size, (tuple, list)):
        return "x".join(str(v) for v in size)
    return str(size)


def _size_sides(value):
    if isinstance(value, str):
        text = value.strip().lower()
        parts = text.split("x") if "x" in text else [text]
        if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
            return None
        return [int(p) for p in parts]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
    return None


def check_size(name, value, *, minimum=1, allow_none=True):
    """An image size: ``N`` (a square), ``(H, W)``, ``[H, W]`` or ``"HxW"``.

    Returns:
        ``None``, an int for a square, or a ``(height, width)`` tuple: one
        form per size, so a size saved in ``config.yaml`` as ``[64, 128]``
        equals ``(64, 128)`` and ``"64x64"`` equals ``64``.
    """
    if value is None and allow_none:
        return None
    sides = _size_sides(value)
    if sides is None or min(sides) < minimum:
        fail(
            f"{name} must be HxW (e.g. 512x1024), a pair (height, width) or one "
            f"integer for a square, each side an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    if len(sides) == 1 or sides[0] == sides[1]:
        return sides[0]
    return (sides[0], sides[1])


def size_pair(size):
    """``(height, width)`` of a size checked by :func:`check_size`."""
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def check_crop_fits(crop_size, image_size, *, where="image_size"):
    """Refuse a crop larger than the image in height or width."""
    crop, image = size_pair(crop_size), size_pair(image_size)
    if crop[0] > image[0] or crop[1] > image[1]:
        fail(
            f"crop_size must fit in the {where} {size_text(image)} (height "
            "and width each at most the image's). "
            f"Received: crop_size={size_text(crop_size)}"
        )


def check_flag(name, value):
    if not isinstance(value, bool):
        fail(f"{name} must be True or False. Received: {name}={value!r}")


def check_names(name, value):
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        fail(f"{name} must be a list of names. Received: {name}={value!r}")
    names = tuple(str(c) for c in value)
    if not names:
        fail(f"{name} must not be empty. Received: {name}=()")
    if len(set(names)) != len(names):
        fail(f"{name} repeats a name. Received: {name}={value!r}")
    return names


def check_model_source(name, value):
    """A path to a .keras file, a ``keras-hub:PRESET_OR_DIR`` spec, or a
    keras.Model (checked when loaded)."""
    if value is None or (isinstance(value, (str, os.PathLike)) and not str(value)):
        return False
    if isinstance(value, (bool, int, float, list, tuple, dict)):
        fail(
            f"{name} must be a .keras path, keras-hub:PRESET_OR_DIR or a "
            f"keras.Model. Received: {name}={value!r}"
        )
    if is_hub_spec(value) and not value[len(HUB_PREFIX) :].strip():
        fail(
            f"{name} names no KerasHub preset: write keras-hub:PRESET_NAME or "
            f"keras-hub:DIR. Received: {name}={value!r}"
        )
    return True


def check_model_name(name, value, choices):
    """A registry name (one of ``choices``) or ``keras-hub:PRESET_OR_DIR``."""
    if is_hub_spec(value):
        if not value[len(HUB_PREFIX) :].strip():
            fail(
                f"{name} names no KerasHub preset: write keras-hub:PRESET_NAME "
                f"or keras-hub:DIR. Received: {name}={value!r}"
            )
        return
    if not isinstance(value, str) or value not in choices:
        fail(
            f"{name} must be one of {', '.join(map(str, choices))}, or "
            f"keras-hub:PRESET_OR_DIR (a KerasHub image segmenter). "
            f"Received: {name}={value!r}"
        )
