"""Specs of the field's data sets read in their own folder layouts.

``NAME:PATH[:OPTION[:OPTION]]`` names a data set kept as it is distributed
(``klseg.data.layouts`` reads it):

- ``cityscapes:PATH[:SPLIT]`` (split ``train`` by default);
- ``gta5:PATH``;
- ``synthia:PATH[:16|13]`` (16 classes by default, or the 13-class subset);
- ``acdc:PATH[:CONDITION[:SPLIT]]`` (condition ``fog``, ``night``, ``rain``,
  ``snow`` or ``all`` (default), split ``train`` by default);
- ``darkzurich:PATH[:SPLIT]`` (split ``val`` by default);
- ``voc:PATH[:SPLIT]`` (split ``train`` by default);
- ``ade20k:PATH[:SPLIT]`` (``training`` (default) or ``validation``).

Options are read from the right and hold no path separator, so a ``PATH``
may itself hold ``:`` (``C:\\data``) when an option follows it or none can.

Standard library only (the output-folder checks read specs with it).
"""

from __future__ import annotations

from typing import NamedTuple

from klseg.errors import DataError

__all__ = [
    "LAYOUTS",
    "LayoutSpec",
    "is_layout_spec",
    "layout_spec_path",
    "parse_layout_spec",
]

#: ``{name: ((option, default, choices or None), ...)}`` of every layout.
LAYOUTS = {
    "cityscapes": (("split", "train", None),),
    "gta5": (),
    "synthia": (("classes", "16", ("16", "13")),),
    "acdc": (
        ("condition", "all", ("fog", "night", "rain", "snow", "all")),
        ("split", "train", None),
    ),
    "darkzurich": (("split", "val", None),),
    "voc": (("split", "train", None),),
    "ade20k": (("split", "training", ("training", "validation")),),
}


class LayoutSpec(NamedTuple):
    """A parsed spec: the layout, its folder and its options by name."""

    layout: str
    path: str
    options: dict


def syntax(layout):
    """``"acdc:PATH[:CONDITION[:SPLIT]]"``: how a layout's spec is written."""
    tail = "".join(f"[:{name.upper()}" for name, _, _ in LAYOUTS[layout])
    return f"{layout}:PATH{tail}{']' * len(LAYOUTS[layout])}"


def is_layout_spec(spec):
    """Whether ``spec`` is a string that starts with a layout name and ``:``.

    Example:

    >>> is_layout_spec("cityscapes:/data/cityscapes:val"), is_layout_spec("d/val")
    (True, False)
    """
    if not isinstance(spec, str):
        return False
    name, colon, _ = spec.partition(":")
    return bool(colon) and name in LAYOUTS


def parse_layout_spec(spec):
    """Splits a layout spec into its layout, folder and options.

    Returns:
        A ``LayoutSpec`` whose ``options`` hold every option of the layout
        (the defaults where the spec gives none).

    Raises:
        DataError: not a layout spec, no folder, an empty option, or an
            option outside its choices.

    Example:

    >>> parse_layout_spec("acdc:/data/acdc:night")
    LayoutSpec(layout='acdc', path='/data/acdc', options={'condition': 'night', \
'split': 'train'})
    """
    if not is_layout_spec(spec):
        raise DataError(
            f"{spec!r}: not a data set spec; expected one of "
            f"{', '.join(syntax(name) for name in LAYOUTS)}."
        )
    layout, _, body = spec.partition(":")
    fields = LAYOUTS[layout]
    parts = body.split(":")
    given = []
    while len(parts) > 1 and len(given) < len(fields):
        if "/" in parts[-1] or "\\" in parts[-1]:
            break
        given.insert(0, parts.pop())
    path = ":".join(parts)
    if not path:
        raise DataError(f"{spec!r}: no folder; expected {syntax(layout)}.")
    options = {}
    for index, (name, default, choices) in enumerate(fields):
        value = given[index] if index < len(given) else default
        if not value:
            raise DataError(
                f"{spec!r}: the {name} is empty; expected {syntax(layout)}."
            )
        if choices is not None and value not in choices:
            raise DataError(
                f"{spec!r}: {value!r} is not a valid {name} for {layout} (choose "
                f"from {', '.join(choices)}); expected {syntax(layout)}."
            )
        options[name] = value
    return LayoutSpec(layout, path, options)


def layout_spec_path(spec):
    """The folder a layout spec reads, or ``None`` for anything else.

    Example:

    >>> layout_spec_path("gta5:/data/gta5"), layout_spec_path("tfds:x")
    ('/data/gta5', None)
    """
    if not is_layout_spec(spec):
        return None
    try:
        return parse_layout_spec(spec).path
    except DataError:
        return None
