"""Tests for klseg.losses: values, gradients, reductions, saving, errors."""

import math
import re

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip, kl64, log_softmax64
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from klseg import losses

LOG2 = math.log(2.0)


# float64 references -------------------------------------------------------


def dist64(x, kind, temperature=1.0):
    """(p, log p) in float64 for a target of the given kind."""
    x = np.asarray(x, dtype="float64")
    if kind == "logits":
        lp = log_softmax64(x / temperature)
        return np.exp(lp), lp
    if kind == "log_probabilities":
        x = np.exp(x)
    if temperature != 1.0:
        with np.errstate(divide="ignore"):
            powered = np.where(x > 0, x ** (1.0 / temperature), 0.0)
        x = powered / powered.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return x, np.log(x)


def sparse_kl64(labels, logits, eps=0.0):
    num_classes = logits.shape[-1]
    t = np.eye(num_classes)[labels] * (1 - eps) + eps / num_classes
    with np.errstate(divide="ignore"):
        return kl64(t, np.log(t), log_softmax64(logits))


def js64(p, lp, q, lq):
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore"):
        lm = np.log(m)
    return 0.5 * kl64(p, lp, lm) + 0.5 * kl64(q, lq, lm)


def random_target(rng, shape, kind):
    x = (rng.normal(size=shape) * 2).astype("float32")
    if kind == "probabilities":
        return np.exp(log_softmax64(x)).astype("float32")
    if kind == "log_probabilities":
        return log_softmax64(x).astype("float32")
    return x


# Values against float64 -----------------------------------------------------


@pytest.mark.parametrize("target", ["probabilities", "logits", "log_probabilities"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_float64_reference(rng, target, direction, temperature):
    shape = (2, 5, 6, 7)
    y_true = random_target(rng, shape, target)
    y_pred = (rng.normal(size=shape) * 3).astype("float32")
    got = losses.kl_divergence(
        y_true, y_pred, target=target, temperature=temperature, direction=direction
    )
    p, lp = dist64(y_true, target, temperature)
    q, lq = dist64(y_pred, "logits", temperature)
    ref = kl64(p, lp, lq) if direction == "forward" else kl64(q, lq, lp)
    ref = ref * temperature**2
    assert got.shape == shape[:-1] and got.dtype == "float32"
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_kl_from_probability_predictions_matches_reference(rng):
    shape = (3, 4, 5)
    y_true = random_target(rng, shape, "probabilities")
    y_pred = random_target(rng, shape, "probabilities")
    got = losses.kl_divergence(y_true, y_pred, from_logits=False)
    ref = kl64(*dist64(y_true, "probabilities"), dist64(y_pred, "probabilities")[1])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    classes=st.integers(2, 9),
)
def test_kl_random_logits_any_scale(seed, scale, classes):
    rng = np.random.default_rng(seed)
    a = (rng.normal(size=(3, 4, classes)) * scale).astype("float32")
    b = (rng.normal(size=(3, 4, classes)) * scale).astype("float32")
    got = np.asarray(losses.kl_divergence(a, b, target="logits"))
    ref = kl64(*dist64(a, "logits"), dist64(b, "logits")[1])
    assert np.all(np.isfinite(got))
    assert np.all(got >= -1e-6 * max(scale, 1.0))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("from_logits", [True, False])
def test_sparse_kl_matches_float64_reference(rng, eps, from_logits):
    logits = (rng.normal(size=(2, 4, 5, 6)) * 3).astype("float32")
    labels = rng.integers(0, 6, size=(2, 4, 5))
    y_pred = logits if from_logits else np.exp(log_softmax64(logits)).astype("float32")
    got = losses.sparse_kl_divergence(
        labels, y_pred, from_logits=from_logits, label_smoothing=eps
    )
    ref = sparse_kl64(labels, np.log(y_pred) if not from_logits else logits, eps)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_sparse_kl_equals_keras_cross_entropy_without_smoothing(rng):
    logits = rng.normal(size=(2, 4, 4, 5)).astype("float32")
    labels = rng.integers(0, 5, size=(2, 4, 4))
    labels[0, 0] = 255
    ours = losses.SparseKLDivergence(ignore_class=255)(labels, logits)
    keras_ce = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=255
    )(labels, logits)
    np.testing.assert_allclose(float(ours), float(keras_ce), rtol=1e-6)


def test_jensen_shannon_matches_reference_and_is_bounded(rng):
    shape = (2, 3, 4, 5)
    y_true = random_target(rng, shape, "probabilities")
    y_pred = (rng.normal(size=shape) * 5).astype("float32")
    got = np.asarray(losses.jensen_shannon_divergence(y_true, y_pred))
    ref = js64(*dist64(y_true, "probabilities"), *dist64(y_pred, "logits"))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert np.all(got >= -1e-7) and np.all(got <= LOG2 + 1e-6)
    swapped = losses.jensen_shannon_divergence(
        y_pred, y_true, target="logits", from_logits=False
    )
    np.testing.assert_allclose(np.asarray(swapped), got, rtol=1e-5, atol=1e-6)


def test_channels_first_axis_matches_channels_last(rng):
    a = rng.normal(size=(2, 5, 3, 4)).astype("float32")
    b = rng.normal(size=(2, 5, 3, 4)).astype("float32")
    labels = rng.integers(0, 5, size=(2, 3, 4))
    last = losses.kl_divergence(a, b, target="logits")
    first = losses.kl_divergence(
        np.moveaxis(a, 1, -1), np.moveaxis(b, 1, -1), target="logits"
    )
    np.testing.assert_allclose(
        np.asarray(losses.kl_divergence(a, b, target="logits", axis=1)),
        np.asarray(first),
        rtol=1e-6,
    )
    assert last.shape == (2, 5, 3)
    sparse_first = losses.sparse_kl_divergence(labels, a, axis=1)
    sparse_last = losses.sparse_kl_divergence(labels, np.moveaxis(a, 1, -1))
    np.testing.assert_allclose(np.asarray(sparse_first), np.asarray(sparse_last))


# Hand-computed cases ---------------------------------------------------------


def test_hand_computed_values():
    one_hot = np.array([[1.0, 0.0]], dtype="float32")
    uniform_logits = np.zeros((1, 2), dtype="float32")
    # KL([1, 0] || [0.5, 0.5]) = log 2.
    kl = losses.kl_divergence(one_hot, uniform_logits)
    assert float(kl[0]) == pytest.approx(LOG2, rel=1e-6)
    # Reverse: KL([0.5, 0.5] || [1, 0]) is infinite; the zero target entry
    # is log(1.18e-38), so 0.5 * (log 0.5 - 0) + 0.5 * (log 0.5 + 87.34).
    rev = losses.kl_divergence(one_hot, uniform_logits, direction="reverse")
    expected = math.log(0.5) + 0.5 * -math.log(float(np.finfo("float32").tiny))
    assert float(rev[0]) == pytest.approx(expected, rel=1e-6)
    # Temperature 2: softmax([2, 0] / 2) vs uniform, times 4.
    p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    expected = 4 * float(np.sum(p * np.log(p / 0.5)))
    kl_t = losses.kl_divergence(
        np.array([[2.0, 0.0]]), uniform_logits, target="logits", temperature=2.0
    )
    assert float(kl_t[0]) == pytest.approx(expected, rel=1e-6)
    unscaled = losses.kl_divergence(
        np.array([[2.0, 0.0]]),
        uniform_logits,
        target="logits",
        temperature=2.0,
        scale_by_temperature_squared=False,
    )
    assert float(unscaled[0]) == pytest.approx(expected / 4, rel=1e-6)
    # Class weights multiply by the target's expected weight: 3 * log 2.
    weighted = losses.kl_divergence(one_hot, uniform_logits, class_weights=[3.0, 1])
    assert float(weighted[0]) == pytest.approx(3 * LOG2, rel=1e-6)
    # Sparse: -log 0.5; with full smoothing both sides are uniform: 0.
    logits = np.log(np.array([[0.5, 0.25, 0.25]], dtype="float32"))
    assert float(losses.sparse_kl_divergence(np.array([0]), logits)[0]) == (
        pytest.approx(LOG2, rel=1e-6)
    )
    smooth = losses.sparse_kl_divergence(
        np.array([1]), np.zeros((1, 3)), label_smoothing=1.0
    )
    assert abs(float(smooth[0])) < 1e-6
    weighted = losses.sparse_kl_divergence(
        np.array([0]), logits, class_weights=[2.0, 1.0, 1.0]
    )
    assert float(weighted[0]) == pytest.approx(2 * LOG2, rel=1e-6)
    # Jensen-Shannon of disjoint distributions is log 2; of equal ones 0.
    js = losses.jensen_shannon_divergence(
        one_hot, np.array([[0.0, 1.0]]), from_logits=False
    )
    assert float(js[0]) == pytest.approx(LOG2, rel=1e-6)
    js0 = losses.jensen_shannon_divergence(one_hot, one_hot, from_logits=False)
    assert abs(float(js0[0])) < 1e-7


# Extreme inputs and gradients ------------------------------------------------


def test_extreme_logits_give_true_value_and_gradient(value_and_grad):
    teacher = np.array([[[[1e4, 0.0]]]], dtype="float32")
    student = np.array([[[[0.0, 1e4]]]], dtype="float32")
    kl = losses.KLDivergence(target="logits")
    value, grad = value_and_grad(lambda s: kl(teacher, s), student)
    assert value == pytest.approx(1e4, rel=1e-6)
    np.testing.assert_allclose(grad, [[[[-1.0, 1.0]]]], atol=1e-6)
    # Probabilities far below Keras' 1e-7 clip (softmax of +-30 logits; Keras'
    # KLDivergence saturates near 16.1 on such inputs) keep their true value,
    # about 90 nats, and gradient q - p against float64.
    p = np.exp(log_softmax64([[[[30.0, 0.0, -30.0]]]])).astype("float32")
    s = np.array([[[[-40.0, 0.0, 50.0]]]], dtype="float32")
    value, grad = value_and_grad(lambda s: losses.KLDivergence()(p, s), s)
    p64 = p.astype("float64")
    expected = float(kl64(p64, np.log(p64), log_softmax64(s))[0, 0, 0])
    assert expected > 89 and value == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(grad, np.exp(log_softmax64(s)) - p64, atol=1e-6)
    # Sparse: label 0 against logits (-1e4, 1e4) costs 2e4 nats.
    sparse = losses.SparseKLDivergence()
    value, grad = value_and_grad(
        lambda s: sparse(np.array([[[0]]]), s), np.array([[[[-1e4, 1e4]]]], "float32")
    )
    assert value == pytest.approx(2e4, rel=1e-6)
    np.testing.assert_allclose(grad, [[[[-1.0, 1.0]]]], atol=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        losses.KLDivergence(target="logits"),
        losses.KLDivergence(target="logits", temperature=4.0, direction="reverse"),
        losses.KLDivergence(target="logits", class_weights=[1, 2, 3, 4]),
        losses.SparseKLDivergence(label_smoothing=0.1, ignore_class=255),
        losses.JensenShannonDivergence(target="logits"),
    ],
    ids=["kl", "kl-T-reverse", "kl-class-weights", "sparse", "js"],
)
def test_gradients_finite_for_extreme_logits(rng, value_and_grad, loss):
    student = (np.sign(rng.normal(size=(2, 3, 3, 4))) * 1e4).astype("float32")
    teacher = (np.sign(rng.normal(size=(2, 3, 3, 4))) * 1e4).astype("float32")
    if isinstance(loss, losses.SparseKLDivergence):
        teacher = rng.integers(0, 4, size=(2, 3, 3))
        teacher[0, 0, 0] = 255
    value, grad = value_and_grad(lambda t, s: loss(t, s), teacher, student, argnum=1)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    if not isinstance(loss, losses.SparseKLDivergence):
        _, grad_t = value_and_grad(lambda t, s: loss(t, s), teacher, student)
        assert np.all(np.isfinite(grad_t))


def test_zero_probabilities_in_targets_are_exact_and_differentiable(value_and_grad):
    target = np.array([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]], dtype="float32")
    logits = np.array([[[3.0, -1.0, 0.5], [0.0, 2.0, -3.0]]], dtype="float32")
    values = np.asarray(losses.kl_divergence(target, logits))
    ref = kl64(*dist64(target, "probabilities"), dist64(logits, "logits")[1])
    np.testing.assert_allclose(values, ref, rtol=1e-6)
    for kwargs in ({}, {"temperature": 3.0}, {"direction": "reverse"}):
        loss = losses.KLDivergence(**kwargs)
        for argnum in (0, 1):
            value, grad = value_and_grad(loss, target, logits, argnum=argnum)
            assert np.isfinite(value) and np.all(np.isfinite(grad)), kwargs
    value, grad = value_and_grad(
        losses.JensenShannonDivergence(), target, logits, argnum=0
    )
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Zero predicted probability where the target has mass: finite.
    q = np.array([[[0.0, 1.0, 0.0]]], dtype="float32")
    kl_q = losses.kl_divergence(target[:, :1], q, from_logits=False)
    assert float(kl_q[0, 0]) == pytest.approx(87.336, rel=1e-4)


@pytest.mark.parametrize(
    "loss, y_true",
    [
        (losses.SparseKLDivergence(ignore_class=255), np.full((2, 3, 3), 255)),
        (losses.KLDivergence(ignore_class=255), np.zeros((2, 3, 3, 4), "float32")),
        (
            losses.KLDivergence(ignore_class=255, temperature=2.0),
            np.zeros((2, 3, 3, 4), "float32"),
        ),
        (
            losses.JensenShannonDivergence(ignore_class=255),
            np.zeros((2, 3, 3, 4), "float32"),
        ),
    ],
    ids=["sparse", "kl", "kl-T", "js"],
)
def test_all_ignored_batch_gives_zero_and_zero_gradient(
    rng, value_and_grad, loss, y_true
):
    logits = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    value, grad = value_and_grad(lambda s: loss(y_true, s), logits)
    assert value == 0.0
    assert np.all(grad == 0.0)


# Reduction, masks and sample weights -------------------------------------------


def test_default_reduction_is_mean_over_non_ignored_pixels(rng):
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 4, 4))
    labels[0, :2] = 255
    valid = labels != 255
    per_pixel = sparse_kl64(np.where(valid, labels, 0), logits)
    loss = losses.SparseKLDivergence(ignore_class=255)
    assert float(loss(labels, logits)) == pytest.approx(per_pixel[valid].mean(), 1e-5)
    # Labels with a trailing axis of size 1 are accepted.
    assert float(loss(labels[..., None], logits)) == pytest.approx(
        per_pixel[valid].mean(), rel=1e-5
    )
    # Per-pixel values (reduction=None) are 0 on ignored pixels.
    none = losses.SparseKLDivergence(ignore_class=255, reduction=None)
    values = np.asarray(none(labels, logits))
    assert values.shape == labels.shape and np.all(values[~valid] == 0)
    # Sample weights multiply first; the denominator stays the valid count.
    weights = rng.uniform(size=labels.shape).astype("float32")
    expected = (per_pixel * weights)[valid].sum() / valid.sum()
    got = float(loss(labels, logits, sample_weight=weights))
    assert got == pytest.approx(expected, rel=1e-5)


def test_soft_target_zero_rows_are_ignored_only_with_ignore_class(rng):
    labels = rng.integers(0, 3, size=(2, 4, 4))
    labels[1, 1:] = 255
    target = np.eye(3, dtype="float32")[np.where(labels == 255, 0, labels)]
    target[labels == 255] = 0.0  # what one_hot(255, 3) gives
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    valid = labels != 255
    per_pixel = sparse_kl64(np.where(valid, labels, 0), logits)
    masked = losses.KLDivergence(ignore_class=255)(target, logits)
    assert float(masked) == pytest.approx(per_pixel[valid].mean(), rel=1e-5)
    plain = losses.KLDivergence()(target, logits)
    assert float(plain) == pytest.approx(per_pixel[valid].sum() / valid.size, 1e-5)


def test_mask_semantics_hold_inside_compiled_evaluate(rng):
    """Keras' compiled step (tf.function or jax.jit) sees the same mask."""
    logits = rng.normal(size=(4, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(4, 4, 4))
    labels[:2] = 255
    labels[3, 0, 0] = 7  # out of range: treated as ignored when traced
    valid = (labels != 255) & (labels != 7)
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss=losses.SparseKLDivergence(ignore_class=255))
    got = model.evaluate(logits, labels, batch_size=4, verbose=0)
    per_pixel = sparse_kl64(np.where(valid, labels, 0), logits)
    assert got == pytest.approx(per_pixel[valid].mean(), rel=1e-5)
    assert model.evaluate(logits[:2], labels[:2], batch_size=2, verbose=0) == 0.0


def test_weighted_sum_combines_klseg_and_keras_losses(rng):
    logits = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    labels = rng.integers(0, 4, size=(2, 3, 3))
    labels[0, 0] = 255
    weights = rng.uniform(size=labels.shape).astype("float32")
    kl = losses.SparseKLDivergence(ignore_class=255, label_smoothing=0.1)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)
    total = losses.WeightedSum([kl, ce], weights=[1.0, 0.5])
    expected = float(kl(labels, logits, weights)) + 0.5 * float(
        ce(labels, logits, weights)
    )
    assert float(total(labels, logits, sample_weight=weights)) == pytest.approx(
        expected, rel=1e-6
    )
    by_name = losses.WeightedSum(["SparseCategoricalCrossentropy"])
    assert isinstance(by_name.losses[0], keras.losses.Loss)


# Dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float32(rng, dtype):
    a = ops.cast(rng.normal(size=(2, 3, 3, 5)) * 4, dtype)
    b = ops.cast(rng.normal(size=(2, 3, 3, 5)) * 4, dtype)
    labels = rng.integers(0, 5, size=(2, 3, 3))
    a32, b32 = ops.cast(a, "float32"), ops.cast(b, "float32")
    for fn, args in [
        (losses.kl_divergence, {"target": "logits"}),
        (losses.jensen_shannon_divergence, {"target": "logits"}),
    ]:
        got = fn(a, b, **args)
        assert got.dtype == "float32"
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(fn(a32, b32, **args)), rtol=1e-6
        )
    sparse = losses.sparse_kl_divergence(labels, b)
    assert sparse.dtype == "float32"
    np.testing.assert_allclose(
        np.asarray(sparse), sparse_kl64(labels, np.asarray(b32)), rtol=1e-5
    )
    extreme = ops.cast(np.array([[1e4, -1e4]]), dtype)
    value = losses.kl_divergence(extreme, extreme[:, ::-1], target="logits")
    assert np.isfinite(float(value[0])) and float(value[0]) > 1e4


# Configuration and saving ----------------------------------------------------------

ALL_LOSSES = [
    losses.KLDivergence(
        target="log_probabilities",
        temperature=2.0,
        scale_by_temperature_squared=False,
        direction="reverse",
        ignore_class=255,
        class_weights=[1.0, 2.0, 0.5],
        axis=-1,
        reduction="sum",
        name="kl_custom",
        dtype="float32",
    ),
    losses.SparseKLDivergence(
        from_logits=False, label_smoothing=0.2, ignore_class=255, class_weights=[1, 2]
    ),
    losses.JensenShannonDivergence(target="logits", class_weights=[1.0, 3.0]),
    losses.WeightedSum(
        [
            losses.SparseKLDivergence(ignore_class=255),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ],
        weights=[1.0, 0.25],
    ),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: type(loss).__name__)
def test_get_config_round_trip(loss):
    assert_config_round_trip(loss, keras.losses)


def test_compiled_model_saves_and_loads(rng, tmp_path):
    from klseg import metrics

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(3, 1)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="adam",
        loss=losses.WeightedSum(
            [
                losses.SparseKLDivergence(ignore_class=255, label_smoothing=0.1),
                keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, ignore_class=255
                ),
            ],
            weights=[1.0, 0.5],
        ),
        metrics=[
            metrics.MeanIoU(3, ignore_class=255),
            metrics.PixelAccuracy(ignore_class=255),
            metrics.ExpectedCalibrationError(num_bins=10, ignore_class=255),
        ],
    )
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(4, 8, 8))
    y[:, 0] = 255
    model.optimizer.build(model.trainable_variables)
    before = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, losses.WeightedSum)
    after = loaded.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-5), key


def test_compiled_model_with_soft_targets_saves_and_loads(rng, tmp_path):
    from klseg import metrics

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.compile(
        loss=losses.KLDivergence(target="logits", temperature=2.0),
        metrics=[metrics.KLDivergence(target="logits", temperature=2.0)],
    )
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    teacher = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    model.optimizer.build(model.trainable_variables)
    before = model.evaluate(x, teacher, verbose=0, return_dict=True)
    model.save(tmp_path / "soft.keras")
    loaded = keras.saving.load_model(tmp_path / "soft.keras")
    after = loaded.evaluate(x, teacher, verbose=0, return_dict=True)
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert after["kl_divergence"] == pytest.approx(before["kl_divergence"], rel=1e-6)
    assert before["loss"] == pytest.approx(before["kl_divergence"], rel=1e-5)


def test_tiny_model_trains_with_sparse_kl(rng):
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = np.argmax(x, axis=-1)
    y[:, :2] = 255
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=losses.SparseKLDivergence(ignore_class=255, label_smoothing=0.05),
    )
    history = model.fit(x, y, epochs=6, batch_size=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert history[-1] < 0.7 * history[0]


# Errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, name",
    [
        (lambda: losses.KLDivergence(temperature=0.0), "temperature"),
        (lambda: losses.KLDivergence(temperature=float("nan")), "temperature"),
        (lambda: losses.KLDivergence(temperature="2"), "temperature"),
        (lambda: losses.KLDivergence(direction="both"), "direction"),
        (lambda: losses.KLDivergence(target="probs"), "target"),
        (lambda: losses.KLDivergence(from_logits="yes"), "from_logits"),
        (lambda: losses.KLDivergence(class_weights=[1, -1]), "class_weights"),
        (lambda: losses.KLDivergence(class_weights=[[1.0]]), "class_weights"),
        (lambda: losses.KLDivergence(axis="x"), "axis"),
        (
            lambda: losses.KLDivergence(target="logits", ignore_class=255),
            "ignore_class",
        ),
        (lambda: losses.SparseKLDivergence(label_smoothing=1.5), "label_smoothing"),
        (lambda: losses.SparseKLDivergence(ignore_class="255"), "ignore_class"),
        (lambda: losses.JensenShannonDivergence(target="scores"), "target"),
        (lambda: losses.WeightedSum([]), "losses"),
        (lambda: losses.WeightedSum([losses.KLDivergence()], [1, 2]), "weights"),
        (lambda: losses.WeightedSum([print]), "losses[0]"),
        (lambda: losses.kl_divergence([[1.0]], [[1.0]], temperature=-1), "temperature"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(factory, name):
    with pytest.raises(ValueError, match=rf"Received: {re.escape(name)}="):
        factory()


def test_bad_inputs_raise_clear_errors(rng):
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"y_true.shape=\(2, 4, 4, 2\).*y_pred.shape"):
        losses.KLDivergence(target="logits")(logits[..., :2], logits)
    with pytest.raises(ValueError, match=r"y_true.shape=\(2, 4, 3\).*y_pred.shape"):
        losses.SparseKLDivergence()(np.zeros((2, 4, 3)), logits)
    labels = rng.integers(0, 3, size=(2, 4, 4))
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\).*\[3\]"):
        losses.SparseKLDivergence(ignore_class=255)(labels, logits)
    labels[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"\[-1\]"):
        losses.sparse_kl_divergence(labels, logits)
    negative = np.full((1, 3), [1.5, -0.5, 0.0], dtype="float32")
    with pytest.raises(ValueError, match=r"min\(y_true\)=-0.5"):
        losses.KLDivergence()(negative, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"summing to 3"):
        losses.KLDivergence()(np.ones((1, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"min\(y_pred\)"):
        losses.KLDivergence(from_logits=False)(np.ones((1, 2)) / 2, -np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"one weight per class.*len\(class_weights\)"):
        losses.KLDivergence(target="logits", class_weights=[1, 2])(logits, logits)


def test_docstring_examples_run():
    import doctest

    from klseg import metrics

    for module in (losses, metrics):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
