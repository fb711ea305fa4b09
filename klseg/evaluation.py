"""The one evaluation path: confusion counts, then every score from them.

Per-epoch validation, ``klseg evaluate``, the scores per domain of
fine-tuning (:func:`evaluate_each`, :func:`evaluate_domains` and the
:class:`DomainEvaluation` callback) and the reports all count a ``(C, C)``
confusion matrix (rows: truth, columns: prediction) over the whole data set
in 64-bit integers, together with the summed cross-entropy, and derive the
scores from those counts alone with :func:`scores`:

- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``;
- a class that appears neither in the masks nor in the predictions (empty
  union) has no IoU: it is reported as ``None`` and left out of the mean;
- ``mean_iou`` is the mean of the defined ``IoU_c``; with no valid pixel at
  all it is undefined (NaN, written ``null`` in JSON);
- ``pixel_accuracy = sum_c TP_c / valid pixels``;
- ``precision_c = TP_c / (TP_c + FP_c)`` (the fraction of the pixels
  predicted as ``c`` that are ``c``): a class never predicted has no
  precision (``None``);
- ``recall_c = TP_c / (TP_c + FN_c)`` (the fraction of the pixels of class
  ``c`` predicted as ``c``): a class with no valid pixel in the masks has no
  recall (``None``);
- ``confusion_matrix`` holds the counts themselves: ``counts[i][j]`` is the
  number of valid pixels of true class ``i`` predicted as class ``j`` (rows:
  truth, columns: prediction; a list of lists of integers), with the class
  names in the order of the rows and columns;
- ``loss`` is the cross-entropy, mean over valid pixels (computed in float64
  from the logits: equal to ``klseg.losses.SparseKLDivergence`` without label
  smoothing).

Valid pixels are those whose mask value is in ``0..C-1`` and is not the
ignore value. The scores do not depend on the batch size or the order of
batches (exact integer counts, float64 sums).

``klseg.metrics.MeanIoU`` follows the same absent-class rule inside
``fit``; it returns 0 rather than NaN when nothing was seen, as Keras
metrics do.

NumPy and ``keras.ops`` only: it runs on every Keras backend.
"""

import keras
import numpy as np
from keras import ops

from klseg import models as klseg_models
from klseg import progress
from klseg.class_maps import apply_class_map, map_labels, standardize_class_map
from klseg.errors import InvalidArgumentError

__all__ = [
    "ConfusionCounts",
    "DomainEvaluation",
    "evaluate",
    "evaluate_domains",
    "evaluate_each",
    "iterate_batches",
    "scores",
]


def iterate_batches(data, batch_size=8):
    """``(images, masks)`` numpy batches from a dataset or an array pair.

    Args:
        data: a ``tf.data.Dataset`` (or any iterable) of ``(images, masks)``
            batches, where ``images`` may be a dict holding ``"images"``; or
            a pair ``(images, masks)`` of arrays, cut into ``batch_size``.
        batch_size: batch size for an array pair. Defaults to 8.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, masks = data
        for start in range(0, len(images), batch_size):
            yield (
                np.asarray(images[start : start + batch_size]),
                np.asarray(masks[start : start + batch_size]),
            )
        return
    for x, y in data:
        if isinstance(x, dict):
            x = x["images"]
        yield np.asarray(x), np.asarray(y)


class ConfusionCounts:
    """A running confusion matrix and cross-entropy sum over many batches.

    Args:
        num_classes: number of classes ``C``.
        ignore_value: mask value left out. Defaults to 255.
    """

    def __init__(self, num_classes, ignore_value=255):
        self.num_classes = int(num_classes)
        self.ignore_value = ignore_value
        self.confusion = np.zeros((self.num_classes,) * 2, dtype=np.int64)
        self.loss_sum = 0.0
        self.num_images = 0

    def update(self, masks, logits):
        """Add one batch: ``masks`` (B, H, W) integers, ``logits`` (B, H, W, C).

        ``logits`` may be log-probabilities (the cross-entropy is taken after
        a log-softmax, which leaves log-probabilities unchanged).
        """
        c = self.num_classes
        logits = np.asarray(logits, dtype=np.float64)
        masks = np.asarray(masks).astype(np.int64)
        if logits.shape[:-1] != masks.shape or logits.shape[-1] != c:
            raise ValueError(
                f"masks of shape {masks.shape} do not fit logits of shape "
                f"{logits.shape} with {c} classes."
            )
        valid = (masks >= 0) & (masks < c)
        if self.ignore_value is not None:
            valid &= masks != self.ignore_value
        labels = masks[valid]
        scores_ = logits[valid]
        predicted = scores_.argmax(axis=-1)
        self.confusion += np.bincount(labels * c + predicted, minlength=c * c).reshape(
            c, c
        )
        if len(labels):
            shifted = scores_ - scores_.max(axis=-1, keepdims=True)
            log_norm = np.log(np.exp(shifted).sum(axis=-1))
            picked = shifted[np.arange(len(labels)), labels]
            self.loss_sum += float((log_norm - picked).sum())
        self.num_images += int(masks.shape[0])

    def result(self, class_names=None):
        """The scores of everything added so far (see :func:`scores`)."""
        return scores(
            self.confusion,
            loss_sum=self.loss_sum,
            class_names=class_names,
            num_images=self.num_images,
        )


def scores(confusion, *, loss_sum=None, class_names=None, num_images=None):
    """Every score from a ``(C, C)`` confusion matrix (rows: truth).

    Args:
        confusion: integer (or exact float) counts.
        loss_sum: summed cross-entropy over the counted pixels, or None.
        class_names: names of the classes, in the order of the rows. Defaults
            to ``class_i``.
        num_images: passed through as ``num_images`` when given.

    Returns:
        ``{"loss", "mean_iou", "pixel_accuracy", "per_class_iou": {name: IoU
        or None for a class absent from masks and predictions},
        "per_class_precision": {name: precision or None for a class never
        predicted}, "per_class_recall": {name: recall or None for a class
        without pixels}, "confusion_matrix": {"class_names": [...],
        "counts": [[...]]}}`` (plus ``"num_images"``; ``counts`` rows: true
        class, columns: predicted class). Undefined values (no valid pixel)
        are NaN.

    Example:

    >>> s = scores(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    >>> round(s["mean_iou"], 4), s["per_class_iou"]["class_2"]
    (0.7083, None)
    >>> s["per_class_precision"]["class_1"], s["per_class_recall"]["class_0"]
    (0.6666666666666666, 0.75)
    >>> s["confusion_matrix"]["counts"][0]
    [3, 1, 0]
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    num_classes = confusion.shape[0]
    tp = np.diag(confusion)
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    union = predicted + actual - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    valid = confusion.sum()
    names = (
        [str(n) for n in class_names]
        if class_names is not None
        else [f"class_{i}" for i in range(num_classes)]
    )
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} names for {num_classes} classes. "
            f"Received: class_names={names}"
        )
    result = {
        "loss": (loss_sum / valid if valid else float("nan"))
        if loss_sum is not None
        else None,
        "mean_iou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / valid) if valid else float("nan"),
        "per_class_iou": _per_class(names, iou, present),
        "per_class_precision": _per_class(
            names, tp / np.maximum(predicted, 1), predicted > 0
        ),
        "per_class_recall": _per_class(names, tp / np.maximum(actual, 1), actual > 0),
        "confusion_matrix": {
            "class_names": names,
            "counts": np.rint(confusion).astype(np.int64).tolist(),
        },
    }
    if loss_sum is None:
        del result["loss"]
    if num_images is not None:
        result["num_images"] = int(num_images)
    return result


def _per_class(names, values, defined):
    """``{name: float or None}``: None where ``defined`` is False."""
    return {n: (float(v) if d else None) for n, v, d in zip(names, values, defined)}


def evaluate(
    model,
    data,
    *,
    num_classes,
    ignore_value=255,
    class_names=None,
    forward=None,
    label_map=None,
    batch_size=8,
):
    """Loss, mean IoU, pixel accuracy and per-class scores of a model on a data set.

    Args:
        model: a model mapping uint8 images to per-pixel logits; only called
            through ``forward`` when that is given.
        data: batches or an array pair (see :func:`iterate_batches`).
        num_classes: number of classes of the (mapped) predictions.
        ignore_value: mask value left out. Defaults to 255.
        class_names: names for ``per_class_iou``. Defaults to ``class_i``.
        forward: ``images -> logits or log-probabilities``. Defaults to
            :func:`klseg.models.predict_logits` (Keras' compiled predict
            function, also correct under a multi-replica strategy).
        label_map: optional ``masks -> masks`` callable, or a lookup table
            indexed by mask value, applied to the masks first (e.g. source
            classes to target classes).
        batch_size: batch size for an array pair. Defaults to 8.

    Returns:
        The :func:`scores` dict with ``"num_images"``.
    """
    forward = forward or (lambda images: klseg_models.predict_logits(model, images))
    counts = ConfusionCounts(num_classes, ignore_value)
    if label_map is not None and not callable(label_map):
        table = np.asarray(label_map)
        label_map = lambda masks: table[np.asarray(masks).astype(np.int64)]  # noqa: E731
    for images, masks in iterate_batches(data, batch_size):
        logits = ops.convert_to_numpy(forward(images))
        if label_map is not None:
            masks = label_map(masks)
        counts.update(masks, logits)
    return counts.result(class_names)


def evaluate_each(
    model,
    datasets,
    *,
    num_classes,
    ignore_value=255,
    class_names=None,
    forward=None,
    label_maps=None,
    batch_size=8,
    progress_label=None,
):
    """:func:`evaluate` on each domain of ``{domain: data}``: every score.

    The one loop over domains: :func:`evaluate_domains` (fine-tuning's flat
    scores and the forgetting) and the run layer's scores per domain both
    go through it.

    Args:
        model: as for :func:`evaluate`.
        datasets: dict ``{domain: data}``, each ``data`` as for
            :func:`evaluate`.
        num_classes: number of classes of the (mapped) predictions.
        ignore_value: mask value left out. Defaults to 255.
        class_names: names for the per-class scores. Defaults to ``class_i``.
        forward: ``images -> logits``, shared by every domain. Defaults to
            :func:`klseg.models.predict_logits`.
        label_maps: dict ``{domain: label_map}`` (see :func:`evaluate`) for
            the domains whose masks are mapped first. Defaults to None.
        batch_size: batch size for array pairs. Defaults to 8.
        progress_label: what a progress bar says while a dataset (not an
            array pair) is scored. Defaults to None (no bar).

    Returns:
        dict ``{domain: the scores dict of evaluate}``, in the order of
        ``datasets``.
    """
    label_maps = label_maps or {}
    results = {}
    for domain, data in datasets.items():
        if progress_label is not None and not isinstance(data, (tuple, list)):
            data = progress.iterate(data, label=progress_label)
        results[domain] = evaluate(
            model,
            data,
            num_classes=num_classes,
            ignore_value=ignore_value,
            class_names=class_names,
            forward=forward,
            label_map=label_maps.get(domain),
            batch_size=batch_size,
        )
    return results


# Both domains' scores of fine-tuning ----------------------------------------

#: Scores ``evaluate_domains`` can report per domain.
_DOMAIN_SCORES = ("loss", "mean_iou", "pixel_accuracy")

#: What ``evaluate_domains`` reads from a fine-tuning wrapper
#: (``klseg.finetune.KLRegularizedModel`` and its subclasses); a model with
#: all of them is taken for one.
_WRAPPER_ATTRIBUTES = ("student", "source", "class_map", "ignore_class")


def _domain_key(domain, score):
    return f"{domain}_{score}" if domain else score


def _check_scores(scores):
    for score in scores:
        if score not in _DOMAIN_SCORES:
            raise InvalidArgumentError(
                f"`scores` must hold names from {_DOMAIN_SCORES}. "
                f"Received: scores={scores!r}"
            )


def _domain_class_map(class_map, source_model, num_classes):
    """``class_map`` standardised against the source model's classes."""
    if class_map is None:
        return None
    if source_model is not None:
        num_source = klseg_models.check_segmentation_model(source_model, "source_model")
    elif isinstance(class_map, dict):
        num_source = max(int(k) for k in class_map) + 1
    else:
        num_source = len(class_map)
    return standardize_class_map(class_map, num_source, num_classes)


def _source_baseline(
    source_model, data, class_map, num_classes, ignore_class, label_map, batch_size
):
    """Mean IoU of the source model, its predictions mapped by ``class_map``."""

    def mapped(images):
        logits = ops.cast(klseg_models.predict_logits(source_model, images), "float32")
        log_probs = ops.log_softmax(logits, axis=-1)
        return apply_class_map(log_probs, class_map, num_classes)

    return evaluate(
        source_model,
        data,
        num_classes=num_classes,
        ignore_value=ignore_class,
        forward=mapped,
        label_map=label_map,
        batch_size=batch_size,
    )["mean_iou"]


def evaluate_domains(
    model,
    datasets,
    *,
    source_model=None,
    class_map=None,
    ignore_class=None,
    batch_size=8,
    source_baseline=None,
    scores=("mean_iou",),
    forward=None,
):
    """Scores of the student on each domain, and the forgetting.

    Every score comes from one confusion matrix per domain
    (:func:`evaluate_each`, :func:`evaluate`): exact over the whole data
    set, independent of the batch size, with the documented rule for a
    class absent from masks and predictions (left out of the mean).

    Args:
        model: a ``klseg.finetune.KLRegularizedModel`` (its student is
            scored) or a plain segmentation model.
        datasets: dict ``{domain: data}``, ``data`` a ``tf.data.Dataset``
            (or any iterable) of ``(images or {"images": ...}, masks)``
            batches, or an ``(images, masks)`` pair of arrays. Domain
            ``"source"`` masks are in the source model's classes and are
            mapped with ``class_map``.
        source_model: the source model, to compute the baseline. Defaults to
            ``model.source`` for a ``KLRegularizedModel``.
        class_map: source-to-target class map. Defaults to the wrapper's.
        ignore_class: mask value to ignore. Defaults to the wrapper's, or
            255.
        batch_size: batch size for array inputs. Defaults to 8.
        source_baseline: the source model's mean IoU on ``datasets["source"]``
            if already known (skips recomputing it).
        scores: which of ``"loss"``, ``"mean_iou"``, ``"pixel_accuracy"`` to
            report. Defaults to ``("mean_iou",)``.
        forward: ``images -> logits`` of the student. Defaults to
            :func:`klseg.models.predict_logits`.

    Returns:
        dict with ``"<domain>_<score>"`` per domain and score (fractions
        0..1; an empty domain name gives ``"<score>"``) and, when a
        ``"source"`` domain and a source model are available,
        ``"source_model_mean_iou"`` (the baseline) and ``"forgetting"`` =
        baseline - student source mean IoU.
    """
    _check_scores(scores)
    student = getattr(model, "student", model)
    if all(hasattr(model, name) for name in _WRAPPER_ATTRIBUTES):
        source_model = source_model if source_model is not None else model.source
        class_map = class_map if class_map is not None else model.class_map
        ignore_class = model.ignore_class if ignore_class is None else ignore_class
    ignore_class = 255 if ignore_class is None else ignore_class
    num_classes = klseg_models.check_segmentation_model(student, "student")
    class_map = _domain_class_map(class_map, source_model, num_classes)

    def label_map(masks):
        return map_labels(masks, class_map, ignore_class=ignore_class)

    found = evaluate_each(
        student,
        datasets,
        num_classes=num_classes,
        ignore_value=ignore_class,
        forward=forward,
        label_maps={"source": label_map} if class_map else None,
        batch_size=batch_size,
    )
    results = {
        _domain_key(domain, score): found[domain][score]
        for domain in found
        for score in scores
    }
    if "source" in datasets and (
        source_model is not None or source_baseline is not None
    ):
        if source_baseline is None:
            source_baseline = _source_baseline(
                source_model,
                datasets["source"],
                class_map,
                num_classes,
                ignore_class,
                label_map if class_map else None,
                batch_size,
            )
        results["source_model_mean_iou"] = float(source_baseline)
        results["forgetting"] = float(source_baseline) - results.get(
            "source_mean_iou",
            float("nan"),
        )
    return results


class DomainEvaluation(keras.callbacks.Callback):
    """Adds each domain's validation scores and the forgetting to the logs.

    At the end of every epoch this runs ``evaluate_domains`` and writes
    ``val_<domain>_<score>`` for each domain and score and
    ``val_forgetting`` into the epoch logs, so they appear in ``History``
    and in every later callback (CSVLogger, checkpoints monitoring them,
    ...). The source model's score, computed once (at the first epoch end)
    unless given, is kept as ``source_baseline``.

    Args:
        datasets: as for ``evaluate_domains``; re-iterated every epoch.
        source_model, class_map, ignore_class, batch_size, scores, forward:
            as for ``evaluate_domains``.
        source_baseline: the source model's source-domain mean IoU, if
            known. Defaults to None.
    """

    def __init__(
        self,
        datasets,
        *,
        source_model=None,
        class_map=None,
        ignore_class=None,
        batch_size=8,
        scores=("mean_iou",),
        forward=None,
        source_baseline=None,
    ):
        super().__init__()
        self.datasets = {k: v for k, v in dict(datasets).items() if v is not None}
        self.source_model = source_model
        self.class_map = class_map
        self.ignore_class = ignore_class
        self.batch_size = batch_size
        self.scores = tuple(scores)
        self.forward = forward
        self.source_baseline = source_baseline
        self.history = []

    def _evaluate(self):
        return evaluate_domains(
            self.model,
            self.datasets,
            source_model=self.source_model,
            class_map=self.class_map,
            ignore_class=self.ignore_class,
            batch_size=self.batch_size,
            source_baseline=self.source_baseline,
            scores=self.scores,
            forward=self.forward,
        )

    def on_epoch_end(self, epoch, logs=None):
        results = self._evaluate()
        if "source_model_mean_iou" in results:
            self.source_baseline = results["source_model_mean_iou"]
        self.history.append(results)
        if logs is not None:
            for key, value in results.items():
                if key != "source_model_mean_iou":
                    logs[f"val_{key}"] = value
