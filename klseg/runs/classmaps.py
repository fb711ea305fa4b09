"""Fine-tuning to another class set: the source class map and its uses.

``klseg finetune --class-names ... --source-class-map FILE`` gives the
fine-tuned model other classes than the source model's. The map file says
where each source class goes (``{"merge": {source: target}, "drop":
[source, ...]}``); these helpers read it, build the class map
(``klseg.finetune.make_class_map``), and map source-domain masks and the
source model's predictions into the target classes for scoring.
"""

import json
from pathlib import Path

from klseg import errors
from klseg.runs.checks import fail
from klseg.runs.scoring import inference_function

__all__ = [
    "changes_classes",
    "class_map_names",
    "label_lut",
    "map_masks",
    "mapped_forward",
    "read_source_class_map",
    "target_classes",
]


def changes_classes(cfg):
    return bool(cfg.class_names or cfg.source_class_map)


def read_source_class_map(path):
    """``(merge, drop)`` from a ``{"merge": {...}, "drop": [...]}`` JSON file."""
    path = Path(path)
    if not path.is_file():
        raise errors.DataError(f"{path}: source class map file not found.")
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.DataError(
            f"{path}: source class map is not valid JSON ({e})."
        ) from None
    if not isinstance(content, dict) or set(content) - {"merge", "drop"}:
        got = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise errors.DataError(
            f'{path}: a source class map is an object {{"merge": {{source name: '
            'target name}, "drop": [source names]}. Received keys: '
            f"{got}"
        )
    merge, drop = content.get("merge", {}), content.get("drop", [])
    if not isinstance(merge, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in merge.items()
    ):
        raise errors.DataError(
            f'{path}: "merge" must map source class names to target class names. '
            f"Received: {merge!r}"
        )
    if not isinstance(drop, list) or not all(isinstance(n, str) for n in drop):
        raise errors.DataError(
            f'{path}: "drop" must be a list of source class names. Received: {drop!r}'
        )
    return merge, drop


def target_classes(cfg, splits, source_names):
    """``(target class names, class_map or None)`` of a fine-tuning run."""
    from klseg import finetune as ft

    if not changes_classes(cfg):
        return list(source_names), None
    names = list(cfg.class_names or getattr(splits["data"], "class_names", None) or [])
    if not names:
        fail(
            f"source_class_map ({cfg.source_class_map}) needs the target classes: "
            "give class_names (--class-names), or a class map with class_names "
            f"or a classes.json for {cfg.data}."
        )
    merge, drop = ({}, [])
    if cfg.source_class_map:
        merge, drop = read_source_class_map(cfg.source_class_map)
    if names == list(source_names) and not merge and not drop:
        return names, None
    try:
        class_map = ft.make_class_map(source_names, names, merge=merge, drop=drop)
    except errors.InvalidArgumentError as e:
        where = cfg.source_class_map or "no source_class_map given"
        raise errors.RunError(
            f"cannot map the classes of {cfg.source} onto the target classes "
            f"{names} ({where}): {e}"
        ) from None
    return names, class_map


def label_lut(class_map, ignore_value):
    """A 256-entry table mapping source mask values to target classes."""
    import numpy as np

    from klseg import finetune as ft

    return ft.map_labels(np.arange(256), class_map, ignore_class=ignore_value)


def map_masks(dataset, class_map, ignore_value):
    """``dataset``'s ``(images, masks)`` batches with the masks mapped from
    the source model's classes into the target classes."""
    import tensorflow as tf

    lut = tf.constant(label_lut(class_map, ignore_value), tf.int32)
    return dataset.map(lambda images, masks: (images, tf.gather(lut, masks)))


def mapped_forward(source, class_map, num_classes):
    """``images -> target-class log-probabilities`` of the source model."""
    import keras

    from klseg import finetune as ft

    base = inference_function(source)

    def forward(images):
        logits = keras.ops.convert_to_tensor(base(images), "float32")
        log_probs = keras.ops.log_softmax(logits, axis=-1)
        return ft.map_log_probs(log_probs, class_map, num_classes)

    return forward


def class_map_names(source_names, target_names, class_map):
    """``{source name: target name or None}``, or None without a class change."""
    if class_map is None:
        return None
    return {
        s: (None if t is None or t < 0 else target_names[t])
        for s, t in zip(source_names, class_map)
    }
