"""Class maps and mask values: which class each raw mask value becomes.

A leaf module (numpy only): every other data module may import it, and it
imports none of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from klseg.errors import DataError
from klseg.paths import not_regular_file

__all__ = [
    "apply_class_map",
    "class_map_lut",
    "find_classes_json",
    "format_offenders",
    "load_class_map",
    "mask_values",
]


def load_class_map(class_map):
    """Reads a class map.

    A class map says which class each raw mask value becomes. Accepted forms:

    - a dict ``{raw value: class index}`` (keys may be strings of integers);
    - a JSON file holding such a dict, or an object
      ``{"map": {...}, "class_names": [...]}``.

    A raw value may map to the ignore value (for example a border label).
    The ignore value itself stays ignored unless the map names it.

    Returns:
        ``(mapping, class_names)`` with ``mapping`` a ``{int: int}`` dict and
        ``class_names`` a list or ``None``.

    Raises:
        DataError: the file is missing, not a regular file (a folder, a
            device such as ``/dev/zero``), larger than 64 MiB or not valid
            JSON, or an entry is not an integer.

    Example:

    >>> load_class_map({"0": 0, "15": 1})
    ({0: 0, 15: 1}, None)
    """
    source = "class_map"
    class_names = None
    if isinstance(class_map, (str, Path)):
        source = str(class_map)
        class_map = _read_json_file(Path(class_map))
    if not isinstance(class_map, Mapping):
        raise DataError(
            f"{source}: a class map must be a JSON object / dict of "
            f"{{raw value: class index}}. Received: {type(class_map).__name__}"
        )
    if "map" in class_map:
        class_names = class_map.get("class_names")
        class_map = class_map["map"]
        if not isinstance(class_map, Mapping):
            raise DataError(f"{source}: 'map' must be an object of raw value: class.")
    mapping = {}
    for key, value in class_map.items():
        try:
            raw, target = int(key), int(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: class map entries must be integers; got {key!r}: {value!r}."
            ) from None
        if raw < 0 or target < 0:
            raise DataError(
                f"{source}: class map values must be >= 0; got {key!r}: {value!r}."
            )
        mapping[raw] = target
    if class_names is not None:
        class_names = [str(name) for name in class_names]
    return mapping, class_names


#: The largest class map file read (bytes): a map of every 16-bit mask value
#: takes about 1 MB.
_MAX_CLASS_MAP_BYTES = 64 << 20


def _read_json_file(path):
    kind = not_regular_file(path)
    if kind:
        raise DataError(
            f"{path}: class map is not a regular file ({kind}); give a JSON file."
        )
    if not path.exists():
        raise DataError(f"{path}: class map file not found.")
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_CLASS_MAP_BYTES + 1)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read class map ({error.strerror or error})."
        ) from None
    if len(data) > _MAX_CLASS_MAP_BYTES:
        raise DataError(
            f"{path}: class map has more than {_MAX_CLASS_MAP_BYTES >> 20} MiB; "
            "a class map of every 16-bit mask value takes about 1 MB."
        )
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise DataError(f"{path}: class map is not valid JSON ({error}).") from None


def class_map_lut(mapping):
    """A lookup table ``lut[raw] = class`` with ``-1`` for unmapped values.

    Example:

    >>> class_map_lut({0: 0, 3: 1}).tolist()
    [0, -1, -1, 1]
    """
    size = max(mapping) + 1 if mapping else 1
    lut = np.full(size, -1, dtype=np.int32)
    for raw, target in mapping.items():
        lut[raw] = target
    return lut


def apply_class_map(mask, mapping, ignore_value, lut=None):
    """Maps raw mask values to class indices.

    Values the map does not name become ``ignore_value``; the ignore value
    itself stays ignored unless the map names it. Without a map (``None``)
    the values are returned as ``int32`` unchanged.

    Args:
        mask: Integer array of raw values.
        mapping: ``{raw: class}`` or ``None``.
        ignore_value: The ignore value.
        lut: ``class_map_lut(mapping)``, when the caller keeps one.

    Returns:
        An ``int32`` array of the mask's shape.

    Example:

    >>> apply_class_map([[0, 7], [9, 255]], {0: 0, 7: 1}, 255).tolist()
    [[0, 1], [255, 255]]
    """
    mask = np.asarray(mask).astype(np.int32, copy=False)
    if mapping is None:
        return mask
    if lut is None:
        lut = class_map_lut(mapping)
    out = np.full(mask.shape, ignore_value, dtype=np.int32)
    inside = (mask >= 0) & (mask < lut.size)
    out[inside] = lut[mask[inside]]
    if ignore_value not in mapping:
        out[mask == ignore_value] = ignore_value
    out[out < 0] = ignore_value
    return out


def mask_values(mask):
    """The distinct values of an integer mask, sorted (``int64``).

    Uses a histogram when the values lie in ``[0, 65536)`` (much faster than
    sorting).

    Example:

    >>> mask_values([[3, 0], [3, 255]]).tolist()
    [0, 3, 255]
    """
    mask = np.asarray(mask)
    if mask.size and (mask.dtype.kind in "ui" or mask.dtype == np.bool_):
        low, high = int(mask.min()), int(mask.max())
        if low >= 0 and high < 1 << 16:
            counts = np.bincount(mask.ravel().astype(np.intp, copy=False))
            return np.flatnonzero(counts).astype(np.int64)
    return np.unique(mask).astype(np.int64)


def format_offenders(offenders, total):
    """``"[9] in a.png, [5, 7] in b.png and 2 more"`` for error messages.

    Args:
        offenders: ``(where, values)`` pairs, the first few found.
        total: How many places hold offending values in all.
    """
    shown = ", ".join(
        f"{[int(v) for v in values][:10]} in {where}" for where, values in offenders
    )
    more = total - len(offenders)
    return shown + (f" and {more} more" if more > 0 else "")


def find_classes_json(root):
    """Reads ``classes.json`` (as ``klseg data synth`` writes) next to a split.

    Looks in ``root``, its parent and its grandparent; returns the parsed
    object when it holds a ``class_names`` list, else ``None``.
    """
    root = Path(root)
    for folder in (root, root.parent, root.parent.parent):
        path = folder / "classes.json"
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(info, dict) and isinstance(info.get("class_names"), list):
                return info
            return None
    return None
