"""Tests for klseg.metrics: values, streaming, exact counts, saving, errors."""

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip, kl64, log_softmax64
from keras import ops

from klseg import metrics
from klseg.ops import accumulate, split_count


def confusion64(labels, predicted, num_classes, weights=None, ignore_class=None):
    labels, predicted = labels.ravel(), predicted.ravel()
    weights = np.ones(labels.shape) if weights is None else weights.ravel()
    keep = (labels >= 0) & (labels < num_classes)
    if ignore_class is not None:
        keep &= labels != ignore_class
    cm = np.zeros((num_classes, num_classes))
    np.add.at(cm, (labels[keep], predicted[keep]), weights[keep])
    return cm


def iou64(cm):
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def ece64(labels, logits, num_bins, ignore_class=None):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    conf, pred = probs.max(-1), probs.argmax(-1)
    keep = labels != ignore_class
    conf, correct = conf[keep], (pred == labels)[keep]
    bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
    gap = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        gap += abs(correct[in_bin].sum() - conf[in_bin].sum())
    return gap / keep.sum()


# MeanIoU ----------------------------------------------------------------------


def test_mean_iou_hand_computed_and_per_class():
    metric = metrics.MeanIoU(num_classes=3, ignore_class=255)
    labels = np.array([[[0, 1, 1, 255]]])
    logits = np.array([[[[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 0], [0, 2.0, 0]]]])
    metric.update_state(labels, logits)
    # class 0: TP 1, FP 1 -> 1/2; class 1: TP 1, FN 1 -> 1/2; class 2 absent.
    assert float(metric.result()) == pytest.approx(0.5)
    per_class = np.asarray(metric.per_class_iou())
    np.testing.assert_allclose(per_class[:2], [0.5, 0.5])
    assert np.isnan(per_class[2])
    np.testing.assert_allclose(metric.per_class_iou(empty_value=0.0), [0.5, 0.5, 0])
    np.testing.assert_allclose(
        metric.confusion_matrix(), [[1, 0, 0], [1, 1, 0], [0] * 3]
    )
    metric.reset_state()
    assert float(metric.result()) == 0.0
    assert np.all(np.asarray(metric.confusion_matrix()) == 0)


def test_mean_iou_matches_reference_with_float_weights_and_streaming(rng):
    num_classes = 5
    labels = rng.integers(0, num_classes, size=(6, 8, 8))
    labels[0, :3] = 255
    logits = rng.normal(size=(6, 8, 8, num_classes)).astype("float32")
    weights = rng.uniform(0.1, 2.0, size=labels.shape).astype("float32")
    metric = metrics.MeanIoU(num_classes, ignore_class=255)
    for batch in (slice(0, 2), slice(2, 3), slice(3, 6)):  # uneven batches
        metric.update_state(labels[batch], logits[batch], weights[batch])
    cm = confusion64(labels, logits.argmax(-1), num_classes, weights, 255)
    np.testing.assert_allclose(np.asarray(metric.confusion_matrix()), cm, rtol=1e-5)
    np.testing.assert_allclose(metric.per_class_iou(), iou64(cm), rtol=1e-5)
    assert float(metric.result()) == pytest.approx(np.nanmean(iou64(cm)), rel=1e-5)


def test_mean_iou_keeps_fractional_weights(rng):
    labels = rng.integers(0, 4, size=(2, 6, 6))
    logits = rng.normal(size=(2, 6, 6, 4)).astype("float32")
    ours = metrics.MeanIoU(4)
    ours.update_state(labels, logits)
    expected = np.nanmean(iou64(confusion64(labels, logits.argmax(-1), 4)))
    assert float(ours.result()) == pytest.approx(expected, rel=1e-6)
    # A uniform weight of 0.5 leaves the IoU unchanged (Keras truncates it).
    halved = metrics.MeanIoU(4)
    halved.update_state(labels, logits, sample_weight=np.full(labels.shape, 0.5))
    assert float(halved.result()) == pytest.approx(float(ours.result()), rel=1e-6)
    # Per-image weights broadcast over pixels; weight 0 drops an image.
    per_image = metrics.MeanIoU(4)
    per_image.update_state(labels, logits, sample_weight=np.array([1.0, 0.0]))
    first = metrics.MeanIoU(4)
    first.update_state(labels[:1], logits[:1])
    np.testing.assert_allclose(per_image.confusion_matrix(), first.confusion_matrix())


def test_counts_stay_exact_past_two_to_the_24():
    big = 2.0**24
    # A plain float32 accumulator loses the +1.
    assert np.float32(big) + np.float32(1) == np.float32(big)
    metric = metrics.MeanIoU(2)
    label, logit = np.array([[0]]), np.array([[[1.0, 0.0]]])
    metric.update_state(label, logit, sample_weight=np.array([[big]]))
    for _ in range(3):
        metric.update_state(label, logit)
    hi, lo = (np.asarray(v.value, dtype="float64") for v in metric.variables)
    assert (hi + lo)[0] == big + 3
    # Integer batch counts beyond 2**24 are split exactly before adding.
    counts = ops.convert_to_tensor(np.array([2**24 + 1, 2**31 - 1], dtype="int32"))
    part_hi, part_lo = split_count(counts)
    total = np.asarray(part_hi, "float64") + np.asarray(part_lo, "float64")
    np.testing.assert_array_equal(total, [2**24 + 1, 2**31 - 1])
    # Accumulating 2**24 + 1 a hundred times stays exact (about 2**31).
    hi = lo = ops.zeros((1,))
    for _ in range(100):
        hi, lo = accumulate(hi, lo, *split_count(counts[:1]))
    total = float(np.asarray(hi, "float64")[0]) + float(np.asarray(lo, "float64")[0])
    assert total == 100 * (2**24 + 1)


def test_compensated_update_survives_compilation():
    """XLA (jit) must not simplify the TwoSum away."""
    big = np.float32(2.0**24)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(accumulate, jit_compile=True)
    elif backend == "jax":
        import jax

        fn = jax.jit(accumulate)
    else:
        pytest.skip(f"compilation is tested on TensorFlow and JAX, not {backend}")
    hi, lo = ops.convert_to_tensor([big]), ops.zeros((1,))
    for _ in range(3):
        hi, lo = fn(hi, lo, ops.ones((1,)))
    assert float(np.asarray(hi, "float64")[0] + np.asarray(lo, "float64")[0]) == (
        2**24 + 3
    )


def test_merge_state_equals_one_metric_over_all_batches(rng):
    labels = rng.integers(0, 3, size=(4, 5, 5))
    logits = rng.normal(size=(4, 5, 5, 3)).astype("float32")
    for make in (
        lambda: metrics.MeanIoU(3),
        metrics.PixelAccuracy,
        lambda: metrics.ExpectedCalibrationError(num_bins=5),
    ):
        whole, a, b, merged = make(), make(), make(), make()
        whole.update_state(labels, logits)
        a.update_state(labels[:2], logits[:2])
        b.update_state(labels[2:], logits[2:])
        merged.merge_state([a, b])
        assert float(merged.result()) == pytest.approx(float(whole.result()), 1e-6)
    with pytest.raises(ValueError, match="Can only merge MeanIoU"):
        metrics.MeanIoU(3).merge_state([metrics.PixelAccuracy()])


# PixelAccuracy, ECE, KLDivergence ---------------------------------------------


def test_pixel_accuracy_hand_computed_with_weights_and_ignore():
    labels = np.array([[[0, 1, 1, 255]]])
    logits = np.array([[[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]]])
    metric = metrics.PixelAccuracy(ignore_class=255)
    metric.update_state(labels, logits)
    assert float(metric.result()) == pytest.approx(2 / 3)
    weighted = metrics.PixelAccuracy(ignore_class=255)
    weighted.update_state(labels, logits, np.array([[[1.0, 1.0, 2.0, 5.0]]]))
    assert float(weighted.result()) == pytest.approx(2 / 4)
    empty = metrics.PixelAccuracy(ignore_class=255)
    empty.update_state(np.full((1, 1, 2), 255), logits[:, :, :2])
    assert float(empty.result()) == 0.0


def test_expected_calibration_error_hand_computed_and_reference(rng):
    # Confidence 0.9 and correct, confidence 0.6 and wrong: (0.1 + 0.6) / 2.
    logits = np.log(np.array([[[0.9, 0.1], [0.6, 0.4]]], dtype="float32"))
    metric = metrics.ExpectedCalibrationError(num_bins=10)
    metric.update_state(np.array([[0, 1]]), logits)
    assert float(metric.result()) == pytest.approx(0.35, abs=1e-6)
    probs = metrics.ExpectedCalibrationError(num_bins=10, from_logits=False)
    probs.update_state(np.array([[0, 1]]), np.exp(logits))
    assert float(probs.result()) == pytest.approx(0.35, abs=1e-6)
    labels = rng.integers(0, 4, size=(4, 6, 6))
    labels[0, 0] = 255
    logits = (rng.normal(size=(4, 6, 6, 4)) * 2).astype("float32")
    metric = metrics.ExpectedCalibrationError(num_bins=15, ignore_class=255)
    metric.update_state(labels[:2], logits[:2])
    metric.update_state(labels[2:], logits[2:])
    expected = ece64(labels, logits, 15, ignore_class=255)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


def test_kl_metric_is_streaming_mean_over_valid_pixels(rng):
    teacher = rng.normal(size=(4, 4, 4, 3)).astype("float32")
    student = rng.normal(size=(4, 4, 4, 3)).astype("float32")
    metric = metrics.KLDivergence(target="logits", temperature=2.0)
    metric.update_state(teacher[:2], student[:2])
    metric.update_state(teacher[2:], student[2:])
    # T^2 * KL(softmax(t / T) || softmax(s / T)), mean over every pixel.
    lp, lq = log_softmax64(teacher / 2.0), log_softmax64(student / 2.0)
    expected = 4.0 * kl64(np.exp(lp), lp, lq).mean()
    assert expected > 0
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)
    # Soft targets with empty rows (ignored) and per-pixel weights.
    target = np.exp(log_softmax64(teacher)).astype("float32")
    target[0, :2] = 0.0
    weights = rng.uniform(size=(4, 4, 4)).astype("float32")
    metric = metrics.KLDivergence(ignore_class=255)
    metric.update_state(target[:2], student[:2], weights[:2])
    metric.update_state(target[2:], student[2:], weights[2:])
    p = target.astype("float64")
    with np.errstate(divide="ignore"):
        values = kl64(p, np.log(p), log_softmax64(student))
    valid = target.sum(-1) > 0
    expected = (values * weights)[valid].sum() / weights[valid].sum()
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_metrics_accept_low_precision_predictions(rng, dtype):
    labels = rng.integers(0, 3, size=(2, 4, 4))
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    low = ops.cast(logits, dtype)
    for metric in (
        metrics.MeanIoU(3),
        metrics.PixelAccuracy(),
        metrics.ExpectedCalibrationError(),
    ):
        metric.update_state(labels, low)
        reference = type(metric).from_config(metric.get_config())
        reference.update_state(labels, ops.cast(low, "float32"))
        assert float(metric.result()) == pytest.approx(float(reference.result()))
    kl = metrics.KLDivergence(target="logits")
    kl.update_state(low, low)
    assert abs(float(kl.result())) < 1e-6


# Configuration and errors ---------------------------------------------------------

ALL_METRICS = [
    metrics.MeanIoU(4, ignore_class=255, from_logits=False, name="miou"),
    metrics.PixelAccuracy(ignore_class=0, axis=1),
    metrics.KLDivergence(
        target="log_probabilities",
        temperature=3.0,
        direction="reverse",
        ignore_class=255,
        class_weights=[1.0, 2.0],
    ),
    metrics.ExpectedCalibrationError(num_bins=7, ignore_class=255, dtype="float32"),
]


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda m: type(m).__name__)
def test_get_config_round_trip(metric):
    assert_config_round_trip(metric, keras.metrics)


@pytest.mark.parametrize(
    "factory, name",
    [
        (lambda: metrics.MeanIoU(0), "num_classes"),
        (lambda: metrics.MeanIoU(2.5), "num_classes"),
        (lambda: metrics.MeanIoU(3, ignore_class="void"), "ignore_class"),
        (lambda: metrics.PixelAccuracy(from_logits=1), "from_logits"),
        (lambda: metrics.ExpectedCalibrationError(num_bins=0), "num_bins"),
        (lambda: metrics.KLDivergence(temperature=0), "temperature"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(factory, name):
    with pytest.raises(ValueError, match=f"Received: {name}="):
        factory()


def test_bad_inputs_raise_clear_errors(rng):
    logits = rng.normal(size=(1, 4, 4, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"num_classes=4.*y_pred.shape=\(1, 4, 4, 3\)"):
        metrics.MeanIoU(4).update_state(np.zeros((1, 4, 4)), logits)
    with pytest.raises(ValueError, match=r"y_true.shape=\(1, 4\).*y_pred.shape"):
        metrics.PixelAccuracy().update_state(np.zeros((1, 4)), logits)
    labels = np.zeros((1, 4, 4), dtype="int32")
    labels[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\).*\[9\]"):
        metrics.MeanIoU(3, ignore_class=255).update_state(labels, logits)
