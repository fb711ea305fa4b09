"""Checks of config fields: each raises ``klseg.errors.InvalidArgumentError``
naming the field and the value. Standard library only, like
:mod:`klseg.runs.config`.
"""

import math
import os

from klseg import errors

__all__ = [
    "check_choice",
    "check_flag",
    "check_int",
    "check_model_source",
    "check_names",
    "check_number",
    "check_path",
    "check_positive",
    "fail",
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
    """A path to a .keras file, or a keras.Model (checked when loaded)."""
    if value is None or (isinstance(value, (str, os.PathLike)) and not str(value)):
        return False
    if isinstance(value, (bool, int, float, list, tuple, dict)):
        fail(
            f"{name} must be a .keras path or a keras.Model. Received: {name}={value!r}"
        )
    return True
