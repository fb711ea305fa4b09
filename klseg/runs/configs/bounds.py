"""The bounds of the configs' numbers (``klseg.registry.LIMITS``) and the
names of a sweep's run folders. Standard library only, like the configs.

Each check raises ``klseg.errors.InvalidArgumentError`` naming the field and
the value, so the command line exits 2 before any work.
"""

from klseg.registry import LIMITS
from klseg.runs.checks import check_number, fail, size_pair, size_text

__all__ = [
    "check_bounded",
    "check_bounded_number",
    "check_side_limit",
    "check_weight_folders",
    "weight_text",
]

#: The prefix of each weight list's part of a sweep's run folder names.
_FOLDER_PREFIX = {"kl_weight": "kl_", "consistency_weight": "cons_"}


def check_bounded(name, value, *, limit=None, minimum=None, allow_none=False):
    """An integer within ``LIMITS[limit or name]`` (both ends included).

    Args:
        name: the field, in the message.
        value: the value.
        limit: the entry of ``LIMITS`` when it is not ``name``.
        minimum: a higher lowest value than the table's, for this field.
        allow_none: accept ``None``.
    """
    low, high = LIMITS[limit or name]
    if minimum is not None:
        low = max(low, minimum)
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        what = (
            f"a positive integer, at most {high:,}"
            if low == 1
            else f"an integer in {low:,}..{high:,}"
        )
        fail(f"{name} must be {what}. Received: {name}={value!r}")


def check_bounded_number(name, value, *, allow_none=False):
    """A finite number within ``LIMITS[name]`` (both ends included)."""
    low, high = LIMITS[name]
    check_number(name, value, minimum=low, maximum=high, allow_none=allow_none)


def check_side_limit(name, size):
    """Refuse a size (as ``check_size`` returns it) with a side above the
    ``image_side`` limit."""
    if size is None:
        return
    high = LIMITS["image_side"][1]
    if max(size_pair(size)) > high:
        fail(
            f"{name} must have sides of at most {high} pixels. "
            f"Received: {name}={size_text(size)}"
        )


def weight_text(weight):
    """A weight as a sweep's folder names and labels write it (``0.3``,
    ``1e-05``): six significant digits, so two weights that agree in those
    would share a folder (:func:`check_weight_folders` refuses them).

    Example:

    >>> weight_text(0.3), weight_text(1.0), weight_text(1e-5)
    ('0.3', '1', '1e-05')
    """
    return f"{weight:g}"


def mode_defaults_text(mode, applied):
    """``defaults of the MODE mode: k=v, ...`` for the options a mode's
    recipe filled in (``applied``: ``{option: value}``), as the runs of
    ``klseg finetune`` and ``klseg adapt`` say it."""
    values = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in applied.items()
    )
    return f"defaults of the {mode} mode: {values}"


def check_weight_folders(name, weights):
    """Refuse a list of weights that repeats a value, or holds two values
    whose run folders would share a name (``0.3`` and
    ``0.30000000000000004`` both write ``kl_0.3/``): the second run would
    never train."""
    seen = {}
    for weight in weights:
        text = weight_text(weight)
        if text in seen:
            first = seen[text]
            if first == weight:
                fail(
                    f"{name} gives {text} twice; give each weight once. "
                    f"Received: {name}={_listed(weights)}"
                )
            fail(
                f"{name} values {first!r} and {weight!r} would write one run "
                f"folder, {_FOLDER_PREFIX.get(name, '')}{text}/ (folder names "
                "keep 6 significant digits); give weights that differ there. "
                f"Received: {name}={_listed(weights)}"
            )
        seen[text] = weight


def _listed(weights):
    return ",".join(repr(w) for w in weights)
