"""Tests for klseg.adaptation (runs on the TensorFlow and JAX backends)."""

import math
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
    softmax64,
    tempered_kl64,
    tiny_unet,
)

import klseg
from klseg import losses
from klseg.adaptation import (
    SelfTrainingModel,
    TentModel,
    adapt_batchnorm,
    batchnorm_layers,
    class_balance_divergence,
    entropy,
    freeze_classifier,
)
from klseg.consistency import classmix_mask
from klseg.errors import InvalidArgumentError

IGNORE = 255
SIZE = 8


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _entropy64(logits):
    log_probs = log_softmax64(logits)
    return -(np.exp(log_probs) * log_probs).sum(-1)


def _balance64(logits, reference):
    """KL(reference || mean softmax over all pixels), 0 log 0 = 0."""
    num_classes = logits.shape[-1]
    mean = softmax64(logits).reshape(-1, num_classes).mean(0)
    reference = np.asarray(reference, "float64")
    has_mass = reference > 0
    terms = reference[has_mass] * (np.log(reference[has_mass]) - np.log(mean[has_mass]))
    return float(terms.sum())


def _masks(n, seed, size=SIZE):
    """Labels 0..2 with the top rows of the first image ignored."""
    masks = np.random.default_rng(seed).integers(0, 3, (n, size, size))
    masks[0, :2] = IGNORE
    return masks.astype("int32")


def _unlabelled(n, size=SIZE):
    return np.full((n, size, size), IGNORE, "int32")


def _self_training(lr=0.0, **kwargs):
    kwargs = {"kl_weight": 0.5, "seed": 3, "photometric": False, **kwargs}
    model = SelfTrainingModel(tiny_unet(seed=2), tiny_unet(seed=1), **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
    )
    return model


def _tent(lr=0.5, **kwargs):
    model = TentModel(tiny_unet(seed=2), tiny_unet(seed=1), **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
    )
    return model


def _bn_net(seed=0, *, batchnorm=True):
    """Conv-BN-ReLU-Conv-BN (or the convolutions alone), seeded."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((None, None, 3))]
    layers.append(keras.layers.Conv2D(4, 3, padding="same", name="conv_a"))
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(name="bn_a"))
    layers.append(keras.layers.ReLU(name="relu"))
    layers.append(keras.layers.Conv2D(3, 3, padding="same", name="conv_b"))
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(name="bn_b"))
    return keras.Sequential(layers, name="bn_net")


def _copy_seed(generator):
    """A SeedGenerator in the state of ``generator`` (draws the same next)."""
    copy = keras.random.SeedGenerator(0)
    copy.state.assign(generator.state.value)
    return copy


def _settings(config):
    """A wrapper's config less its models' (whose tensor names change)."""
    return {k: v for k, v in config.items() if k not in ("student", "source")}


def _weights_by_path(model):
    return {w.path: _numpy(w).copy() for w in model.weights}


# Formulas -----------------------------------------------------------------


def test_entropy_matches_float64_reference(rng):
    logits = rng.normal(size=(2, 5, 4, 4)) * 4
    got = _numpy(entropy(logits.astype("float32")))
    assert got.dtype == "float32" and got.shape == (2, 5, 4)
    np.testing.assert_allclose(got, _entropy64(logits), rtol=1e-5, atol=1e-6)
    # Uniform: log K; one-hot (a gap of 1e4): 0; finite for extreme logits.
    np.testing.assert_allclose(_numpy(entropy(np.zeros((3, 4)))), math.log(4))
    extreme = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]])
    got = _numpy(entropy(extreme))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, [0.0, 0.0, math.log(2)], atol=1e-6)
    np.testing.assert_allclose(got, _entropy64(extreme), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_entropy_of_low_precision_logits_is_float32(rng, dtype):
    logits = keras.ops.cast(rng.normal(size=(2, 3, 3, 5)) * 4, dtype)
    as32 = _numpy(keras.ops.cast(logits, "float32"))
    got = entropy(logits)
    assert got.dtype == "float32"
    np.testing.assert_allclose(_numpy(got), _entropy64(as32), rtol=1e-5, atol=1e-6)
    extreme = entropy(keras.ops.cast(np.array([[1e4, -1e4, 0.0]]), dtype))
    assert np.all(np.isfinite(_numpy(extreme))) and float(extreme[0]) < 1e-6


def test_class_balance_divergence_matches_float64_reference(rng):
    logits = rng.normal(size=(2, 4, 5, 4)) * 2
    for reference in ([0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.5, 0.0]):
        got = class_balance_divergence(logits.astype("float32"), np.array(reference))
        assert got.dtype == "float32" and tuple(got.shape) == ()
        want = _balance64(logits, reference)
        assert want > 1e-3
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)

    # The batch's own mean prediction as the reference: 0.
    own = softmax64(logits).reshape(-1, 4).mean(0)
    assert abs(float(class_balance_divergence(logits, own))) < 1e-6

    # A reference class the predictions lost: large (unbounded), yet finite.
    collapsed = np.zeros((1, 4, 4, 3))
    collapsed[..., 2] = -1e4
    value = float(class_balance_divergence(collapsed, np.full(3, 1 / 3)))
    assert np.isfinite(value) and value > 10 * math.log(3)


# ClassMix mask ------------------------------------------------------------


def test_classmix_mask_pastes_half_of_the_present_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (5, 6, 6))
    labels[0, :3] = IGNORE
    labels[1, :, :2] = -1
    labels[2] = np.where(labels[2] < 3, 1, IGNORE)  # one class and ignored
    labels[3] = IGNORE  # nothing to paste
    labels[4] = np.where(labels[4] == 4, 0, labels[4])  # four classes
    seed = keras.random.SeedGenerator(5)
    picks = set()
    for _ in range(6):
        mask = _numpy(classmix_mask(labels, 5, seed=seed))
        assert mask.dtype == bool and mask.shape == labels.shape
        assert not mask[(labels == IGNORE) | (labels == -1)].any()
        for i in range(len(labels)):
            valid = labels[i][(labels[i] >= 0) & (labels[i] < 5)]
            present = np.unique(valid)
            chosen = np.unique(labels[i][mask[i]])
            assert set(chosen) <= set(present)
            assert len(chosen) == math.ceil(len(present) / 2)
            np.testing.assert_array_equal(mask[i], np.isin(labels[i], chosen))
        picks.add(tuple(np.unique(labels[4][mask[4]])))
    assert len(picks) > 1  # a random half, not always the same one

    a = _numpy(classmix_mask(labels, 5, seed=keras.random.SeedGenerator(9)))
    b = _numpy(classmix_mask(labels, 5, seed=keras.random.SeedGenerator(9)))
    np.testing.assert_array_equal(a, b)
    # Labels >= num_classes are ignored too.
    assert not _numpy(classmix_mask(labels, 3, seed=1))[labels >= 3].any()


# Self-training: the cross-domain strong view ------------------------------


@pytest.mark.parametrize("threshold", [0.0, 0.6, 1.0])
def test_cross_domain_term_matches_float64_reference(threshold):
    """The consistency term of a training step: pasted (labelled) pixels
    carry the cross-entropy to their label, the others the thresholded KL to
    the teacher, summed and divided by all target pixels."""
    model = _self_training(
        student_bn="frozen",  # training-mode forward = inference
        consistency_weight=0.8,
        consistency_threshold=threshold,
        ema_decay=0.9,
    )
    # A teacher unlike the student, confident on part of the pixels.
    weights = tiny_unet(seed=4).get_weights()
    weights[-2:] = [w * 15 for w in weights[-2:]]
    model.ema_model.set_weights(weights)
    labelled, target, y = (
        random_images(2, 0, SIZE),
        random_images(2, 1, SIZE),
        _masks(2, 0),
    )
    x = {"images": labelled, "unlabeled_images": target}
    y_pred = model(x, training=False)
    base = float(model.compute_loss({"images": labelled}, y, y_pred, training=False))
    seed = _copy_seed(model.strong_view_seed)
    total = float(model.compute_loss(x, y, y_pred, training=True))

    pasted = _numpy(classmix_mask(y, 3, seed=seed))
    assert 0.2 < pasted.mean() < 0.8 and not pasted[y == IGNORE].any()
    strong = np.where(pasted[..., None], labelled, target)
    student = predict64(model.student, strong)
    teacher = predict64(model.ema_model, target)  # after this step's EMA update
    confidence = softmax64(teacher).max(-1)
    kl = tempered_kl64(teacher, student, 1.0)
    index = np.where(pasted, y, 0)[..., None]
    cross_entropy = -np.take_along_axis(log_softmax64(student), index, -1)[..., 0]
    values = np.where(pasted, cross_entropy, np.where(confidence >= threshold, kl, 0.0))
    np.testing.assert_allclose(total - base, 0.8 * values.mean(), rtol=2e-4, atol=1e-6)
    if threshold == 0.6:
        assert 0.1 < (confidence >= threshold).mean() < 0.95
    if threshold == 1.0:
        # No teacher pixel is that confident: only pasted pixels count.
        assert confidence.max() < 1.0
        want = cross_entropy[pasted].mean() * pasted.mean()
        np.testing.assert_allclose(total - base, 0.8 * want, rtol=2e-4, atol=1e-6)


PALETTE = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250]])


@pytest.mark.parametrize("labelled", [True, False])
def test_strong_view_pastes_labelled_pixels_or_mixes_targets(labelled):
    """With labelled pixels: the picked classes' pixels of labelled image i,
    with their labels, on target image i; the teacher's logits untouched.
    With all-ignore masks nothing is pasted from x["images"]: the target
    images are mixed with each other (ClassMix on the teacher's classes),
    the teacher's logits moving with their pixels."""
    model = _self_training(mix="classmix")
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (4, 2, 2)).repeat(4, axis=1).repeat(4, axis=2)
    target = PALETTE[classes].astype("float32")  # colour encodes the class
    teacher = (6.0 * np.eye(3)[classes] - 3.0).astype("float32")
    source = random_images(4, 5, SIZE)
    y = _masks(4, 1) if labelled else _unlabelled(4)
    seed = _copy_seed(model.strong_view_seed)
    images, logits, labels = (
        None if t is None else _numpy(t)
        for t in model._strong_view(target, teacher, {"images": source}, y)
    )
    assert images.shape == target.shape and logits.shape == teacher.shape
    if labelled:
        pasted = _numpy(classmix_mask(y, 3, seed=seed))
        assert 0 < pasted.mean() < 1
        np.testing.assert_array_equal(
            images, np.where(pasted[..., None], source, target)
        )
        np.testing.assert_array_equal(logits, teacher)
        np.testing.assert_array_equal(labels, np.where(pasted, y, -1))
        return
    assert labels is None or not np.any(labels >= 0)
    distance = ((images[..., None, :] - PALETTE) ** 2).sum(-1)
    assert distance.min(-1).max() == 0  # every pixel is a target pixel
    decoded = distance.argmin(-1)
    np.testing.assert_array_equal(logits.argmax(-1), decoded)
    moved = decoded != classes
    assert moved.any()
    np.testing.assert_array_equal(decoded[moved], np.roll(classes, 1, 0)[moved])


@pytest.mark.parametrize(
    "cross_domain_mix, labelled", [(True, True), (True, False), (False, True)]
)
def test_pseudo_label_statistics_are_the_teachers_on_the_weak_view(
    cross_domain_mix, labelled
):
    """One step with ema_decay=0: the teacher is the student of the step,
    before the optimizer's update (BatchNorm frozen: the student's forward
    passes leave its statistics alone)."""
    model = _self_training(
        lr=0.5,
        cross_domain_mix=cross_domain_mix,
        ema_decay=0.0,
        student_bn="frozen",
        consistency_threshold=0.5,
    )
    target = random_images(4, 1, SIZE)
    x = {"images": random_images(4, 0, SIZE), "unlabeled_images": target}
    y = _masks(4, 0) if labelled else _unlabelled(4)
    teacher = predict64(model.student, target)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.abs(predict64(model.student, target) - teacher).max() > 1e-3

    shares = model.pseudo_label_shares()
    want = np.bincount(teacher.argmax(-1).ravel(), minlength=3) / teacher[..., 0].size
    assert (want > 0).sum() >= 2
    np.testing.assert_allclose(shares.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(shares, want, atol=1e-7)
    confidence = softmax64(teacher).max(-1)
    assert 0 < (confidence >= 0.5).mean() < 1
    np.testing.assert_allclose(
        logs["confident_share"], (confidence >= 0.5).mean(), atol=1e-6
    )
    used = want[want > 0]
    np.testing.assert_allclose(
        logs["pseudo_class_entropy"],
        -(used * np.log(used)).sum() / math.log(3),
        rtol=1e-5,
    )
    assert "balance_loss" not in logs

    # Evaluation counts the teacher's predictions on the images as given.
    model.reset_metrics()
    model.compute_loss(x, y, model(x, training=False), training=False)
    teacher = predict64(model.ema_model, target).argmax(-1)
    want = np.bincount(teacher.ravel(), minlength=3) / teacher.size
    np.testing.assert_allclose(model.pseudo_label_shares(), want, atol=1e-7)


def test_balance_term_matches_float64_reference():
    model = _self_training(balance_weight=0.5)
    # A source whose mean prediction is far from the student's.
    weights = model.source.get_weights()
    model.source.set_weights(weights[:-2] + [w * 5 for w in weights[-2:]])
    images, y = random_images(3, 0, SIZE), _unlabelled(3)
    x = {"images": images}
    y_pred = model(x, training=False)
    total = float(model.compute_loss(x, y, y_pred, training=True))
    model.balance_weight = 0.0
    base = float(model.compute_loss(x, y, y_pred, training=True))
    model.balance_weight = 0.5
    reference = softmax64(predict64(model.source, images)).reshape(-1, 3).mean(0)
    want = _balance64(predict64(model.student, images), reference)
    assert want > 1e-2
    np.testing.assert_allclose(total - base, 0.5 * want, rtol=1e-4, atol=1e-7)

    model.reset_metrics()
    logs = model.evaluate(x, y, batch_size=3, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["balance_loss"], want, rtol=1e-4)
    np.testing.assert_allclose(
        logs["loss"],
        logs["task_loss"] + 0.5 * logs["kl_loss"] + 0.5 * logs["balance_loss"],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "name, value",
    [("cross_domain_mix", "yes"), ("balance_weight", -1), ("kl_inputs", "source")],
)
def test_self_training_invalid_arguments(name, value):
    with pytest.raises(InvalidArgumentError, match=rf"{name}.*Received: {name}="):
        SelfTrainingModel(tiny_unet(seed=2), tiny_unet(seed=1), **{name: value})


def test_self_training_keras_file_round_trip(tmp_path):
    model = _self_training(cross_domain_mix=False, balance_weight=0.25, ema_decay=0.5)
    x = {
        "images": random_images(2, 0, SIZE),
        "unlabeled_images": random_images(2, 1, SIZE),
    }
    model.consistency_step.assign(1)
    model.ema_model.set_weights([w + 1 for w in model.ema_model.get_weights()])
    config = model.get_config()
    assert config["cross_domain_mix"] is False and config["balance_weight"] == 0.25
    assert SelfTrainingModel.from_config(config).get_config() == config
    model.save(tmp_path / "m.keras")
    loaded = klseg.load_model(tmp_path / "m.keras", compile=False)
    assert isinstance(loaded, SelfTrainingModel)
    assert _settings(loaded.get_config()) == _settings(config)
    assert int(_numpy(loaded.consistency_step)) == 1
    for a, b in [(model.student, loaded.student), (model.ema_model, loaded.ema_model)]:
        for u, v in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(u, v)
    np.testing.assert_allclose(
        predict64(loaded.ema_model, x["unlabeled_images"]),
        predict64(model.ema_model, x["unlabeled_images"]),
        atol=1e-6,
    )


# TENT ---------------------------------------------------------------------


BATCHNORM_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def test_tent_step_trains_the_batchnorm_affine_parameters_only():
    model = _tent(lr=0.5)
    student = model.student
    paths = sorted(w.path for w in model.trainable_weights)
    bn_paths = sorted(
        w.path for layer in batchnorm_layers(student) for w in (layer.gamma, layer.beta)
    )
    assert paths == bn_paths and len(paths) == 12
    images = random_images(2, 0, SIZE)
    before = _weights_by_path(student)
    # The student's training-mode predictions before the step (the call
    # moves the moving statistics: put them back).
    logits = np.asarray(_numpy(student(images, training=True)), "float64")
    student.set_weights([before[w.path] for w in student.weights])
    want = _entropy64(logits).mean()

    logs = model.train_on_batch({"images": images}, _unlabelled(2), return_dict=True)
    np.testing.assert_allclose(logs["entropy"], want, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)
    after = _weights_by_path(student)
    for path, value in before.items():
        changed = np.abs(after[path] - value).max() > 1e-7
        if path.rsplit("/", 1)[-1] in BATCHNORM_WEIGHTS:
            assert changed, path
        else:
            np.testing.assert_array_equal(after[path], value, err_msg=path)
    # The step lowered the entropy of the batch.
    again = np.asarray(_numpy(student(images, training=True)), "float64")
    assert _entropy64(again).mean() < want - 1e-4

    # Masks are optional.
    logs = model.train_on_batch({"images": images}, return_dict=True)
    assert np.isfinite(logs["entropy"])


def test_tent_needs_batchnorm_and_a_valid_weight():
    with pytest.raises(InvalidArgumentError, match="BatchNormalization"):
        TentModel(_bn_net(0, batchnorm=False), _bn_net(1, batchnorm=False))
    with pytest.raises(InvalidArgumentError, match="entropy_weight"):
        TentModel(tiny_unet(seed=2), tiny_unet(seed=1), entropy_weight=-1)


def test_tent_keras_file_round_trip(tmp_path):
    model = _tent(entropy_weight=0.7, kl_weight=0.2)
    images = random_images(2, 0, SIZE)
    for layer in batchnorm_layers(model.student):
        for weight in layer.weights:
            weight.assign(
                weight + np.random.default_rng(0).uniform(0.1, 1, weight.shape)
            )
    config = model.get_config()
    assert config["entropy_weight"] == 0.7 and config["kl_weight"] == 0.2
    model.save(tmp_path / "tent.keras")
    loaded = klseg.load_model(tmp_path / "tent.keras", compile=False)
    assert isinstance(loaded, TentModel)
    assert _settings(loaded.get_config()) == _settings(config)
    assert sorted(w.path for w in loaded.trainable_weights) == sorted(
        w.path for w in model.trainable_weights
    )
    for a, b in zip(model.student.get_weights(), loaded.student.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        predict64(loaded.student, images), predict64(model.student, images), atol=1e-6
    )


# AdaBN and the classifier ------------------------------------------------


def _batch_statistics(net, batches):
    """float64 mean over batches of each BN layer's batch mean and biased
    variance of its input, the model in training mode (weights restored)."""
    saved = net.get_weights()
    stats = {}
    for layer in batchnorm_layers(net):
        probe = keras.Model(net.inputs[0], layer.input)
        features = [
            np.asarray(_numpy(probe(b.astype("float32"), training=True)), "float64")
            for b in batches
        ]
        stats[layer.name] = (
            np.mean([f.mean((0, 1, 2)) for f in features], axis=0),
            np.mean([f.var((0, 1, 2)) for f in features], axis=0),
        )
    net.set_weights(saved)
    return stats


def test_adapt_batchnorm_averages_the_batch_statistics():
    net = _bn_net(0)
    bn_a, bn_b = net.get_layer("bn_a"), net.get_layer("bn_b")
    bn_a.momentum, bn_b.momentum = 0.9, 0.8
    bn_b.trainable = False  # frozen layers are re-estimated too
    images = [random_images(n, seed, 12) for n, seed in [(3, 0), (2, 1), (4, 2)]]
    before = _weights_by_path(net)
    stats = _batch_statistics(net, images)
    batches = [(images[0], _masks(3, 0, 12)), {"images": images[1]}, images[2]]

    assert adapt_batchnorm(net, batches) == 9
    after = _weights_by_path(net)
    for layer in (bn_a, bn_b):
        mean, variance = stats[layer.name]
        assert np.abs(mean - before[layer.moving_mean.path]).max() > 1e-2
        np.testing.assert_allclose(
            after[layer.moving_mean.path], mean, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            after[layer.moving_variance.path], variance, rtol=1e-5, atol=1e-5
        )
    for path, value in before.items():
        if "moving_" not in path:
            np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert (bn_a.momentum, bn_b.momentum) == (0.9, 0.8)
    assert bn_a.trainable and not bn_b.trainable

    # steps: the first batches only.
    assert adapt_batchnorm(net, batches, steps=1) == 3
    mean, variance = _batch_statistics(net, images[:1])["bn_b"]
    np.testing.assert_allclose(_numpy(bn_b.moving_mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _numpy(bn_b.moving_variance), variance, rtol=1e-5, atol=1e-5
    )


def test_adapt_batchnorm_refusals():
    net = _bn_net(0)
    net.get_layer("bn_b").trainable = False
    with pytest.raises(InvalidArgumentError, match="no batch"):
        adapt_batchnorm(net, [])
    assert not net.get_layer("bn_b").trainable
    assert net.get_layer("bn_b").momentum == 0.99
    with pytest.raises(InvalidArgumentError, match="BatchNormalization"):
        adapt_batchnorm(_bn_net(0, batchnorm=False), [random_images(2, 0, 8)])


def test_freeze_classifier_freezes_the_last_layer_with_weights():
    model = tiny_unet(seed=0)
    trainable = {w.path for w in model.trainable_weights}
    name = freeze_classifier(model)
    assert name == "logits" and not model.get_layer(name).trainable
    left = {w.path for w in model.trainable_weights}
    assert trainable - left == {"logits/kernel", "logits/bias"}

    assert freeze_classifier(_bn_net(0, batchnorm=False)) == "conv_b"
    empty = keras.Sequential([keras.Input((None, None, 3)), keras.layers.ReLU()])
    with pytest.raises(InvalidArgumentError):
        freeze_classifier(empty)


# Replicas -----------------------------------------------------------------

REPLICA_SCRIPT = TWO_CPU_REPLICAS + textwrap.dedent(
    """
    import json

    import numpy as np

    import keras
    from klseg import losses, models
    from klseg.adaptation import SelfTrainingModel, TentModel, batchnorm_layers
    from klseg.finetune import clone_student

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    unlabeled = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (8, 8, 8)).astype("int32")
    # The first replica's labelled images of the first batch hold no label:
    # the batch still has labelled pixels (on the other replica), so no
    # replica mixes target images with each other.
    masks[:2] = 255
    masks[5, :5] = 255
    keras.utils.set_random_seed(1)
    source_weights = models.unet(3, base_filters=2, depth=1).get_weights()
    keras.utils.set_random_seed(2)
    student_weights = models.unet(3, base_filters=2, depth=1).get_weights()
    # Each replica's half of a batch of 8 is the other's copy: the balance
    # term (over each replica's images) is then the one device's.
    twice = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7])

    def run(kind, strategy):
        with strategy.scope():
            src = models.unet(3, base_filters=2, depth=1)
            src.set_weights(source_weights)
            stu = clone_student(src)
            stu.set_weights(student_weights)
            if kind == "tent":
                model = TentModel(stu, src, kl_weight=0.5)
                for layer in batchnorm_layers(stu):
                    layer.synchronized = True
            else:
                model = SelfTrainingModel(
                    stu, src, kl_weight=0.5, student_bn="synchronized",
                    ema_decay=0.8, consistency_weight=2.0,
                    consistency_threshold=0.4, seed=7,
                    balance_weight=1.0 if kind == "balance" else 0.0,
                )
            model.compile(
                optimizer=keras.optimizers.SGD(0.05),
                loss=losses.SparseKLDivergence(ignore_class=255),
            )
        if kind == "tent":
            data = ({"images": unlabeled}, np.full_like(masks, 255))
        elif kind == "balance":
            data = (
                {"images": images[twice], "unlabeled_images": unlabeled[twice]},
                masks[twice],
            )
        else:
            data = ({"images": images, "unlabeled_images": unlabeled}, masks)
        batch = 8 if kind == "balance" else 4
        data = tf.data.Dataset.from_tensor_slices(data).batch(batch)
        history = model.fit(data, epochs=1, verbose=0, shuffle=False).history
        out = {
            "replicas": strategy.num_replicas_in_sync,
            "history": history,
            "student": [w.tolist() for w in stu.get_weights()],
        }
        if kind != "tent":
            out["ema"] = [w.tolist() for w in model.ema_model.get_weights()]
            out["shares"] = model.pseudo_label_shares().tolist()
        return out

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps({
        kind: {
            "mirrored": run(kind, mirrored),
            "single": run(kind, tf.distribute.get_strategy()),
        }
        for kind in ("self_training", "balance", "tent")
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute needs the TensorFlow backend",
)
def test_mirrored_strategy_matches_single_device(tmp_path):
    """Two replicas on 2 logical CPUs (a fresh process) train as one device
    on the same global batch, 2 steps: self-training with the cross-domain
    strong view (photometric on; in the first batch one replica's labelled
    images hold no label), with the balance term (on batches whose halves
    are equal), and TENT (BatchNorm synchronised)."""
    script = tmp_path / "replicas.py"
    script.write_text(REPLICA_SCRIPT)
    out = run_script(script, env={"KERAS_BACKEND": "tensorflow"})
    keys = {
        "self_training": ["consistency_loss", "confident_share", "teacher_confidence"],
        "balance": ["consistency_loss", "balance_loss"],
        "tent": ["entropy"],
    }
    for kind, extra in keys.items():
        mirrored, single = out[kind]["mirrored"], out[kind]["single"]
        assert mirrored["replicas"] == 2 and single["replicas"] == 1
        for key in ["loss", "task_loss", "kl_loss", *extra]:
            assert key in single["history"], (kind, key)
            np.testing.assert_allclose(
                mirrored["history"][key],
                single["history"][key],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{kind} {key}",
            )
        for what in ("student", "ema", "shares"):
            for a, b in zip(mirrored.get(what, []), single.get(what, [])):
                np.testing.assert_allclose(
                    a, b, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {what}"
                )
    assert min(out["self_training"]["single"]["history"]["consistency_loss"]) > 1e-4
    assert min(out["balance"]["single"]["history"]["balance_loss"]) > 1e-4


def test_docstring_examples_run():
    import doctest

    from klseg import adaptation

    result = doctest.testmod(adaptation)
    assert result.attempted > 0 and result.failed == 0
