"""Channel-wise distillation (klseg.losses.ChannelWiseKLDivergence).

Against a float64 reference written with loops: values, the mask rules
(labels with ignore_class, per-pixel weights), a student at half the
teacher's resolution, the batch mean, extreme logits, low-precision inputs,
saving. Runs on the TensorFlow and JAX backends.
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

from klseg import losses

IGNORE = 255


# float64 references ----------------------------------------------------------


def log_softmax64(x):
    x = np.asarray(x, "float64")
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def resize_bilinear64(x, height, width):
    """Bilinear resize of (B, h, w, C), half-pixel centres, edges clamped."""
    x = np.asarray(x, "float64")
    _, h, w, _ = x.shape

    def source(i, size_in, size_out):
        s = min(max((i + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1.0)
        lo = int(np.floor(s))
        return lo, min(lo + 1, size_in - 1), s - lo

    out = np.zeros((x.shape[0], height, width, x.shape[3]))
    for i in range(height):
        y0, y1, fy = source(i, h, height)
        for j in range(width):
            x0, x1, fx = source(j, w, width)
            top = (1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1]
            bottom = (1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]
            out[:, i, j] = (1 - fy) * top + fy * bottom
    return out


def cwd64(teacher, student, temperature, keep=None):
    """Per (image, channel) values and, per image, whether it has a kept pixel."""
    teacher = np.asarray(teacher, "float64")
    student = np.asarray(student, "float64")
    b, h, w, c = teacher.shape
    if student.shape[1:3] != (h, w):
        student = resize_bilinear64(student, h, w)
    if keep is None:
        keep = np.ones((b, h, w), bool)
    values = np.zeros((b, c))
    for n in range(b):
        if not keep[n].any():
            continue
        for ch in range(c):
            lp = log_softmax64(teacher[n, :, :, ch][keep[n]] / temperature)
            lq = log_softmax64(student[n, :, :, ch][keep[n]] / temperature)
            values[n, ch] = temperature**2 * np.sum(np.exp(lp) * (lp - lq))
    return values, keep.reshape(b, -1).any(-1)


def loss64(values, counted, image_weight=None):
    """Mean over counted (image, channel) pairs of image_weight * value."""
    if image_weight is None:
        image_weight = np.ones(len(values))
    if not counted.any():
        return 0.0
    weighted = values[counted] * np.asarray(image_weight)[counted, None]
    return weighted.sum() / weighted.size


def student_grad64(teacher, student, temperature):
    """d loss / d student logits (same sizes, nothing masked): T (Q - P) / (B C)."""
    b, h, w, c = teacher.shape
    grad = np.zeros((b, h, w, c))
    for n in range(b):
        for ch in range(c):
            p = np.exp(log_softmax64(teacher[n, :, :, ch] / temperature))
            q = np.exp(log_softmax64(student[n, :, :, ch] / temperature))
            grad[n, :, :, ch] = temperature * (q - p) / (b * c)
    return grad


def logits(rng, shape, scale=3.0):
    return (rng.normal(size=shape) * scale).astype("float32")


# Values ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_matches_float64_reference(rng, temperature):
    teacher, student = logits(rng, (2, 5, 6, 3)), logits(rng, (2, 5, 6, 3))
    values, counted = cwd64(teacher, student, temperature)
    got = losses.channel_wise_kl_divergence(teacher, student, temperature=temperature)
    assert tuple(got.shape) == (2, 3) and got.dtype == "float32"
    np.testing.assert_allclose(np.asarray(got), values, rtol=1e-5, atol=1e-6)
    loss = losses.ChannelWiseKLDivergence(temperature=temperature)
    assert float(loss(teacher, student)) == pytest.approx(
        loss64(values, counted), rel=1e-5
    )


def test_hand_computed_values():
    # One channel, two pixels: P = (.75, .25), Q = (.5, .5) at T = 1.
    teacher = np.log(np.array([3.0, 1.0])).reshape(1, 1, 2, 1)
    student = np.zeros((1, 1, 2, 1))
    expected = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    got = losses.channel_wise_kl_divergence(teacher, student, temperature=1.0)
    assert float(got[0, 0]) == pytest.approx(expected, rel=1e-6)
    # At T = 2 the teacher is (sqrt 3, 1) / (sqrt 3 + 1), and the value x 4.
    p = np.array([3**0.5, 1.0]) / (3**0.5 + 1)
    expected = 4 * np.sum(p * np.log(p / 0.5))
    got = losses.channel_wise_kl_divergence(teacher, student, temperature=2.0)
    assert float(got[0, 0]) == pytest.approx(expected, rel=1e-6)
    # A per-channel shift of the logits leaves the spatial softmax unchanged.
    shifted = student + np.array([5.0])
    got = losses.channel_wise_kl_divergence(teacher, teacher + shifted)
    assert float(got[0, 0]) == pytest.approx(0.0, abs=1e-6)


def test_student_gradient_is_temperature_times_q_minus_p(rng, value_and_grad):
    teacher, student = logits(rng, (2, 3, 4, 3)), logits(rng, (2, 3, 4, 3))
    loss = losses.ChannelWiseKLDivergence(temperature=2.0)
    value, grad = value_and_grad(lambda s: loss(teacher, s), student)
    assert value == pytest.approx(loss64(*cwd64(teacher, student, 2.0)), rel=1e-5)
    np.testing.assert_allclose(
        grad, student_grad64(teacher, student, 2.0), rtol=1e-4, atol=1e-7
    )


# Different strides -----------------------------------------------------------


def test_student_at_half_resolution_is_resized_to_the_teacher(rng):
    teacher, student = logits(rng, (2, 6, 8, 3)), logits(rng, (2, 3, 4, 3))
    values, counted = cwd64(teacher, student, 2.0)
    got = losses.channel_wise_kl_divergence(teacher, student)
    np.testing.assert_allclose(np.asarray(got), values, rtol=1e-5, atol=1e-6)
    loss = losses.ChannelWiseKLDivergence()
    assert float(loss(teacher, student)) == pytest.approx(
        loss64(values, counted), rel=1e-5
    )
    # The student, not the teacher, is resized: comparing at the student's
    # size (the teacher downsampled) gives another value.
    small = np.asarray(ops.image.resize(teacher, (3, 4), interpolation="bilinear"))
    downsampled, _ = cwd64(small, student, 2.0)
    assert not np.allclose(np.asarray(got), downsampled, rtol=1e-3)


def test_half_resolution_student_with_ignored_pixels(rng, value_and_grad):
    teacher, student = logits(rng, (2, 6, 8, 3)), logits(rng, (2, 3, 4, 3))
    labels = rng.integers(0, 3, size=(2, 6, 8))
    labels[0, :2] = IGNORE
    values, counted = cwd64(teacher, student, 2.0, keep=labels != IGNORE)
    loss = losses.ChannelWiseKLDivergence(ignore_class=IGNORE)
    value, grad = value_and_grad(lambda s: loss(teacher, s, labels=labels), student)
    assert value == pytest.approx(loss64(values, counted), rel=1e-5)
    assert grad.shape == student.shape and np.all(np.isfinite(grad))


# Left-out pixels -------------------------------------------------------------


def test_ignored_pixels_are_left_out_of_both_softmaxes(rng):
    teacher, student = logits(rng, (3, 4, 5, 3)), logits(rng, (3, 4, 5, 3))
    labels = rng.integers(0, 3, size=(3, 4, 5))
    labels[rng.random((3, 4, 5)) < 0.3] = IGNORE
    keep = labels != IGNORE
    values, counted = cwd64(teacher, student, 2.0, keep=keep)
    got = losses.channel_wise_kl_divergence(teacher, student, mask=keep)
    np.testing.assert_allclose(np.asarray(got), values, rtol=1e-5, atol=1e-6)
    loss = losses.ChannelWiseKLDivergence(ignore_class=IGNORE)
    expected = loss64(values, counted)
    assert float(loss(teacher, student, labels=labels)) == pytest.approx(
        expected, rel=1e-5
    )
    assert float(loss(teacher, student, labels=labels[..., None])) == pytest.approx(
        expected, rel=1e-5
    )
    # What lies under an ignored pixel does not matter.
    noise = np.where(keep[..., None], 0.0, logits(rng, (3, 4, 5, 3), 1e3))
    moved = loss(teacher + noise, student - noise, labels=labels)
    assert float(moved) == pytest.approx(expected, rel=1e-5)
    # Only weighting the ignored pixels' terms zero would differ.
    plain, _ = cwd64(teacher, student, 2.0)
    assert not np.allclose(plain, values, rtol=1e-3)


def test_masks_hold_for_logits_far_from_zero(rng):
    """Left-out pixels stay out however large or small the kept logits are."""
    keep = rng.random((2, 4, 5)) > 0.3
    loss = losses.ChannelWiseKLDivergence()
    for offset, spread in [(-1e20, 1e14), (1e20, 1e14)]:
        teacher = (offset + spread * rng.normal(size=(2, 4, 5, 2))).astype("float32")
        student = (offset + spread * rng.normal(size=(2, 4, 5, 2))).astype("float32")
        expected = loss64(*cwd64(teacher, student, 2.0, keep=keep))
        got = float(loss(teacher, student, sample_weight=keep))
        assert got == pytest.approx(expected, rel=1e-4), offset


def test_per_pixel_sample_weight_masks_and_scales(rng):
    teacher, student = logits(rng, (3, 4, 5, 3)), logits(rng, (3, 4, 5, 3))
    keep = rng.random((3, 4, 5)) > 0.3
    values, counted = cwd64(teacher, student, 2.0, keep=keep)
    loss = losses.ChannelWiseKLDivergence()
    as_mask = float(loss(teacher, student, sample_weight=keep.astype("float32")))
    assert as_mask == pytest.approx(loss64(values, counted), rel=1e-5)
    bool_mask = float(loss(teacher, student, sample_weight=keep[..., None]))
    assert bool_mask == pytest.approx(as_mask, rel=1e-6)
    # Other weights: the image is scaled by the mean weight of its kept pixels.
    weights = np.where(keep, rng.uniform(0.5, 2.0, (3, 4, 5)), 0.0)
    scale = np.array([weights[n][keep[n]].mean() for n in range(3)])
    weighted = float(loss(teacher, student, sample_weight=weights))
    assert weighted == pytest.approx(loss64(values, counted, scale), rel=1e-5)
    # A constant positive per-pixel weight is a per-image weight.
    per_image = np.array([0.5, 2.0, 1.5], dtype="float32")
    values, counted = cwd64(teacher, student, 2.0)
    expected = loss64(values, counted, per_image)
    assert float(loss(teacher, student, sample_weight=per_image)) == pytest.approx(
        expected, rel=1e-5
    )
    broadcast = per_image[:, None, None]
    assert float(loss(teacher, student, sample_weight=broadcast)) == pytest.approx(
        expected, rel=1e-5
    )
    # At 0 they differ: a per-image weight of 0 keeps the image in the
    # denominator (as in Keras); an image with every pixel at 0 has no kept
    # pixel and is left out of the mean.
    per_image[2] = 0.0
    zero_image = float(loss(teacher, student, sample_weight=per_image))
    assert zero_image == pytest.approx(loss64(values, counted, per_image), rel=1e-5)
    zero_pixels = float(loss(teacher, student, sample_weight=per_image[:, None, None]))
    assert zero_pixels == pytest.approx(zero_image * 3 / 2, rel=1e-5)


def test_labels_and_per_pixel_weights_combine(rng):
    teacher, student = logits(rng, (2, 4, 4, 2)), logits(rng, (2, 4, 4, 2))
    labels = rng.integers(0, 2, size=(2, 4, 4))
    labels[:, 0] = IGNORE
    weights = np.ones((2, 4, 4), "float32")
    weights[:, :, 0] = 0.0
    keep = (labels != IGNORE) & (weights > 0)
    expected = loss64(*cwd64(teacher, student, 2.0, keep=keep))
    loss = losses.ChannelWiseKLDivergence(ignore_class=IGNORE)
    got = float(loss(teacher, student, sample_weight=weights, labels=labels))
    assert got == pytest.approx(expected, rel=1e-5)


# Batch mean ------------------------------------------------------------------


def test_batch_value_is_the_mean_of_the_per_image_values(rng):
    teacher, student = logits(rng, (3, 4, 5, 3)), logits(rng, (3, 4, 5, 3))
    loss = losses.ChannelWiseKLDivergence(temperature=3.0)
    single = [float(loss(teacher[n : n + 1], student[n : n + 1])) for n in range(3)]
    assert float(loss(teacher, student)) == pytest.approx(np.mean(single), rel=1e-5)
    # An image with every pixel ignored is left out of the mean.
    labels = np.zeros((3, 4, 5), "int32")
    labels[1] = IGNORE
    masked = losses.ChannelWiseKLDivergence(temperature=3.0, ignore_class=IGNORE)
    got = float(masked(teacher, student, labels=labels))
    assert got == pytest.approx((single[0] + single[2]) / 2, rel=1e-5)
    values = masked.call((teacher, labels != IGNORE), student)
    assert np.all(np.asarray(values)[1] == 0.0)


def test_all_ignored_batch_gives_zero_and_zero_gradient(rng, value_and_grad):
    teacher, student = logits(rng, (2, 3, 3, 2)), logits(rng, (2, 3, 3, 2))
    labels = np.full((2, 3, 3), IGNORE)
    loss = losses.ChannelWiseKLDivergence(ignore_class=IGNORE)
    value, grad = value_and_grad(lambda s: loss(teacher, s, labels=labels), student)
    assert value == 0.0 and np.all(grad == 0.0)
    value, grad = value_and_grad(
        lambda t: loss(t, student, labels=labels), teacher, argnum=0
    )
    assert value == 0.0 and np.all(grad == 0.0)


# Extreme inputs ----------------------------------------------------------------


def test_logits_of_1e4_give_the_reference_value(rng):
    signs = np.where(rng.random((2, 3, 4, 3)) > 0.5, 1.0, -1.0)
    teacher = (1e4 * signs).astype("float32")
    student = (-1e4 * signs + logits(rng, (2, 3, 4, 3), 1e3)).astype("float32")
    for temperature in (1.0, 2.0):
        values, counted = cwd64(teacher, student, temperature)
        got = losses.ChannelWiseKLDivergence(temperature=temperature)
        assert float(got(teacher, student)) == pytest.approx(
            loss64(values, counted), rel=1e-5
        )


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 2.0, 1e3])
@pytest.mark.parametrize("scale", [1e4, 3e38])
def test_extreme_logits_give_finite_values_and_gradients(
    rng, value_and_grad, temperature, scale
):
    signs = np.where(rng.random((3, 3, 4, 2)) > 0.5, 1.0, -1.0)
    teacher = (scale * signs).astype("float32")
    student = (-scale * signs).astype("float32")
    student[2] = scale  # a constant map: a uniform distribution
    labels = np.zeros((3, 3, 4), "int32")
    labels[0, 0] = IGNORE
    labels[1] = IGNORE  # no kept pixel
    loss = losses.ChannelWiseKLDivergence(temperature=temperature, ignore_class=IGNORE)
    for argnum in (0, 1):
        value, grad = value_and_grad(
            lambda t, s: loss(t, s, labels=labels), teacher, student, argnum=argnum
        )
        assert np.isfinite(value) and value > 0
        assert np.all(np.isfinite(grad))
        assert np.all(grad[1] == 0.0)
    # Constant logits on both sides: equal (uniform) distributions.
    flat = np.full((1, 3, 4, 2), scale, "float32")
    value, grad = value_and_grad(lambda s: loss(flat, s, labels=labels[:1]), flat)
    assert value == pytest.approx(0.0, abs=1e-6) and np.all(np.isfinite(grad))


# Mixed precision ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float32(rng, dtype):
    teacher = ops.cast(logits(rng, (2, 4, 4, 3)), dtype)
    student = ops.cast(logits(rng, (2, 2, 2, 3)), dtype)
    t32, s32 = (
        np.asarray(ops.cast(teacher, "float32")),
        np.asarray(ops.cast(student, "float32")),
    )
    got = losses.channel_wise_kl_divergence(teacher, student)
    assert got.dtype == "float32"
    np.testing.assert_allclose(
        np.asarray(got), cwd64(t32, s32, 2.0)[0], rtol=1e-5, atol=1e-6
    )
    big = ops.cast(np.where(rng.random((1, 4, 4, 3)) > 0.5, 6e4, -6e4), dtype)
    value = losses.ChannelWiseKLDivergence()(big, -big)
    assert np.isfinite(float(value)) and float(value) > 1e4


# Configuration and saving ------------------------------------------------------


def test_get_config_round_trip():
    loss = losses.ChannelWiseKLDivergence(
        temperature=4.0,
        ignore_class=IGNORE,
        reduction="sum",
        name="cwd",
        dtype="float32",
    )
    config = loss.get_config()
    assert config["temperature"] == 4.0 and config["ignore_class"] == IGNORE
    clone = losses.ChannelWiseKLDivergence.from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is losses.ChannelWiseKLDivergence
    assert restored.get_config() == config


def test_compiled_model_with_a_coarser_student_trains_saves_and_loads(rng, tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(3, 1, strides=2)(inputs)  # stride 2
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=losses.ChannelWiseKLDivergence(temperature=2.0),
    )
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    teacher = logits(rng, (4, 8, 8, 3), 2.0)
    mask = (rng.random((4, 8, 8)) > 0.25).astype("float32")
    mask[3] = 0.0
    before = model.evaluate(x, teacher, sample_weight=mask, batch_size=4, verbose=0)
    expected = loss64(*cwd64(teacher, model.predict(x, verbose=0), 2.0, mask > 0))
    assert before == pytest.approx(expected, rel=1e-5)
    history = model.fit(
        x, teacher, sample_weight=mask, batch_size=4, epochs=8, verbose=0
    ).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < 0.95 * history[0]
    after_fit = model.evaluate(x, teacher, sample_weight=mask, batch_size=4, verbose=0)
    model.save(tmp_path / "cwd.keras")
    loaded = keras.saving.load_model(tmp_path / "cwd.keras")
    assert isinstance(loaded.loss, losses.ChannelWiseKLDivergence)
    assert loaded.loss.get_config() == model.loss.get_config()
    again = loaded.evaluate(x, teacher, sample_weight=mask, batch_size=4, verbose=0)
    assert again == pytest.approx(after_fit, rel=1e-6)


# Errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, name",
    [
        (lambda: losses.ChannelWiseKLDivergence(temperature=9e-4), "temperature"),
        (lambda: losses.ChannelWiseKLDivergence(temperature=1.1e3), "temperature"),
        (lambda: losses.ChannelWiseKLDivergence(temperature="2"), "temperature"),
        (lambda: losses.ChannelWiseKLDivergence(ignore_class="255"), "ignore_class"),
        (
            lambda: losses.channel_wise_kl_divergence(
                np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)), temperature=0.0
            ),
            "temperature",
        ),
        (
            lambda: losses.ChannelWiseKLDivergence()(
                np.zeros((1, 2, 2, 1)),
                np.zeros((1, 2, 2, 1)),
                labels=np.zeros((1, 2, 2)),
            ),
            "labels",
        ),
        (
            lambda: losses.ChannelWiseKLDivergence(ignore_class=IGNORE)(
                np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1))
            ),
            "labels",
        ),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(factory, name):
    with pytest.raises(ValueError, match=rf"Received: {re.escape(name)}="):
        factory()


def test_bad_shapes_raise_clear_errors(rng):
    teacher = logits(rng, (2, 4, 4, 3))
    loss = losses.ChannelWiseKLDivergence()
    with pytest.raises(
        ValueError, match=r"y_true.shape=\(2, 4, 4, 3\).*\(2, 4, 4, 2\)"
    ):
        loss(teacher, teacher[..., :2])
    with pytest.raises(ValueError, match=r"y_pred.shape=\(2, 4, 4\)"):
        loss(teacher, teacher[..., 0])
    with pytest.raises(ValueError, match=r"sample_weight.shape=\(2, 2, 2\)"):
        loss(teacher, teacher, sample_weight=np.ones((2, 2, 2)))
    masked = losses.ChannelWiseKLDivergence(ignore_class=IGNORE)
    with pytest.raises(ValueError, match=r"labels.shape=\(2, 3, 4\)"):
        masked(teacher, teacher, labels=np.zeros((2, 3, 4)))


def test_docstring_examples_run():
    import doctest

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for obj in (losses.channel_wise_kl_divergence, losses.ChannelWiseKLDivergence):
        for test in finder.find(obj, globs=vars(losses)):
            runner.run(test)
    assert runner.tries >= 4 and runner.failures == 0
