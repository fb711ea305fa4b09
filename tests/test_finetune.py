"""Tests for klseg.finetune (runs on the TensorFlow and JAX backends)."""

import keras
import numpy as np
import pytest
from helpers import (
    log_softmax64,
    miou64,
    predict64,
    random_images,
    tempered_kl64,
    tiny_unet,
)

from klseg import finetune, losses, metrics, models
from klseg.errors import InvalidArgumentError, ModelError, ResourceError
from klseg.finetune import KLRegularizedModel

IGNORE = 255
SIZE = 8


def _pixel_model(num_classes, seed=0):
    """A per-pixel model (1x1 convolutions): commutes with flips exactly."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 1, activation="tanh")(x)
    outputs = keras.layers.Conv2D(num_classes, 1)(x)
    return keras.Model(inputs, outputs)


def _masks(n, seed, num_classes=3):
    masks = np.random.default_rng(seed).integers(0, num_classes, (n, SIZE, SIZE))
    return masks.astype("int32")


def _compiled(model, lr=0.0):
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
        metrics=[metrics.MeanIoU(model.num_classes, ignore_class=IGNORE)],
    )
    return model


# float64 references --------------------------------------------------------


def _ce(logits, labels):
    """Mean over non-ignored pixels of -log softmax(logits)[label]."""
    lp = log_softmax64(logits)
    valid = labels != IGNORE
    if not valid.any():
        return 0.0
    picked = np.take_along_axis(lp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return float(-picked[valid].mean())


def _kl(teacher_log_probs, student_logits, temperature):
    """T^2 * mean over pixels of KL(softmax(t / T) || softmax(s / T))."""
    return float(tempered_kl64(teacher_log_probs, student_logits, temperature).mean())


def _miou(labels, logits, num_classes):
    """Mean IoU over classes present in labels or predictions (ignore left out)."""
    predicted = np.asarray(logits).argmax(-1)
    return miou64(np.asarray(labels), predicted, num_classes, IGNORE)


def _loss(model, x, y):
    y_pred = model(x, training=False)
    return float(model.compute_loss(x, y, y_pred, training=False))


# The loss ------------------------------------------------------------------


@pytest.mark.parametrize("kl_inputs", ["target", "source", "both"])
def test_loss_equals_float64_reference(kl_inputs):
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    model = _compiled(
        KLRegularizedModel(
            student, source, kl_weight=0.7, temperature=2.0, kl_inputs=kl_inputs
        )
    )
    images, src_images = random_images(3, 0, SIZE), random_images(3, 1, SIZE)
    masks = _masks(3, 0)
    masks[0, :3] = IGNORE  # some ignored pixels
    masks[2] = IGNORE  # an unlabelled target image
    x = {"images": images, "source_images": src_images}

    s_t, s_s = predict64(student, images), predict64(student, src_images)
    t_t, t_s = predict64(source, images), predict64(source, src_images)
    task = _ce(s_t, masks)
    kl_student = {
        "target": s_t,
        "source": s_s,
        "both": np.concatenate([s_t, s_s]),
    }[kl_inputs]
    kl_teacher = {
        "target": t_t,
        "source": t_s,
        "both": np.concatenate([t_t, t_s]),
    }[kl_inputs]
    expected = task + 0.7 * _kl(log_softmax64(kl_teacher), kl_student, 2.0)
    np.testing.assert_allclose(_loss(model, x, masks), expected, rtol=2e-5)

    if kl_inputs != "both":
        return
    # evaluate() reports the same loss, and the two terms separately.
    logs = model.evaluate(x, masks, batch_size=3, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected, rtol=2e-5)
    np.testing.assert_allclose(logs["task_loss"], task, rtol=2e-5)
    np.testing.assert_allclose(
        logs["kl_loss"], (expected - task) / 0.7, rtol=2e-5, atol=1e-7
    )


def test_unlabelled_images_add_only_the_kl_term():
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    model = _compiled(
        KLRegularizedModel(student, source, kl_weight=0.5, kl_inputs="target")
    )
    unlabelled = random_images(2, 5, SIZE)
    no_labels = np.full((2, SIZE, SIZE), IGNORE, "int32")
    kl = _kl(
        log_softmax64(predict64(source, unlabelled)),
        predict64(student, unlabelled),
        model.temperature,
    )
    # Unlabelled images alone: the loss is exactly the weighted KL term.
    np.testing.assert_allclose(_loss(model, unlabelled, no_labels), 0.5 * kl, rtol=2e-5)
    # Added to labelled images, they leave the task term unchanged.
    labelled, masks = random_images(2, 6, SIZE), _masks(2, 6)
    both = np.concatenate([labelled, unlabelled])
    both_masks = np.concatenate([masks, no_labels])
    expected = _ce(predict64(student, labelled), masks) + 0.5 * _kl(
        log_softmax64(predict64(source, both)), predict64(student, both), 2.0
    )
    np.testing.assert_allclose(_loss(model, both, both_masks), expected, rtol=2e-5)

    # Without a KL term the unlabelled images change nothing.
    plain = _compiled(KLRegularizedModel(student, source, kl_weight=0.0))
    np.testing.assert_allclose(
        _loss(plain, both, both_masks), _loss(plain, labelled, masks), rtol=1e-6
    )


def _map_probs(probs, class_map, num_target):
    out = np.zeros(probs.shape[:-1] + (num_target,))
    for s, t in enumerate(class_map):
        if t is not None:
            out[..., t] += probs[..., s]
    return out / out.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "class_map", [[0, 1, 1, 2], [0, None, 1, 2], {0: 0, 1: 1, 3: 2}]
)
def test_class_map_merges_and_drops(class_map):
    source, student = tiny_unet(4, seed=1), tiny_unet(3, seed=2)
    model = _compiled(
        KLRegularizedModel(
            student,
            source,
            kl_weight=1.0,
            temperature=1.5,
            kl_inputs="target",
            class_map=class_map,
        )
    )
    images = random_images(2, 3, SIZE)
    no_labels = np.full((2, SIZE, SIZE), IGNORE, "int32")
    if isinstance(class_map, dict):
        class_map = [class_map.get(s) for s in range(4)]
    probs = np.exp(log_softmax64(predict64(source, images)))
    teacher = _map_probs(probs, class_map, 3)
    expected = _kl(np.log(teacher), predict64(student, images), 1.5)
    np.testing.assert_allclose(_loss(model, images, no_labels), expected, rtol=2e-5)

    # Source-domain scores map the source labels (and predictions) too.
    source_masks = np.random.default_rng(0).integers(0, 4, (2, SIZE, SIZE))
    scores = finetune.evaluate_domains(model, {"source": (images, source_masks)})
    lut = np.array([IGNORE if t is None else t for t in class_map])
    mapped = lut[source_masks]
    assert (mapped != IGNORE).any()
    np.testing.assert_allclose(
        scores["source_model_mean_iou"], _miou(mapped, teacher, 3), rtol=1e-9
    )
    np.testing.assert_allclose(
        scores["source_mean_iou"],
        _miou(mapped, predict64(student, images), 3),
        rtol=1e-9,
    )


def test_make_class_map_and_map_labels():
    class_map = finetune.make_class_map(
        ["bg", "car", "truck", "sky"],
        ["bg", "vehicle"],
        merge={"car": "vehicle", "truck": "vehicle"},
        drop=["sky"],
    )
    assert class_map == [0, 1, 1, None]
    masks = np.array([[0, 1, 2, 3, IGNORE]])
    np.testing.assert_array_equal(
        finetune.map_labels(masks, class_map), [[0, 1, 1, IGNORE, IGNORE]]
    )
    with pytest.raises(InvalidArgumentError, match="truck"):
        finetune.make_class_map(["bg", "truck"], ["bg", "car"])
    with pytest.raises(InvalidArgumentError, match="not a target class"):
        finetune.make_class_map(["bg", "truck"], ["bg"], merge={"truck": "car"})


def test_clone_student_with_other_classes_keeps_the_body_and_trains():
    source = tiny_unet(4, seed=3, class_names=["bg", "car", "truck", "sky"])
    student = finetune.clone_student(source, class_names=["bg", "vehicle"])
    assert models.get_class_names(student) == ["bg", "vehicle"]
    assert models.get_class_names(source) == ["bg", "car", "truck", "sky"]
    assert student.output.shape[-1] == 2
    assert models.size_multiple(student) == models.size_multiple(source)
    # Every weight but the head's equals the source's; the head is new.
    head = [w.path for w in student.get_layer("logits").weights]
    body = {w.path: w for w in source.weights if w.path not in head}
    assert body and len(student.weights) == len(source.weights)
    for w in student.weights:
        if w.path in body:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(body[w.path])
            )
    assert tuple(student.get_layer("logits").kernel.shape)[-1] == 2
    # The source model is untouched and the pair fine-tunes with a class map.
    class_map = finetune.make_class_map(
        models.get_class_names(source),
        models.get_class_names(student),
        merge={"car": "vehicle", "truck": "vehicle"},
        drop=["sky"],
    )
    model = _compiled(
        KLRegularizedModel(
            student, source, kl_weight=0.5, kl_inputs="target", class_map=class_map
        ),
        lr=0.05,
    )
    x, y = random_images(4, 1, SIZE), _masks(4, 2, num_classes=2)
    before = _loss(model, x, y)
    model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    after = _loss(model, x, y)
    assert np.isfinite(after) and after < before
    # Same names: an ordinary copy.
    same = finetune.clone_student(source, class_names=["bg", "car", "truck", "sky"])
    assert same.get_layer("logits") is not source.get_layer("logits")
    np.testing.assert_array_equal(predict64(same, x), predict64(source, x))


def test_with_classes_rejects_empty_names():
    with pytest.raises(InvalidArgumentError, match="class_names"):
        models.with_classes(tiny_unet(3), [])


# Gradients, BatchNorm, training --------------------------------------------


def _bn_moving_stats(model):
    return [
        keras.ops.convert_to_numpy(v)
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in (layer.moving_mean, layer.moving_variance)
    ]


def _weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


@pytest.mark.parametrize("student_bn", ["trainable", "frozen"])
def test_source_is_never_trained_and_bn_policy(student_bn):
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    model = _compiled(
        KLRegularizedModel(
            student, source, kl_weight=1.0, kl_inputs="both", student_bn=student_bn
        ),
        lr=0.5,
    )
    assert not source.trainable_weights
    trainable_ids = {id(v) for v in model.trainable_weights}
    assert trainable_ids == {id(v) for v in student.trainable_weights}
    assert not trainable_ids & {id(v) for v in source.weights}

    source_before = _weights(source)
    student_before = _weights(student)
    bn_before = _bn_moving_stats(student)
    x = {
        "images": random_images(4, 0, SIZE),
        "source_images": random_images(4, 1, SIZE),
    }
    model.fit(x, _masks(4, 0), batch_size=2, epochs=1, verbose=0)

    for before, after in zip(source_before, _weights(source)):
        np.testing.assert_array_equal(before, after)
    assert any(
        not np.array_equal(b, a) for b, a in zip(student_before, _weights(student))
    )
    bn_changed = [
        not np.array_equal(b, a) for b, a in zip(bn_before, _bn_moving_stats(student))
    ]
    if student_bn == "frozen":
        assert not any(bn_changed)
        assert all(
            not layer.trainable
            for layer in student._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)
        )
    else:
        assert all(bn_changed)


@pytest.mark.slow
def test_fit_evaluate_save_load_of_wrapper_and_student(tmp_path):
    source = tiny_unet(seed=1, class_names=["a", "b", "c"])
    student = finetune.clone_student(source)
    model = _compiled(
        KLRegularizedModel(student, source, kl_weight=0.3, kl_inputs="source"),
        lr=0.1,
    )
    images, masks = random_images(4, 0, SIZE), _masks(4, 0)
    x = {"images": images, "source_images": random_images(4, 1, SIZE)}
    history = model.fit(x, masks, batch_size=2, epochs=2, verbose=0)
    assert set(history.history) >= {"loss", "task_loss", "kl_loss", "mean_iou"}
    assert history.history["kl_loss"][0] > 0

    logs = model.evaluate(x, masks, batch_size=2, verbose=0, return_dict=True)
    predictions = model.predict(images, verbose=0)
    assert predictions.shape == (4, SIZE, SIZE, 3)

    path = tmp_path / "wrapper.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, KLRegularizedModel)
    assert loaded.get_config()["kl_inputs"] == "source"
    assert loaded.kl_weight == 0.3 and loaded.temperature == model.temperature
    assert not loaded.source.trainable_weights
    np.testing.assert_allclose(
        loaded.predict(images, verbose=0), predictions, atol=1e-6
    )
    loaded_logs = loaded.evaluate(x, masks, batch_size=2, verbose=0, return_dict=True)
    for key in ("loss", "task_loss", "kl_loss", "mean_iou"):
        np.testing.assert_allclose(loaded_logs[key], logs[key], rtol=1e-5)

    # The fine-tuned student stands alone.
    student_path = tmp_path / "student.keras"
    model.student.save(student_path)
    alone = keras.saving.load_model(student_path)
    assert models.get_class_names(alone) == ["a", "b", "c"]
    np.testing.assert_allclose(alone.predict(images, verbose=0), predictions, atol=1e-6)

    # Training resumes: the optimizer counts on from the saved step (2 epochs
    # of 2 batches), and the first step's logged loss is the float64 loss at
    # the saved weights (one batch of 4: student and BatchNorm in training
    # mode on target and source images together, as fit runs it).
    assert int(loaded.optimizer.iterations) == 4
    saved = loaded.student.get_weights()
    both = np.concatenate([images, x["source_images"]])
    logits = np.asarray(loaded.student(both, training=True), "float64")
    loaded.student.set_weights(saved)  # undo the moving-statistics update
    task = _ce(logits[:4], masks)
    teacher = log_softmax64(predict64(loaded.source, x["source_images"]))
    kl = _kl(teacher, logits[4:], loaded.temperature)
    resumed = loaded.fit(x, masks, batch_size=4, epochs=1, verbose=0).history
    assert int(loaded.optimizer.iterations) == 5
    np.testing.assert_allclose(resumed["task_loss"], [task], rtol=1e-5)
    np.testing.assert_allclose(resumed["kl_loss"], [kl], rtol=1e-5)
    np.testing.assert_allclose(resumed["loss"], [task + 0.3 * kl], rtol=1e-5)
    after = loaded.student.get_weights()
    assert any(not np.array_equal(b, a) for b, a in zip(saved, after))
    # The same step on the model that was never saved gives the same weights.
    model.fit(x, masks, batch_size=4, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 5
    for continued, reloaded in zip(model.student.get_weights(), after):
        np.testing.assert_allclose(reloaded, continued, rtol=1e-5, atol=1e-6)


# Stored predictions --------------------------------------------------------


def test_stored_predictions_match_live_loss():
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    images, src_images = random_images(3, 0, SIZE), random_images(3, 1, SIZE)
    stored = finetune.store_source_predictions(source, images, verbose=0)
    stored_src = finetune.store_source_predictions(source, src_images, verbose=0)
    assert stored.dtype == np.float16 and stored.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_allclose(
        stored, np.exp(log_softmax64(predict64(source, images))), atol=1e-3
    )
    masks = _masks(3, 0)
    model = _compiled(KLRegularizedModel(student, source, kl_inputs="both"))
    live = {"images": images, "source_images": src_images}
    kept = dict(live, source_probs=stored, source_images_probs=stored_src)
    np.testing.assert_allclose(
        _loss(model, kept, masks), _loss(model, live, masks), rtol=2e-3
    )


def test_stored_predictions_refuse_before_any_work():
    source = tiny_unet(seed=1)
    assert finetune.estimate_predictions_bytes(10, 64, 32, 3) == 10 * 64 * 32 * 3 * 2

    def fail(*args, **kwargs):
        raise AssertionError("the source model ran")

    source.predict_on_batch = fail
    with pytest.raises(ResourceError, match="3.0 KiB"):
        finetune.store_source_predictions(
            source, np.zeros((4, 16, 8, 3), "uint8"), max_bytes=1000, verbose=0
        )


def test_stored_and_live_agree_under_the_same_augmentation():
    import albumentations as A

    from klseg import data

    source = _pixel_model(3, seed=1)
    images = random_images(6, 0, size=16)
    masks = np.random.default_rng(0).integers(0, 3, (6, 16, 16)).astype("uint8")
    stored = finetune.store_source_predictions(source, images, verbose=0)
    augment = A.Compose(
        [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    )
    dataset = data.make_dataset(
        (images, masks),
        batch_size=3,
        image_size=16,
        augment=augment,
        shuffle=True,
        seed=3,
        extra_maps={"source_probs": stored},
    )
    seen, augmented = 0, 0
    for x, y in dataset:
        x_images = np.asarray(x["images"])
        probs = np.asarray(x["source_probs"], "float32")
        # The source model on the augmented images gives the stored maps
        # moved by the same transform.
        live = np.exp(log_softmax64(predict64(source, x_images)))
        np.testing.assert_allclose(probs, live, atol=1e-3)
        assert np.asarray(y).shape == (3, 16, 16)
        for image in x_images:
            seen += 1
            augmented += not any(np.array_equal(image, im) for im in images)
    assert seen == 6
    assert augmented > 0  # the check above compared transformed maps


# evaluate_domains / DomainEvaluation ---------------------------------------


def test_domain_scores_and_forgetting_every_epoch():
    source, student = tiny_unet(seed=1), tiny_unet(seed=2)
    model = _compiled(
        KLRegularizedModel(student, source, kl_weight=0.1, kl_inputs="target"),
        lr=0.1,
    )
    target = (random_images(4, 0, SIZE), _masks(4, 0))
    source_val = (random_images(4, 1, SIZE), _masks(4, 1))

    def expected_scores():
        """float64 numpy scores of the current student (and the source)."""
        baseline = _miou(source_val[1], predict64(source, source_val[0]), 3)
        student_source = _miou(source_val[1], predict64(student, source_val[0]), 3)
        return {
            "target_mean_iou": _miou(target[1], predict64(student, target[0]), 3),
            "source_mean_iou": student_source,
            "source_model_mean_iou": baseline,
            "forgetting": baseline - student_source,
        }

    scores = finetune.evaluate_domains(source, {"source": source_val})
    expected = expected_scores()
    np.testing.assert_allclose(
        scores["source_mean_iou"], expected["source_model_mean_iou"], rtol=1e-9
    )
    own = finetune.evaluate_domains(model, {"target": target, "source": source_val})
    assert set(own) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(own[key], value, rtol=1e-9, atol=1e-12)
    assert expected["forgetting"] != 0  # student and source differ

    # The callback's scores after each epoch are the student's at that point.
    callback = finetune.DomainEvaluation({"target": target, "source": source_val})

    class Reference(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.per_epoch = []

        def on_epoch_end(self, epoch, logs=None):
            self.per_epoch.append(expected_scores())

    reference = Reference()
    history = model.fit(
        target[0],
        target[1],
        batch_size=2,
        epochs=2,
        verbose=0,
        callbacks=[callback, reference],
    )
    assert callback.source_baseline == pytest.approx(
        expected["source_model_mean_iou"], rel=1e-9
    )
    for key in ("target_mean_iou", "source_mean_iou", "forgetting"):
        logged = history.history[f"val_{key}"]
        want = [scores[key] for scores in reference.per_epoch]
        np.testing.assert_allclose(logged, want, rtol=1e-9, atol=1e-12, err_msg=key)
    first, last = reference.per_epoch
    assert first["target_mean_iou"] != last["target_mean_iou"]  # it trained


# Errors --------------------------------------------------------------------


def test_errors_for_bad_models_and_inputs():
    source = tiny_unet(seed=1)
    with pytest.raises(InvalidArgumentError, match="class_map"):
        KLRegularizedModel(tiny_unet(4, seed=2), source)
    with pytest.raises(InvalidArgumentError, match="class_map"):
        KLRegularizedModel(tiny_unet(seed=2), source, class_map=[0, 1])

    inputs = keras.Input((None, None, 3))
    probs = keras.layers.Conv2D(3, 1, activation="softmax")(inputs)
    with pytest.raises(ModelError, match="softmax.*logits"):
        KLRegularizedModel(keras.Model(inputs, probs), source)
    softmax_layer = keras.layers.Softmax()(keras.layers.Conv2D(3, 1)(inputs))
    with pytest.raises(ModelError, match="probabilities"):
        KLRegularizedModel(tiny_unet(seed=2), keras.Model(inputs, softmax_layer))

    keras.utils.set_random_seed(0)
    fixed = models.unet(3, base_filters=2, depth=1, input_shape=(16, 16, 3))
    other = models.unet(3, base_filters=2, depth=1, input_shape=(32, 32, 3))
    with pytest.raises(InvalidArgumentError, match="height"):
        KLRegularizedModel(fixed, other)

    with pytest.raises(InvalidArgumentError, match="same model"):
        KLRegularizedModel(source, source)
    frozen = tiny_unet(seed=2)
    frozen.trainable = False
    with pytest.raises(InvalidArgumentError, match="clone_student"):
        KLRegularizedModel(frozen, source)
    for kwargs, name in [
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"temperature": 0}, "temperature"),
        ({"kl_inputs": "all"}, "kl_inputs"),
        ({"student_bn": "train"}, "student_bn"),
    ]:
        with pytest.raises(InvalidArgumentError, match=name):
            KLRegularizedModel(tiny_unet(seed=2), source, **kwargs)

    model = _compiled(KLRegularizedModel(tiny_unet(seed=2), source, kl_inputs="both"))
    masks = _masks(2, 0)
    with pytest.raises(InvalidArgumentError, match="same height and width"):
        model(
            {
                "images": random_images(2, 0, SIZE),
                "source_images": random_images(2, 1, size=16),
            }
        )
    with pytest.raises(InvalidArgumentError, match="Unknown input keys"):
        model({"images": random_images(2, 0, SIZE), "masks": masks})
    with pytest.raises(InvalidArgumentError, match="source_images"):
        model.train_on_batch(random_images(2, 0, SIZE), masks)
    stored = np.zeros((2, SIZE, SIZE, 5), "float16")
    x = {"images": random_images(2, 0, SIZE), "source_probs": stored}
    with pytest.raises(InvalidArgumentError, match="one channel per source class"):
        model.compute_loss(x, masks, model(x), training=False)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(finetune)
    assert result.attempted > 0 and result.failed == 0
