"""Scores of the jobs: every figure comes from :mod:`klseg.evaluation`.

Per-epoch validation, ``klseg evaluate``, the fine-tuning domains and the
reports all go through :func:`evaluate_model`, which counts a confusion
matrix over the whole data set and derives every score from it (see
:mod:`klseg.evaluation` for the formulas and the rule for absent classes).
Tiled and flip-TTA inference (:mod:`klseg.inference`) enters the same path
as a ``forward`` function (:func:`inference_function`).
"""

from klseg import evaluation, progress

__all__ = [
    "domain_metrics",
    "evaluate_model",
    "first_batch",
    "inference_function",
    "predict_classes",
]


def inference_function(model, options=None, *, batch_size=8):
    """``images -> logits`` in inference mode, as a ``tf.function``.

    One trace of the forward pass (a fraction of a second for the models
    here) makes evaluating many batches several times faster than eager
    calls. On other Keras backends the model is called as it is.

    Args:
        model: a klseg segmentation model.
        options: a :class:`klseg.inference.InferenceOptions` (or a run
            config extending it). With windows or TTA, the function returns
            the float64 log of :func:`klseg.inference.predict_probabilities`
            (log-probabilities, which the confusion counts and the loss take
            as they take logits). Defaults to None (whole images, no TTA).
        batch_size: windows per model call with tiles. Defaults to 8.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        base = lambda images: model(images, training=False)  # noqa: E731
    else:
        import tensorflow as tf

        base = tf.function(
            lambda images: model(images, training=False), reduce_retracing=True
        )
    if options is None or options.is_plain:
        return base
    import numpy as np

    from klseg import inference

    def forward(images):
        probs = inference.predict_probabilities(
            model,
            np.asarray(images),
            forward=base,
            batch_size=batch_size,
            dtype="float64",
            **options.inference_kwargs(),
        )
        with np.errstate(divide="ignore"):
            return np.log(probs)

    return forward


def evaluate_model(
    model,
    dataset,
    *,
    num_classes,
    ignore_value=255,
    class_names=None,
    forward=None,
    options=None,
):
    """Loss, mean IoU, pixel accuracy and per-class IoU of ``model`` on ``dataset``.

    The counts are exact over the whole dataset (not averaged per batch),
    so the scores do not depend on the batch size or order. With tiles or
    TTA (``options``) the counts take the argmax of the blended
    probabilities and the loss their log.

    Args:
        model: a model mapping images to per-pixel logits.
        dataset: yields ``(images, masks)`` batches (``images`` may be a
            dict with ``"images"``).
        num_classes: number of classes of the model.
        ignore_value: mask value left out. Defaults to 255.
        class_names: names for ``per_class_iou``. Defaults to ``class_i``.
        forward: ``images -> logits``. Defaults to
            ``inference_function(model, options)``.
        options: a :class:`klseg.inference.InferenceOptions` (windows, TTA).
            Defaults to None (whole images).

    Returns:
        ``{"loss", "mean_iou", "pixel_accuracy", "per_class_iou": {name:
        iou, or None for a class absent from masks and predictions},
        "num_images"}``.
    """
    if not isinstance(dataset, (tuple, list)):
        # A bar on a terminal, a few lines in a log, when scoring is slow.
        dataset = progress.iterate(dataset, label="Scoring")
    return evaluation.evaluate(
        model,
        dataset,
        num_classes=num_classes,
        ignore_value=ignore_value,
        class_names=class_names,
        forward=forward or inference_function(model, options),
    )


def domain_metrics(model, datasets, num_classes, ignore_value, names, forward=None):
    """:func:`evaluate_model` on each ``{domain: dataset}`` that is not None
    (:func:`klseg.evaluation.evaluate_each`, one ``forward`` for all)."""
    return evaluation.evaluate_each(
        model,
        {domain: ds for domain, ds in datasets.items() if ds is not None},
        num_classes=num_classes,
        ignore_value=ignore_value,
        class_names=names,
        forward=forward or inference_function(model),
        progress_label="Scoring",
    )


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
