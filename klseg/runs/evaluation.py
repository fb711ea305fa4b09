"""Scores of the jobs: every figure comes from :mod:`klseg.evaluation`.

Per-epoch validation, ``klseg evaluate``, the fine-tuning domains and the
reports all go through :func:`evaluate_model`, which counts a confusion
matrix over the whole data set and derives every score from it (see
:mod:`klseg.evaluation` for the formulas and the rule for absent classes).
"""

from klseg import evaluation

__all__ = [
    "domain_metrics",
    "evaluate_model",
    "first_batch",
    "inference_function",
    "predict_classes",
]


def inference_function(model):
    """``images -> logits`` in inference mode, as a ``tf.function``.

    One trace of the forward pass (a fraction of a second for the models
    here) makes evaluating many batches several times faster than eager
    calls. On other Keras backends the model is called as it is.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return lambda images: model(images, training=False)
    import tensorflow as tf

    return tf.function(
        lambda images: model(images, training=False), reduce_retracing=True
    )


def evaluate_model(
    model,
    dataset,
    *,
    num_classes,
    ignore_value=255,
    class_names=None,
    forward=None,
):
    """Loss, mean IoU, pixel accuracy and per-class IoU of ``model`` on ``dataset``.

    The counts are exact over the whole dataset (not averaged per batch),
    so the scores do not depend on the batch size or order.

    Args:
        model: a model mapping images to per-pixel logits.
        dataset: yields ``(images, masks)`` batches (``images`` may be a
            dict with ``"images"``).
        num_classes: number of classes of the model.
        ignore_value: mask value left out. Defaults to 255.
        class_names: names for ``per_class_iou``. Defaults to ``class_i``.
        forward: ``images -> logits``. Defaults to
            ``inference_function(model)``.

    Returns:
        ``{"loss", "mean_iou", "pixel_accuracy", "per_class_iou": {name:
        iou, or None for a class absent from masks and predictions},
        "num_images"}``.
    """
    return evaluation.evaluate(
        model,
        dataset,
        num_classes=num_classes,
        ignore_value=ignore_value,
        class_names=class_names,
        forward=forward or inference_function(model),
    )


def domain_metrics(model, datasets, num_classes, ignore_value, names, forward=None):
    """:func:`evaluate_model` on each ``{domain: dataset}`` that is not None."""
    forward = forward or inference_function(model)
    return {
        domain: evaluate_model(
            model,
            ds,
            num_classes=num_classes,
            ignore_value=ignore_value,
            class_names=names,
            forward=forward,
        )
        for domain, ds in datasets.items()
        if ds is not None
    }


def first_batch(dataset, n):
    """The first ``n`` images and masks of a dataset, as numpy arrays."""
    import numpy as np

    images, masks = [], []
    for x, y in dataset:
        if isinstance(x, dict):
            x = x["images"]
        images.append(np.asarray(x))
        masks.append(np.asarray(y))
        if sum(len(i) for i in images) >= n:
            break
    return np.concatenate(images)[:n], np.concatenate(masks)[:n]


def predict_classes(model, images):
    """Argmax class per pixel of ``model`` on a batch of images."""
    import keras
    import numpy as np

    logits = model(images, training=False)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.argmax(logits, axis=-1)))
