"""Tests for klseg.consistency (runs on the TensorFlow and JAX backends)."""

import textwrap

import keras
import numpy as np
import pytest
from helpers import (
    TWO_CPU_REPLICAS,
    log_softmax64,
    predict64,
    random_images,
    run_script,
    tempered_kl64,
    tiny_unet,
)

import klseg
from klseg import losses, models
from klseg.consistency import (
    MeanTeacherModel,
    consistency_divergence,
    mix_batch,
    photometric_augment,
    rampup_factor,
)
from klseg.errors import InvalidArgumentError
from klseg.finetune import KLRegularizedModel

IGNORE = 255
SIZE = 8


def _model(**kwargs):
    kwargs = {"kl_weight": 0.5, "kl_inputs": "target", "seed": 3, **kwargs}
    model = MeanTeacherModel(tiny_unet(seed=2), tiny_unet(seed=1), **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
    )
    return model


def _masks(n, seed, size=SIZE):
    masks = np.random.default_rng(seed).integers(0, 3, (n, size, size))
    masks[0, :2] = IGNORE
    return masks.astype("int32")


def _consistency(teacher, student, temperature, threshold):
    """float64: T^2 KL(softmax(t/T) || softmax(s/T)) on pixels whose
    max softmax(t) >= threshold, summed and divided by all pixels."""
    kl = tempered_kl64(teacher, student, temperature)
    confidence = np.exp(log_softmax64(teacher)).max(-1)
    return float(np.where(confidence >= threshold, kl, 0.0).mean()), confidence


# The EMA teacher ----------------------------------------------------------


def test_ema_update_matches_numpy_reference():
    model = _model(ema_decay=0.9, consistency_threshold=0.0)
    student, teacher = model.student, model.ema_model
    assert teacher is not student and not teacher.trainable_weights
    assert {id(v) for v in model.trainable_weights} == {
        id(v) for v in student.trainable_weights
    }
    paths = [w.path for w in student.weights]
    assert any("moving_variance" in p for p in paths)
    expected = [np.asarray(w, "float64") for w in student.get_weights()]
    for got, want in zip(teacher.get_weights(), expected):
        np.testing.assert_array_equal(got, want)

    rng = np.random.default_rng(0)
    x = {
        "images": random_images(2, 0, SIZE),
        "unlabeled_images": random_images(2, 1, SIZE),
    }
    y = _masks(2, 0)
    for step in range(3):
        weights = [
            rng.uniform(0.5, 2.0, w.shape)
            if "moving_variance" in p
            else rng.normal(size=w.shape)
            for w, p in zip(student.get_weights(), paths)
        ]
        student.set_weights([w.astype("float32") for w in weights])
        y_pred = model(x, training=False)
        model.compute_loss(x, y, y_pred, training=True)
        # The update reads the student's weights before its training-mode
        # forward pass on the strong view moves its BatchNorm statistics.
        expected = [0.9 * e + 0.1 * w for e, w in zip(expected, weights)]
        for got, want, path in zip(teacher.get_weights(), expected, paths):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=path)
        assert int(keras.ops.convert_to_numpy(model.consistency_step)) == step + 1

    # Evaluation updates nothing.
    before = teacher.get_weights()
    model.compute_loss(x, y, model(x, training=False), training=False)
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(model.consistency_step)) == 3


# The consistency term -----------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_consistency_divergence_matches_float64_reference(threshold, rng):
    teacher = rng.normal(size=(2, 5, 4, 3)) * 3
    student = rng.normal(size=(2, 5, 4, 3)) * 3
    values, confidence = consistency_divergence(
        teacher.astype("float32"),
        student.astype("float32"),
        temperature=2.0,
        threshold=threshold,
    )
    want, want_confidence = _consistency(teacher, student, 2.0, threshold)
    np.testing.assert_allclose(np.mean(values), want, rtol=1e-5)
    np.testing.assert_allclose(confidence, want_confidence, rtol=1e-5)
    kept = (want_confidence >= threshold).mean()
    assert kept == 1.0 if threshold == 0 else 0.2 < kept < 0.9


def test_rampup_factor():
    for step, want in [(0, np.exp(-5)), (5, np.exp(-5 * 0.25)), (10, 1), (20, 1)]:
        np.testing.assert_allclose(float(rampup_factor(step, 10)), want, rtol=1e-6)
    assert float(rampup_factor(0, 0)) == 1.0


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_loss_adds_ramped_consistency_term(threshold):
    """compute_loss in training = KLRegularizedModel's loss + weight * ramp *
    the float64 reference on the teacher's (post-update) and student's
    predictions (no mixing, no colour change: the views are the images)."""
    model = _model(
        student_bn="frozen",  # training-mode forward = inference
        consistency_weight=0.8,
        consistency_temperature=2.0,
        consistency_threshold=threshold,
        consistency_rampup=2,
        mix="none",
        photometric=False,
        ema_decay=0.9,
    )
    # A teacher unlike the student, with confident predictions.
    weights = tiny_unet(seed=4).get_weights()
    weights[-2:] = [w * 60 for w in weights[-2:]]
    model.ema_model.set_weights(weights)
    labelled, unlabelled, y = (
        random_images(2, 0, SIZE),
        random_images(3, 1, SIZE),
        _masks(2, 0),
    )
    x = {"images": labelled, "unlabeled_images": unlabelled}
    for step in range(3):
        y_pred = model(x, training=False)
        base = float(
            model.compute_loss({"images": labelled}, y, y_pred, training=False)
        )
        total = float(model.compute_loss(x, y, y_pred, training=True))
        term, confidence = _consistency(
            predict64(model.ema_model, unlabelled),
            predict64(model.student, unlabelled),
            2.0,
            threshold,
        )
        assert term > 1e-3
        if threshold:
            assert 0.1 < (confidence >= threshold).mean() < 0.95
        ramp = np.exp(-5 * (1 - min(step / 2, 1)) ** 2)
        np.testing.assert_allclose(
            total - base, 0.8 * ramp * term, rtol=2e-4, atol=1e-6
        )

    # evaluate(): the term (unweighted) and the confidence over the weak view,
    # and loss = task + kl_weight * kl + consistency_weight * consistency.
    # (numpy inputs need as many unlabelled images as labelled ones.)
    model.reset_metrics()
    x["unlabeled_images"] = unlabelled = unlabelled[:2]
    logs = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    teacher = predict64(model.ema_model, unlabelled)
    term, confidence = _consistency(
        teacher, predict64(model.student, unlabelled), 2.0, threshold
    )
    np.testing.assert_allclose(logs["consistency_loss"], term, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(logs["teacher_confidence"], confidence.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"],
        logs["task_loss"] + 0.5 * logs["kl_loss"] + 0.8 * logs["consistency_loss"],
        rtol=1e-6,
    )


def test_batches_without_unlabelled_images_skip_the_term():
    model = _model()
    x, y = {"images": random_images(2, 0, SIZE)}, _masks(2, 0)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert logs["consistency_loss"] == 0 and logs["teacher_confidence"] == 0
    np.testing.assert_allclose(
        logs["loss"], logs["task_loss"] + 0.5 * logs["kl_loss"], rtol=1e-6
    )
    plain = KLRegularizedModel(tiny_unet(seed=2), tiny_unet(seed=1), kl_inputs="target")
    with pytest.raises(InvalidArgumentError, match="MeanTeacherModel"):
        plain(
            {
                "images": random_images(1, 0, SIZE),
                "unlabeled_images": random_images(1, 1, SIZE),
            }
        )


# The strong view ----------------------------------------------------------

PALETTE = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]])


@pytest.mark.parametrize("mix", ["classmix", "cutmix"])
def test_mixing_moves_the_teacher_prediction_with_the_pixel(mix):
    """Colour encodes the class, and so do the teacher's logits: after
    mixing, the mixed logits' argmax is the class the mixed image's colour
    encodes at every pixel, and pasted pixels come from the previous image."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (4, 3, 3)).repeat(4, axis=1).repeat(4, axis=2)
    images = PALETTE[labels].astype("uint8")
    logits = (6.0 * np.eye(4)[labels] - 3.0).astype("float32")
    previous = np.roll(labels, 1, axis=0)
    seed = keras.random.SeedGenerator(5)
    shares = []
    for _ in range(4):
        mixed, mixed_logits, pasted = (
            keras.ops.convert_to_numpy(t)
            for t in mix_batch(images, logits, mix=mix, seed=seed)
        )
        assert mixed.dtype == "float32" and mixed_logits.shape == logits.shape
        distance = ((mixed[..., None, :] - PALETTE) ** 2).sum(-1)
        decoded = distance.argmin(-1)
        np.testing.assert_array_equal(mixed_logits.argmax(-1), decoded)
        np.testing.assert_array_equal(decoded, np.where(pasted, previous, labels))
        for i in range(4):
            if mix == "classmix":
                present = np.unique(previous[i])
                chosen = np.unique(previous[i][pasted[i]])
                assert len(chosen) == (len(present) + 1) // 2
                np.testing.assert_array_equal(pasted[i], np.isin(previous[i], chosen))
            else:
                rows, cols = pasted[i].any(1), pasted[i].any(0)
                np.testing.assert_array_equal(pasted[i], np.outer(rows, cols))
                for line in (rows, cols):
                    assert np.diff(line.astype(int)).clip(0).sum() <= 1  # one run
        shares.append(pasted.mean())
    assert 0 < np.mean(shares) < 1

    same, same_logits, nothing = mix_batch(images, logits, mix="none")
    np.testing.assert_array_equal(same, images.astype("float32"))
    np.testing.assert_array_equal(same_logits, logits)
    assert not np.any(keras.ops.convert_to_numpy(nothing))


def test_photometric_augment_stays_in_range_and_is_seeded():
    images = np.repeat(random_images(1, 0, size=12), 6, axis=0)
    a = keras.ops.convert_to_numpy(
        photometric_augment(images, seed=keras.random.SeedGenerator(1))
    )
    b = keras.ops.convert_to_numpy(
        photometric_augment(images, seed=keras.random.SeedGenerator(1))
    )
    assert a.dtype == "float32" and a.shape == images.shape
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    # Each image draws its own changes; colours move, but not far.
    assert len({float(np.abs(a[i] - a[0]).mean()) for i in range(1, 6)}) == 5
    change = np.abs(a - images).mean()
    assert 1 < change < 60


# Saving -------------------------------------------------------------------


def test_weights_file_restores_teacher_step_and_strong_view_seed(tmp_path):
    from klseg.runs import checkpoint

    x = {
        "images": random_images(4, 0, SIZE),
        "unlabeled_images": random_images(4, 1, SIZE),
    }
    y = _masks(4, 0)
    model = _model(consistency_rampup=5, consistency_threshold=0.0)
    for _ in range(2):  # two training steps' worth of state
        model.compute_loss(x, y, model(x, training=True), training=True)
    model.save_weights(tmp_path / "model.weights.h5")
    random_state = checkpoint.random_state_variables(model)
    assert any(v is model.strong_view_seed.state for v in random_state)
    saved_random = [checkpoint.to_numpy(v) for v in random_state]
    saved_teacher = model.ema_model.get_weights()
    y_pred = model(x, training=False)
    expected = float(model.compute_loss(x, y, y_pred, training=False))
    expected_train = float(model.compute_loss(x, y, y_pred, training=True))

    other = _model(consistency_rampup=5, consistency_threshold=0.0)
    other.optimizer.build(other.trainable_variables)
    other.load_weights(tmp_path / "model.weights.h5")
    for variable, value in zip(checkpoint.random_state_variables(other), saved_random):
        variable.assign(value)
    assert int(keras.ops.convert_to_numpy(other.consistency_step)) == 2
    for a, b in zip(saved_teacher, other.ema_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    y_pred = other(x, training=False)
    got = float(other.compute_loss(x, y, y_pred, training=False))
    assert got == pytest.approx(expected, rel=1e-6)
    # Same teacher, ramp step and strong view: the same training loss.
    got = float(other.compute_loss(x, y, y_pred, training=True))
    assert got == pytest.approx(expected_train, rel=1e-6)


def test_config_round_trip_and_keras_file(tmp_path):
    model = _model(
        consistency_weight=0.4,
        ema_decay=0.95,
        consistency_threshold=0.7,
        consistency_temperature=1.5,
        consistency_rampup=10,
        mix="cutmix",
        photometric=False,
        seed=9,
    )
    config = model.get_config()
    rebuilt = MeanTeacherModel.from_config(config)
    assert rebuilt.get_config() == config
    model.consistency_step.assign(7)
    model.ema_model.set_weights([w + 1 for w in model.ema_model.get_weights()])
    model.save(tmp_path / "m.keras")
    loaded = klseg.load_model(tmp_path / "m.keras", compile=False)
    assert isinstance(loaded, MeanTeacherModel) and loaded.mix == "cutmix"
    assert int(keras.ops.convert_to_numpy(loaded.consistency_step)) == 7
    for a, b in zip(model.ema_model.get_weights(), loaded.ema_model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "name, value",
    [
        ("consistency_weight", -1.0),
        ("ema_decay", 1.0),
        ("consistency_threshold", 1.5),
        ("consistency_temperature", 0.0),
        ("consistency_rampup", 2.5),
        ("mix", "mixup"),
        ("photometric", 1),
    ],
)
def test_invalid_arguments(name, value):
    with pytest.raises(InvalidArgumentError, match=rf"{name}.*Received: {name}="):
        MeanTeacherModel(tiny_unet(seed=2), tiny_unet(seed=1), **{name: value})


# Training -----------------------------------------------------------------


def test_fit_logs_the_term_and_moves_the_teacher():
    keras.utils.set_random_seed(0)
    source = models.unet(3, base_filters=4, depth=2)
    student = klseg.finetune.clone_student(source)
    model = MeanTeacherModel(
        student,
        source,
        kl_inputs="target",
        ema_decay=0.9,
        consistency_threshold=0.0,
        consistency_rampup=4,
        seed=1,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
    )
    x = {"images": random_images(4, 0, 16), "unlabeled_images": random_images(4, 1, 16)}
    y = _masks(4, 0, 16)
    before = model.ema_model.get_weights()
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history
    for key in ("loss", "task_loss", "kl_loss", "consistency_loss"):
        assert np.isfinite(history[key][0]), (key, history[key])
    assert history["consistency_loss"][0] > 0
    assert 1 / 3 <= history["teacher_confidence"][0] <= 1
    assert int(keras.ops.convert_to_numpy(model.consistency_step)) == 2
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(before, model.ema_model.get_weights())
    )
    assert moved > 1e-4


def test_mixed_precision_gives_finite_values():
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _model(consistency_threshold=0.0)
        assert model.student.layers[2].compute_dtype == "float16"
        x = {
            "images": random_images(2, 0, SIZE),
            "unlabeled_images": random_images(2, 1, SIZE),
        }
        y = _masks(2, 0)
        loss = model.compute_loss(x, y, model(x, training=True), training=True)
    finally:
        keras.config.set_dtype_policy(previous)
    assert np.isfinite(float(loss))
    consistency = float(model.consistency_loss_tracker.result())
    assert np.isfinite(consistency) and consistency > 0
    for w in model.ema_model.get_weights():
        assert w.dtype == "float32" and np.all(np.isfinite(w))


# Replicas -----------------------------------------------------------------

REPLICA_SCRIPT = TWO_CPU_REPLICAS + textwrap.dedent(
    """
    import json

    import numpy as np

    import keras
    from klseg import losses, models
    from klseg.consistency import MeanTeacherModel
    from klseg.finetune import clone_student

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    unlabeled = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (8, 16, 16)).astype("int32")
    masks[0] = 255
    masks[5, :9] = 255
    x = {"images": images, "unlabeled_images": unlabeled}
    keras.utils.set_random_seed(1)
    source_weights = models.unet(3, base_filters=4, depth=2).get_weights()
    keras.utils.set_random_seed(2)
    student_weights = models.unet(3, base_filters=4, depth=2).get_weights()

    def run(strategy):
        with strategy.scope():
            src = models.unet(3, base_filters=4, depth=2)
            src.set_weights(source_weights)
            stu = clone_student(src)
            stu.set_weights(student_weights)
            model = MeanTeacherModel(
                stu, src, kl_weight=0.5, kl_inputs="target",
                student_bn="synchronized", ema_decay=0.8,
                consistency_weight=2.0, consistency_threshold=0.4,
                consistency_temperature=1.5, consistency_rampup=3,
                mix="none", seed=7,
            )
            model.compile(
                optimizer=keras.optimizers.SGD(0.05),
                loss=losses.SparseKLDivergence(ignore_class=255),
            )
        data = tf.data.Dataset.from_tensor_slices((x, masks)).batch(4)
        history = model.fit(data, epochs=1, verbose=0, shuffle=False).history
        return {
            "replicas": strategy.num_replicas_in_sync,
            "history": history,
            "step": int(model.consistency_step.numpy()),
            "student": [w.tolist() for w in stu.get_weights()],
            "ema": [w.tolist() for w in model.ema_model.get_weights()],
        }

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps({
        "mirrored": run(mirrored),
        "single": run(tf.distribute.get_strategy()),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute needs the TensorFlow backend",
)
def test_mirrored_strategy_matches_single_device(tmp_path):
    """Two replicas on 2 logical CPUs (a fresh process: TensorFlow fixes its
    devices when it starts) train as one device on the same global batch:
    logged terms, student and teacher weights, step counter (the photometric
    strong view draws the global batch's rows on every replica)."""
    script = tmp_path / "replicas.py"
    script.write_text(REPLICA_SCRIPT)
    out = run_script(script, env={"KERAS_BACKEND": "tensorflow"})
    mirrored, single = out["mirrored"], out["single"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    assert mirrored["step"] == single["step"] == 2
    for key in (
        "loss",
        "task_loss",
        "kl_loss",
        "consistency_loss",
        "teacher_confidence",
    ):
        np.testing.assert_allclose(
            mirrored["history"][key], single["history"][key], rtol=1e-5, atol=1e-6
        )
    assert min(single["history"]["consistency_loss"]) > 1e-4
    for what in ("student", "ema"):
        for a, b in zip(mirrored[what], single[what]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_docstring_examples_run():
    import doctest

    from klseg import consistency

    result = doctest.testmod(consistency)
    assert result.attempted > 0 and result.failed == 0
