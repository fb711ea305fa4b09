"""The corners of the KL term and the losses, against float64 references.

Pixels without a stored source prediction, batch make-up of the logged
losses, per-image weights and tensor-like inputs, loss sums with Keras'
dense losses, extreme logits and temperatures, synchronised BatchNorm.
Runs on the TensorFlow and JAX backends (TensorFlow-only parts say so).
"""

import math
import re

import keras
import numpy as np
import pytest
from helpers import log_softmax64, random_images, tempered_kl64, tiny_unet

from klseg import finetune, losses
from klseg.errors import InvalidArgumentError
from klseg.finetune import KLRegularizedModel

IGNORE = 255
SIZE = 16


def _ce_pixels(logits, labels):
    lp = log_softmax64(logits)
    safe = np.where(labels == IGNORE, 0, labels)
    return -np.take_along_axis(lp, safe[..., None], -1)[..., 0]


def _constant_model(logits):
    """A source model whose logits are the same at every pixel, so its
    prediction on an augmented image is the stored map moved along."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(0.0)(inputs)
    outputs = keras.layers.Conv2D(
        len(logits),
        1,
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(logits),
    )(x)
    return keras.Model(inputs, outputs)


def _compiled(model, lr=0.0):
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
    )
    return model


# Pixels without a stored source prediction --------------------------------


def test_unfilled_rows_alone_enter_the_kl_mean():
    """Hand-zeroed stored rows (as augmentation fills them): the KL term is
    the mean over the other pixels, for target and source images alike."""
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    model = _compiled(
        KLRegularizedModel(
            student, source, kl_weight=1.0, temperature=2.0, kl_inputs="both"
        )
    )
    images, src_images = random_images(2, 0, SIZE), random_images(2, 1, SIZE)
    stored = finetune.store_source_predictions(source, images, verbose=0)
    stored_src = finetune.store_source_predictions(source, src_images, verbose=0)
    stored[0, :5] = 0  # filled border rows
    stored[1, :, -3:] = 0
    stored_src[1, 7:] = 0
    no_labels = np.full((2, SIZE, SIZE), IGNORE, "int32")
    x = {
        "images": images,
        "source_images": src_images,
        "source_probs": stored,
        "source_images_probs": stored_src,
    }
    both = np.concatenate([stored, stored_src]).astype("float64")
    has = both.sum(-1) > 0
    student_logits = np.concatenate(
        [student.predict_on_batch(images), student.predict_on_batch(src_images)]
    )
    with np.errstate(divide="ignore"):
        teacher = np.log(np.where(has[..., None], both, 1.0))
    pixels = tempered_kl64(teacher, student_logits, 2.0)
    expected = pixels[has].mean()
    got = float(model.compute_loss(x, no_labels, model(x), training=False))
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    # The old rule (a zero row as a uniform teacher, every pixel counted)
    # gives another value: the test can fail.
    uniform = np.where(has[..., None], teacher, 0.0)
    assert abs(tempered_kl64(uniform, student_logits, 2.0).mean() - got) > 1e-3

    # Live predictions on the same images: equal on the unfilled pixels.
    live = {"images": images, "source_images": src_images}
    values = tempered_kl64(
        np.concatenate(
            [source.predict_on_batch(images), source.predict_on_batch(src_images)]
        ),
        student_logits,
        2.0,
    )
    np.testing.assert_allclose(values[has].mean(), got, rtol=2e-3)
    live_loss = float(model.compute_loss(live, no_labels, model(live), training=False))
    np.testing.assert_allclose(live_loss, values.mean(), rtol=2e-5)


def test_strong_augmentation_fills_are_left_out_and_stored_equals_live():
    from klseg import data

    source = _constant_model([1.5, -0.5, 0.25])
    student = tiny_unet(seed=2)
    n = 6
    images = random_images(n, 0, SIZE)
    masks = np.random.default_rng(0).integers(0, 3, (n, SIZE, SIZE)).astype("uint8")
    stored = finetune.store_source_predictions(source, images, verbose=0)
    dataset = data.make_dataset(
        (images, masks),
        batch_size=3,
        image_size=SIZE,
        augment="strong",
        seed=5,
        extra_maps={"source_probs": stored},
    )
    model = _compiled(
        KLRegularizedModel(
            student, source, kl_weight=0.5, temperature=2.0, kl_inputs="target"
        )
    )
    filled_total = 0
    for x, y in dataset:
        x = {key: np.asarray(value) for key, value in x.items()}
        y = np.asarray(y)
        probs = x["source_probs"].astype("float64")
        has = probs.sum(-1) > 0
        filled_total += int((~has).sum())
        # Filled pixels carry no label either.
        assert np.all(y[~has] == IGNORE)
        student_logits = student.predict_on_batch(x["images"])
        with np.errstate(divide="ignore"):
            stored_teacher = np.log(np.where(has[..., None], probs, 1.0))
        kl_stored = tempered_kl64(stored_teacher, student_logits, 2.0)[has].mean()
        live_teacher = source.predict_on_batch(x["images"])
        kl_live = tempered_kl64(live_teacher, student_logits, 2.0)[has].mean()
        valid = y != IGNORE
        task = _ce_pixels(student_logits, y)[valid].mean() if valid.any() else 0.0

        logs = model.evaluate(x, y, batch_size=3, verbose=0, return_dict=True)
        np.testing.assert_allclose(logs["kl_loss"], kl_stored, rtol=2e-5)
        np.testing.assert_allclose(logs["task_loss"], task, rtol=2e-5, atol=1e-7)
        # Stored (float16) and live agree on the pixels with a prediction.
        np.testing.assert_allclose(kl_stored, kl_live, rtol=2e-3)
        live = {"images": x["images"]}
        stored_loss = float(model.compute_loss(x, y, model(x), training=False))
        np.testing.assert_allclose(stored_loss, task + 0.5 * kl_stored, rtol=2e-5)
        if has.all():
            live_loss = float(model.compute_loss(live, y, model(live), training=False))
            np.testing.assert_allclose(live_loss, stored_loss, rtol=2e-3)
    assert filled_total > 0  # the strong preset's affine warp filled pixels


# Batch make-up --------------------------------------------------------------


def _batch_data():
    n = 6
    rng = np.random.default_rng(3)
    images = random_images(n, 4, SIZE)
    masks = rng.integers(0, 3, (n, SIZE, SIZE)).astype("int32")
    masks[0, :10] = IGNORE
    masks[2:4] = IGNORE  # two unlabelled images: a label-free batch of 2
    masks[5, :, 3:] = IGNORE
    return images, masks


def test_logged_losses_do_not_depend_on_batch_make_up():
    images, masks = _batch_data()
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    model = _compiled(
        KLRegularizedModel(
            student,
            source,
            kl_weight=0.7,
            temperature=2.0,
            kl_inputs="target",
            student_bn="frozen",
        )
    )
    student_logits = student.predict_on_batch(images)
    valid = masks != IGNORE
    task = _ce_pixels(student_logits, masks)[valid].mean()
    kl = tempered_kl64(source.predict_on_batch(images), student_logits, 2.0).mean()
    expected = {"task_loss": task, "kl_loss": kl, "loss": task + 0.7 * kl}

    for batch_size in (1, 2, 3, 4):
        logs = model.evaluate(
            images, masks, batch_size=batch_size, verbose=0, return_dict=True
        )
        for key, value in expected.items():
            np.testing.assert_allclose(logs[key], value, rtol=1e-5, err_msg=key)
        # fit logs the same epoch means (a zero learning rate keeps the
        # weights, frozen BatchNorm the inference-mode outputs).
        history = model.fit(
            images, masks, batch_size=batch_size, epochs=1, shuffle=False, verbose=0
        )
        for key, value in expected.items():
            np.testing.assert_allclose(
                history.history[key][0], value, rtol=1e-5, err_msg=key
            )


def test_the_optimised_objective_stays_the_batch_mean():
    images, masks = _batch_data()
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    model = _compiled(
        KLRegularizedModel(student, source, kl_weight=0.7, kl_inputs="target")
    )
    x, y = images[:3], masks[:3]  # one labelled pixel-rich, one partial, one none
    student_logits = student.predict_on_batch(x)
    valid = y != IGNORE
    task = _ce_pixels(student_logits, y)[valid].mean()
    kl = tempered_kl64(source.predict_on_batch(x), student_logits, 2.0).mean()
    got = float(model.compute_loss(x, y, model(x), training=False))
    np.testing.assert_allclose(got, task + 0.7 * kl, rtol=2e-5)


# Per-image weights and tensor-like inputs -----------------------------------


def _all_losses():
    return [
        (losses.SparseKLDivergence(ignore_class=IGNORE, label_smoothing=0.1), "labels"),
        (losses.KLDivergence(temperature=2.0, ignore_class=IGNORE), "probs"),
        (losses.JensenShannonDivergence(target="logits"), "logits"),
        (
            losses.WeightedSum(
                [
                    losses.SparseKLDivergence(ignore_class=IGNORE),
                    keras.losses.CategoricalFocalCrossentropy(from_logits=True),
                ],
                weights=[1.0, 2.0],
            ),
            "labels",
        ),
    ]


def _targets(kind, labels, rng):
    if kind == "labels":
        return labels
    logits = rng.normal(size=labels.shape + (3,)).astype("float32")
    if kind == "logits":
        return logits
    probs = np.exp(log_softmax64(logits)).astype("float32")
    probs[labels == IGNORE] = 0.0
    return probs


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("width", [2, 5])  # 2: the batch size, where (2,) broadcast
def test_per_image_weights_broadcast_over_pixels(index, width):
    loss, kind = _all_losses()[index]
    rng = np.random.default_rng(index)
    labels = rng.integers(0, 3, (2, 3, width))
    labels[0, 0] = IGNORE
    y_true = _targets(kind, labels, rng)
    logits = rng.normal(size=(2, 3, width, 3)).astype("float32")
    per_image = np.array([0.25, 2.0], "float32")
    got = float(loss(y_true, logits, sample_weight=per_image))
    pixel = np.broadcast_to(per_image[:, None, None], labels.shape)
    np.testing.assert_allclose(
        got, float(loss(y_true, logits, sample_weight=per_image[:, None, None]))
    )
    np.testing.assert_allclose(got, float(loss(y_true, logits, sample_weight=pixel)))
    # Weighting each image is not weighting nothing: the test can fail.
    assert abs(got - float(loss(y_true, logits))) > 1e-4
    # Lists and variables are converted on entry.
    as_lists = float(
        loss(y_true.tolist(), logits.tolist(), sample_weight=per_image.tolist())
    )
    np.testing.assert_allclose(as_lists, got, rtol=1e-6)
    variable = keras.Variable(logits)
    np.testing.assert_allclose(
        float(loss(y_true, variable, sample_weight=per_image)), got, rtol=1e-6
    )


def test_per_image_weights_against_float64():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (3, 4, 3))
    labels[1, :2] = IGNORE
    logits = rng.normal(size=(3, 4, 3, 3)).astype("float32")
    per_image = np.array([1.0, 0.0, 3.0], "float32")
    got = float(
        losses.SparseKLDivergence(ignore_class=IGNORE)(labels, logits, per_image)
    )
    valid = labels != IGNORE
    weighted = _ce_pixels(logits, labels) * per_image[:, None, None]
    np.testing.assert_allclose(got, weighted[valid].sum() / valid.sum(), rtol=1e-5)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.Variable is TensorFlow's"
)
def test_tensorflow_variables_as_inputs(value_and_grad):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (2, 4, 4))
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    variable = tf.Variable(logits)
    loss = losses.SparseKLDivergence()
    np.testing.assert_allclose(
        float(loss(labels, variable)), _ce_pixels(logits, labels).mean(), rtol=1e-5
    )
    per_pixel = losses.sparse_kl_divergence(tf.Variable(labels), variable)
    np.testing.assert_allclose(
        np.asarray(per_pixel), _ce_pixels(logits, labels), rtol=1e-5
    )
    teacher = tf.Variable(logits[::-1].copy())
    kl = losses.KLDivergence(target="logits")(teacher, variable)
    np.testing.assert_allclose(
        float(kl), tempered_kl64(logits[::-1], logits, 1.0).mean(), rtol=1e-5
    )
    # A custom loop that optimises logits directly gets a gradient.
    with tf.GradientTape() as tape:
        value = loss(labels, variable)
    grad = tape.gradient(value, variable)
    assert grad is not None and np.all(np.isfinite(grad.numpy()))


# WeightedSum with Keras' dense losses ---------------------------------------


def _dice64(labels, logits):
    valid = labels != IGNORE
    t = np.eye(logits.shape[-1])[np.where(valid, labels, 0)] * valid[..., None]
    p = np.exp(log_softmax64(logits)) * valid[..., None]
    return 1.0 - 2.0 * (t * p).sum() / (t.sum() + p.sum())


def _focal64(labels, logits, alpha=0.25, gamma=2.0):
    valid = labels != IGNORE
    p = np.exp(log_softmax64(logits))
    t = np.eye(logits.shape[-1])[np.where(valid, labels, 0)]
    values = -(alpha * (1 - p) ** gamma * t * np.log(p)).sum(-1)
    return values[valid].mean()


def test_weighted_sum_with_dice_and_focal_on_sparse_masks():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (2, 6, 5))
    labels[0, :2] = IGNORE
    labels[1, :, 4] = IGNORE
    logits = (rng.normal(size=(2, 6, 5, 3)) * 2).astype("float32")
    kl = losses.SparseKLDivergence(ignore_class=IGNORE)
    total = losses.WeightedSum(
        [
            kl,
            keras.losses.Dice(),
            keras.losses.CategoricalFocalCrossentropy(from_logits=True),
            keras.losses.CategoricalFocalCrossentropy(),  # takes probabilities
        ],
        weights=[1.0, 0.5, 2.0, 3.0],
    )
    valid = labels != IGNORE
    ce = _ce_pixels(logits, labels)[valid].mean()
    expected = (
        ce
        + 0.5 * _dice64(labels, logits)
        + 2.0 * _focal64(labels, logits)
        + 3.0 * _focal64(labels, logits)
    )
    np.testing.assert_allclose(float(total(labels, logits)), expected, rtol=1e-5)
    # Labels with a trailing axis of 1 are labels too.
    np.testing.assert_allclose(
        float(total(labels[..., None], logits)), expected, rtol=1e-5
    )
    # An in-range ignore_class is ignored by the dense parts as well.
    dice = losses.WeightedSum([keras.losses.Dice()], ignore_class=2)
    np.testing.assert_allclose(
        float(dice(labels, logits)),
        _dice64(np.where(labels == 2, IGNORE, labels), logits),
        rtol=1e-5,
    )
    # Probabilities in: from_logits=False.
    probs = np.exp(log_softmax64(logits)).astype("float32")
    from_probs = losses.WeightedSum(
        [losses.SparseKLDivergence(ignore_class=IGNORE), keras.losses.Dice()],
        from_logits=False,
    )
    np.testing.assert_allclose(
        float(from_probs(labels, probs)), ce + _dice64(labels, logits), rtol=1e-5
    )


def test_weighted_sum_with_keras_parts_saves_and_loads(tmp_path):
    loss = losses.WeightedSum(
        [
            losses.SparseKLDivergence(ignore_class=IGNORE),
            keras.losses.Dice(),
            keras.losses.CategoricalFocalCrossentropy(from_logits=True, gamma=1.5),
        ],
        weights=[1.0, 0.5, 0.25],
        ignore_class=None,
        from_logits=True,
    )
    config = loss.get_config()
    clone = losses.WeightedSum.from_config(config)
    assert clone.get_config() == config
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.compile(optimizer="sgd", loss=loss)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 3, (2, 8, 8))
    labels[0, :3] = IGNORE
    before = model.evaluate(images, labels, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, losses.WeightedSum)
    assert type(loaded.loss.losses[1]) is keras.losses.Dice
    np.testing.assert_allclose(loaded.evaluate(images, labels, verbose=0), before)


# Extreme logits and temperatures --------------------------------------------

BIG = np.float32(3e38)


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_largest_logits_give_finite_values_and_gradients(
    value_and_grad, temperature, direction
):
    teacher = np.array([[[BIG, -BIG, 0.0]], [[-BIG, -BIG, BIG]]], "float32")
    student = np.array([[[-BIG, BIG, 0.0]], [[BIG, -BIG, -BIG]]], "float32")
    fn = losses.KLDivergence(
        target="logits", temperature=temperature, direction=direction
    )
    value, grad = value_and_grad(lambda s: fn(teacher, s), student)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Disjoint supports 3e38 apart: the divergence saturates at 1e15 T^2.
    assert value == pytest.approx(1e15 * temperature**2, rel=1e-5)
    for loss, y_true in [
        (losses.JensenShannonDivergence(target="logits"), teacher),
        (losses.SparseKLDivergence(), np.array([[0], [1]])),
        (losses.SparseKLDivergence(label_smoothing=0.2), np.array([[0], [1]])),
        (
            losses.KLDivergence(temperature=temperature),
            np.array([[[0.5, 0.5, 0.0]], [[0.0, 0.0, 1.0]]], "float32"),
        ),
    ]:
        value, grad = value_and_grad(lambda s, f=loss, t=y_true: f(t, s), student)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), loss.name
    js = losses.jensen_shannon_divergence(teacher, student, target="logits")
    np.testing.assert_allclose(np.asarray(js), math.log(2.0), rtol=1e-6)
    sparse = losses.sparse_kl_divergence(np.array([[0], [1]]), student)
    np.testing.assert_allclose(np.asarray(sparse), 1e15, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_range_ends_match_float64(temperature):
    rng = np.random.default_rng(4)
    scale = temperature * 3  # logits on the temperature's scale
    a = (rng.normal(size=(3, 4, 5)) * scale).astype("float32")
    b = (rng.normal(size=(3, 4, 5)) * scale).astype("float32")
    got = losses.kl_divergence(a, b, target="logits", temperature=temperature)
    ref = tempered_kl64(log_softmax64(a), b, temperature)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-6 * ref.max())
    probs = np.exp(log_softmax64(a)).astype("float32")
    probs[0, 0, :2] = 0.0
    probs[0, 0] /= probs[0, 0].sum()
    got = losses.kl_divergence(probs, b, temperature=temperature)
    assert np.all(np.isfinite(np.asarray(got)))


@pytest.mark.parametrize("temperature", [9e-4, 1.1e3, 1e-38, 1e20, 0.0, math.inf])
def test_temperatures_outside_the_range_are_refused(temperature):
    message = re.escape(f"Received: temperature={temperature!r}")
    with pytest.raises(ValueError, match=r"\[0\.001, 1000\].*" + message):
        losses.KLDivergence(temperature=temperature)
    with pytest.raises(ValueError, match=message):
        losses.kl_divergence([[1.0]], [[1.0]], temperature=temperature)
    with pytest.raises(InvalidArgumentError, match=message):
        KLRegularizedModel(
            tiny_unet(seed=2), tiny_unet(seed=1), temperature=temperature
        )


def test_the_kl_model_accepts_the_range_ends():
    images = random_images(2, 0, SIZE)
    no_labels = np.full((2, SIZE, SIZE), IGNORE, "int32")
    for temperature in (1e-3, 1e3):
        model = _compiled(
            KLRegularizedModel(
                tiny_unet(seed=2),
                tiny_unet(seed=1),
                temperature=temperature,
                kl_inputs="target",
            )
        )
        value = float(model.compute_loss(images, no_labels, model(images)))
        assert np.isfinite(value) and value >= 0


# Synchronised BatchNorm -----------------------------------------------------


def test_student_bn_synchronized_option():
    model = KLRegularizedModel(
        tiny_unet(seed=2), tiny_unet(seed=1), student_bn="synchronized"
    )
    norms = [
        layer
        for layer in model.student._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms and all(layer.trainable for layer in norms)
    # TensorFlow all-reduces the statistics; on JAX a distributed step
    # computes them over the whole (sharded) batch already.
    expected = keras.backend.backend() == "tensorflow"
    assert all(layer.synchronized == expected for layer in norms)
    config = model.get_config()
    assert config["student_bn"] == "synchronized"
    restored = KLRegularizedModel.from_config(config)
    assert restored.student_bn == "synchronized"
