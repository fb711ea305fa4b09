"""Class maps: where each source class goes among the student's classes.

A class map has one entry per source class: the index of the target class
it is merged into, or None (``-1`` once standardised) to drop it. Source
masks are mapped with :func:`map_labels` (numpy); source log-probabilities
with :func:`map_log_probs` (``keras.ops``): merged classes get the log of
their summed probabilities, dropped ones are left out.

``klseg.finetune.KLRegularizedModel`` maps the source model's predictions
this way, and ``klseg.evaluation.evaluate_domains`` the source-domain masks.
"""

import numpy as np
from keras import ops

from klseg.errors import InvalidArgumentError
from klseg.ops import LOG_TINY

__all__ = [
    "apply_class_map",
    "make_class_map",
    "map_labels",
    "map_log_probs",
    "standardize_class_map",
]


def standardize_class_map(class_map, num_source, num_target):
    """A class map as a tuple of target indices (``-1``: dropped), or None.

    Args:
        class_map: None, a list with one target index (or None to drop) per
            source class, or a dict ``{source index: target index or None}``
            (missing keys are dropped).
        num_source: number of source classes.
        num_target: number of target classes.

    Returns:
        A tuple with one target index or ``-1`` per source class; None for
        ``class_map=None`` (same classes).

    Raises:
        InvalidArgumentError: for ``class_map=None`` with different class
            counts, indices out of range, a wrong length, or a map that
            drops every source class.
    """
    if class_map is None:
        if num_source != num_target:
            raise InvalidArgumentError(
                f"The source model predicts {num_source} classes and the "
                f"student {num_target}; pass `class_map` to say where each "
                "source class goes (see klseg.finetune.make_class_map). "
                "Received: class_map=None"
            )
        return None
    if isinstance(class_map, dict):
        unknown = [k for k in class_map if not 0 <= int(k) < num_source]
        if unknown:
            raise InvalidArgumentError(
                f"`class_map` keys must be source class indices in [0, "
                f"{num_source}). Received: class_map={class_map}"
            )
        class_map = [
            class_map.get(s, class_map.get(str(s), -1)) for s in range(num_source)
        ]
    class_map = [-1 if t is None else int(t) for t in class_map]
    if len(class_map) != num_source:
        raise InvalidArgumentError(
            f"`class_map` must give one target class (or None to drop) per "
            f"source class ({num_source}). Received: class_map={class_map}"
        )
    bad = [t for t in class_map if not -1 <= t < num_target]
    if bad:
        raise InvalidArgumentError(
            f"`class_map` values must be target class indices in [0, "
            f"{num_target}) or None (drop). Received: class_map={class_map}"
        )
    if all(t == -1 for t in class_map):
        raise InvalidArgumentError(
            f"`class_map` drops every source class. Received: class_map={class_map}"
        )
    return tuple(class_map)


def make_class_map(source_class_names, target_class_names, *, merge=None, drop=()):
    """Build a ``class_map`` from class names.

    A source class whose name is a target class name maps to it; ``merge``
    maps other source names to target names (their probabilities are summed
    into the target class); names in ``drop`` are dropped (the remaining
    probabilities are renormalised).

    Args:
        source_class_names: names of the source model's classes, in order.
        target_class_names: names of the student's classes, in order.
        merge: dict ``{source name: target name}``. Defaults to None.
        drop: source names to drop. Defaults to ().

    Returns:
        A list with one target index (or None for dropped) per source class.

    Raises:
        InvalidArgumentError: for unknown names, or a source class that is
            neither a target class nor merged nor dropped.

    Example:

    >>> make_class_map(["bg", "car", "truck", "sky"], ["bg", "vehicle"],
    ...                merge={"car": "vehicle", "truck": "vehicle"},
    ...                drop=["sky"])
    [0, 1, 1, None]
    """
    source = [str(n) for n in source_class_names]
    target = [str(n) for n in target_class_names]
    merge = dict(merge or {})
    drop = set(drop)
    for name in list(merge) + list(drop):
        if name not in source:
            raise InvalidArgumentError(
                f"'{name}' is not a source class. Source classes: {source}"
            )
    for name in merge.values():
        if name not in target:
            raise InvalidArgumentError(
                f"'{name}' is not a target class. Target classes: {target}"
            )
    class_map = []
    unmapped = []
    for name in source:
        if name in drop:
            class_map.append(None)
        elif name in merge:
            class_map.append(target.index(merge[name]))
        elif name in target:
            class_map.append(target.index(name))
        else:
            unmapped.append(name)
    if unmapped:
        raise InvalidArgumentError(
            f"Source classes {unmapped} are not target classes; merge them "
            "into a target class (merge={name: target}) or drop them "
            f"(drop=[...]). Target classes: {target}"
        )
    return class_map


def map_labels(masks, class_map, *, ignore_class=255):
    """Map integer source-class masks to target classes (numpy).

    Dropped classes (and ``ignore_class``) become ``ignore_class``.

    Args:
        masks: integer array of source class indices.
        class_map: as accepted by ``KLRegularizedModel`` (None = identity).
        ignore_class: the ignore value. Defaults to 255.

    Returns:
        An int32 array of the same shape.
    """
    masks = np.asarray(masks)
    if class_map is None:
        return masks.astype("int32")
    if isinstance(class_map, dict):
        size = max(int(k) for k in class_map) + 1
        class_map = [class_map.get(s, None) for s in range(size)]
    table = np.full(max(256, len(class_map), int(ignore_class) + 1), ignore_class)
    for s, t in enumerate(class_map):
        table[s] = ignore_class if t is None or t < 0 else t
    out = np.full(masks.shape, ignore_class, dtype="int32")
    valid = (masks >= 0) & (masks < len(class_map)) & (masks != ignore_class)
    out[valid] = table[masks[valid]]
    return out


def map_log_probs(log_probs, class_map, num_target):
    """Source-class log-probabilities to target-class log-scores.

    Merged source classes get ``log(sum of their probabilities)``; dropped
    classes are left out, so the result is renormalised by a ``log_softmax``
    (as the KL term does) or compared by ``argmax``; a target class that no
    source class maps to gets ``LOG_TINY`` (probability 0). This is how
    ``KLRegularizedModel`` maps the source model's predictions.

    Args:
        log_probs: (..., num_source) log-probabilities.
        class_map: one target index (or None / -1 to drop) per source class,
            e.g. from ``make_class_map``; None is the identity.
        num_target: number of target classes.

    Returns:
        (..., num_target) log-scores.
    """
    if class_map is not None:
        class_map = standardize_class_map(
            class_map, int(log_probs.shape[-1]), num_target
        )
    return apply_class_map(log_probs, class_map, num_target)


def apply_class_map(log_probs, class_map, num_target):
    """Merge (logsumexp) or drop source classes; returns target log-scores.

    Merged classes get ``log(sum of probabilities)``; dropped classes are
    left out (the KL loss renormalises with ``log_softmax``); a target class
    that no source class maps to gets ``LOG_TINY`` (zero probability).

    Args:
        log_probs: (..., num_source) log-probabilities.
        class_map: a map from :func:`standardize_class_map` (a tuple, ``-1``
            to drop), or None (identity: ``log_probs`` is returned as is).
        num_target: number of target classes.

    Returns:
        (..., num_target) log-scores.
    """
    if class_map is None:
        return log_probs
    columns = []
    for t in range(num_target):
        sources = [s for s, m in enumerate(class_map) if m == t]
        if not sources:
            columns.append(ops.full_like(log_probs[..., :1], LOG_TINY))
        elif len(sources) == 1:
            columns.append(log_probs[..., sources[0] : sources[0] + 1])
        else:
            picked = ops.take(log_probs, np.asarray(sources, "int32"), axis=-1)
            columns.append(ops.logsumexp(picked, axis=-1, keepdims=True))
    return ops.concatenate(columns, axis=-1)
