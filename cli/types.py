"""Click parameter types of the ``klseg`` command line."""

import math

import click

from klseg.paths import not_regular_file
from klseg.registry import LIMITS

__all__ = [
    "FilePath",
    "FiniteFloat",
    "FloatList",
    "ImageSize",
    "NameList",
    "MixedPrecision",
    "TileSize",
]


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class FiniteFloat(click.FloatRange):
    """A finite float, optionally within bounds (``nan`` and ``inf`` refused).

    Takes the arguments of ``click.FloatRange`` (``min``, ``max``,
    ``min_open``, ``max_open``, ``clamp``) and shows the range in ``--help``
    the same way. ``click.FloatRange`` lets ``nan`` through every bound (a
    comparison with NaN is false) and ``inf`` through an open upper end; this
    type refuses both, and refuses ``True``/``False`` (a ``bool`` is an
    ``int`` in Python, so a config file's ``true`` would otherwise read as 1).

    Example:

    >>> FiniteFloat(min=0, min_open=True).convert("0.5", None, None)
    0.5
    """

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number.", param, ctx)
        number = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class FloatList(click.ParamType):
    """One number or a comma-separated list of numbers, each >= ``minimum``.

    Accepts ``"0.3"``, ``"0,0.1,0.3,1"`` and, from config files, a number or a
    list of numbers (not strings, not booleans). Converts to a tuple of floats
    in the order given; the config refuses a repeated value and two values
    that would name one sweep folder (``klseg.runs.configs.bounds``), so the
    command line and Python meet one rule.
    """

    name = "FLOAT[,FLOAT...]"

    def __init__(self, minimum=0.0):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, tuple) and all(isinstance(v, float) for v in value):
            items = value
        elif isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]
        elif isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
            if any(v == "" for v in items):
                self.fail(
                    f"{value!r} has an empty entry; write numbers separated by "
                    "commas, e.g. 0,0.1,0.3,1.",
                    param,
                    ctx,
                )
        else:
            self.fail(f"{value!r} is not a number or a list of numbers.", param, ctx)
        from_text = isinstance(value, str)
        result = []
        for item in items:
            if isinstance(item, bool) or not (from_text or _is_real(item)):
                self.fail(f"{item!r} is not a number.", param, ctx)
            try:
                number = float(item)
            except (TypeError, ValueError):
                self.fail(f"{item!r} is not a number.", param, ctx)
            if not math.isfinite(number) or number < self.minimum:
                self.fail(
                    f"{item!r} must be a finite number >= {self.minimum:g}.",
                    param,
                    ctx,
                )
            result.append(number)
        if not result:
            self.fail("give at least one number.", param, ctx)
        return tuple(result)


class NameList(click.ParamType):
    """Comma-separated names (``sky,road,car``); a list of strings in files."""

    name = "NAME[,NAME...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, str) for v in value):
                self.fail(f"{value!r} holds a name that is not a string.", param, ctx)
            items = [v.strip() for v in value]
        elif isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        else:
            self.fail(f"{value!r} is not a list of names.", param, ctx)
        if not items or any(not v for v in items):
            self.fail(f"{value!r} has an empty name.", param, ctx)
        if len(set(items)) != len(items):
            self.fail(f"{value!r} repeats a name.", param, ctx)
        return tuple(items)


class MixedPrecision(click.Choice):
    """``off``, ``auto``, ``float16`` or ``bfloat16``; a bare flag means auto.

    Config files may also say ``true`` (auto) or ``false`` (off).

    Args:
        choices: the modes, from the registry
            (``klseg.registry.MIXED_PRECISION``): the CLI keeps no copy.
    """

    def __init__(self, choices):
        super().__init__(tuple(choices), case_sensitive=False)

    def convert(self, value, param, ctx):
        if value is True:
            return "auto"
        if value is False or value is None:
            return "off"
        return super().convert(value, param, ctx)


class ImageSize(click.ParamType):
    """``HxW`` (``512x1024``) or ``N`` for a square; a pair of positive ints.

    Config files may also give an integer, a ``"HxW"`` string or a list
    ``[H, W]`` of integers. Whether the sides fit the model (multiples of its
    size multiple) is checked once the model is loaded.

    Args:
        minimum: the smallest side accepted. Defaults to 1.
        maximum: the largest side accepted. Defaults to the ``image_side``
            limit of ``klseg.registry.LIMITS``.

    Example:

    >>> ImageSize().convert("512x1024", None, None), ImageSize().convert(64, None, None)
    ((512, 1024), (64, 64))
    """

    name = "HxW"
    #: What the value is, in messages.
    noun = "image size"

    def __init__(self, minimum=1, maximum=None):
        self.minimum = minimum
        self.maximum = LIMITS["image_side"][1] if maximum is None else maximum

    def get_metavar(self, param, ctx=None):
        return "HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple) and len(value) == 2:
            items = list(value)
        elif isinstance(value, list):
            items = value
        elif _is_real(value):
            items = [value, value]
        elif isinstance(value, str):
            text = value.strip().lower()
            items = text.split("x") if "x" in text else [text, text]
            try:
                items = [int(v.strip()) for v in items]
            except ValueError:
                self.fail(
                    f"{value!r} is not {self.a_noun}; write HxW (e.g. 512x1024) "
                    "or one integer for a square.",
                    param,
                    ctx,
                )
        else:
            self.fail(f"{value!r} is not {self.a_noun} (HxW or N).", param, ctx)
        if len(items) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in items
        ):
            self.fail(
                f"{value!r} is not {self.a_noun}; give two integers [H, W] or "
                "one integer.",
                param,
                ctx,
            )
        if min(items) < 1:
            self.fail(f"{value!r}: the sides must be positive.", param, ctx)
        if min(items) < self.minimum:
            self.fail(
                f"{value!r}: each side must be at least {self.minimum}.", param, ctx
            )
        if max(items) > self.maximum:
            self.fail(
                f"{value!r}: each side must be at most {self.maximum}.", param, ctx
            )
        return (items[0], items[1])

    @property
    def a_noun(self):
        return f"an {self.noun}" if self.noun[0] in "aeiou" else f"a {self.noun}"


class TileSize(ImageSize):
    """``HxW`` (``512x256``) or ``N`` for a square: a window size.

    As :class:`ImageSize`.

    Example:

    >>> TileSize().convert("512x256", None, None), TileSize().convert(64, None, None)
    ((512, 256), (64, 64))
    """

    noun = "tile size"


class FilePath(click.Path):
    """A path that must be a regular file when it exists.

    A missing path passes (the command says "not found" when it reads it);
    a folder, a device (``/dev/zero``), a pipe or a socket is refused at
    once with "not a regular file", before anything opens it. Symbolic
    links are followed.

    Example:

    >>> FilePath().convert("classes.json", None, None)
    'classes.json'
    """

    def __init__(self):
        super().__init__(path_type=str)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        problem = not_regular_file(path)
        if problem:
            self.fail(f"{path!r} is not a regular file ({problem}).", param, ctx)
        return path
