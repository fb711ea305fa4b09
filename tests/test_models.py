"""Tests for klseg.models: shapes, dtypes, sizes, saving, weights, training."""

import functools

import keras
import numpy as np
import pytest

import klseg.models as km
from klseg.errors import InvalidArgumentError, ModelError
from klseg.losses import SparseKLDivergence
from klseg.models.backbones import preprocessing_config
from klseg.models.layers import ImagePreprocessing, upsample_bilinear

BACKEND = keras.backend.backend()
NUM_CLASSES = 21  # Pascal VOC; the parameter counts in docs/models.md use it

# (builder, kwargs, size multiple, parameter range): the standard
# configurations documented in docs/models.md.
CONFIGS = {
    "unet-plain-small": ("unet", {"base_filters": 16, "depth": 3}, 8, (0.45e6, 0.52e6)),
    "unet-plain": ("unet", {}, 16, (7.5e6, 8.2e6)),
    "unet-resnet50": ("unet", {"backbone": "resnet50"}, 32, (31e6, 34e6)),
    "unet-mobilenetv2": ("unet", {"backbone": "mobilenetv2"}, 32, (5.0e6, 5.9e6)),
    "deeplab-plain-os16": (
        "deeplabv3_plus",
        {"backbone": "plain"},
        16,
        (3.0e6, 3.4e6),
    ),
    "deeplab-plain-os8": (
        "deeplabv3_plus",
        {"backbone": "plain", "output_stride": 8},
        8,
        (3.0e6, 3.4e6),
    ),
    "deeplab-resnet50-os16": (
        "deeplabv3_plus",
        {"backbone": "resnet50"},
        16,
        (25e6, 28.5e6),
    ),
    "deeplab-resnet50-os8": (
        "deeplabv3_plus",
        {"backbone": "resnet50", "output_stride": 8},
        8,
        (25e6, 28.5e6),
    ),
    "deeplab-mobilenetv2-os16": (
        "deeplabv3_plus",
        {"backbone": "mobilenetv2"},
        16,
        (2.5e6, 3.0e6),
    ),
    "deeplab-mobilenetv2-os8": (
        "deeplabv3_plus",
        {"backbone": "mobilenetv2", "output_stride": 8},
        8,
        (2.5e6, 3.0e6),
    ),
}


@functools.cache
def _model(key):
    builder, kwargs, _, _ = CONFIGS[key]
    return km.build(builder, num_classes=NUM_CLASSES, **kwargs)


def _images(shape, seed=0, dtype="uint8"):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape).astype(dtype)


def _logits(model, images):
    """Inference logits as numpy.

    Eager calls on JAX compile every primitive for every new shape, so there
    the whole forward pass is compiled once with ``predict``.
    """
    if BACKEND == "jax":
        return model.predict(images, batch_size=len(images), verbose=0)
    return keras.ops.convert_to_numpy(model(images, training=False))


@pytest.fixture
def policy():
    """Sets a dtype policy for one test and restores float32 afterwards."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


# --- shapes, dtypes, sizes ---------------------------------------------------


def _params(keys):
    """Marks the configurations with a keras.applications backbone as slow
    (building ResNet50 alone takes seconds)."""
    return [
        pytest.param(k, marks=pytest.mark.slow) if "resnet" in k or "mobile" in k else k
        for k in keys
    ]


@pytest.mark.parametrize("key", _params(CONFIGS))
def test_output_shape_dtype_and_parameter_count(key):
    _, _, multiple, (low, high) = CONFIGS[key]
    model = _model(key)
    assert km.size_multiple(model) == multiple
    assert km.num_classes(model) == NUM_CLASSES
    assert low <= model.count_params() <= high, model.count_params()
    for height, width in ((64, 64), (96, 64)):
        logits = _logits(model, _images((1, height, width, 3)))
        assert logits.shape == (1, height, width, NUM_CLASSES)
        assert logits.dtype == np.float32
        assert np.all(np.isfinite(logits))


def test_uint8_and_float_inputs_give_the_same_logits():
    model = _model("unet-plain-small")
    images = _images((1, 32, 32, 3))
    a = _logits(model, images)
    b = _logits(model, images.astype("float32"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "backbone, reference",
    [
        ("resnet50", keras.applications.resnet50.preprocess_input),
        ("mobilenetv2", keras.applications.mobilenet_v2.preprocess_input),
    ],
)
def test_preprocessing_matches_keras_applications(backbone, reference):
    images = _images((2, 8, 8, 3), dtype="float32")
    ours = ImagePreprocessing(**preprocessing_config(backbone))(images)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours), reference(images.copy()), atol=1e-4
    )


def test_upsample_bilinear_matches_image_resize():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype("float32")
    for factor in (2, 4):
        ours = upsample_bilinear(x, factor)
        ref = keras.ops.image.resize(x, (5 * factor, 7 * factor))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours),
            keras.ops.convert_to_numpy(ref),
            atol=1e-5,
        )


def test_static_size_error_names_nearest_valid_sizes():
    with pytest.raises(ValueError, match=r"height 65 \(nearest valid: 64 or 72\)"):
        km.unet(2, base_filters=4, depth=3, input_shape=(65, 64, 3))
    with pytest.raises(InvalidArgumentError, match=r"width 20 \(nearest valid: 16"):
        km.deeplabv3_plus(
            2, backbone="plain", base_filters=4, filters=8, input_shape=(32, 20, 3)
        )


def test_call_with_bad_size_raises():
    model = _model("unet-plain-small")
    with pytest.raises(ValueError, match=r"nearest valid: 64 or 72"):
        model(_images((1, 64, 65, 3)))
    with pytest.raises(ValueError, match=r"nearest valid: 8\)"):
        model(_images((1, 4, 64, 3)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unknown sizes exist only in TF")
def test_unknown_size_in_a_tf_graph_is_padded_and_cropped():
    import tensorflow as tf

    model = _model("deeplab-plain-os16")
    serve = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8)],
    )
    images = _images((1, 70, 45, 3))
    logits = serve(images)
    assert tuple(logits.shape) == (1, 70, 45, NUM_CLASSES)
    # A valid size through the dynamic path equals the eager result.
    valid = images[:, :64, :32]
    np.testing.assert_allclose(
        serve(valid).numpy(), model(valid, training=False).numpy(), atol=1e-4
    )


@pytest.mark.parametrize("policy_name", ["mixed_float16", "mixed_bfloat16"])
def test_logits_are_float32_under_mixed_precision(policy, policy_name):
    policy(policy_name)
    for model in (
        km.unet(3, base_filters=8, depth=2),
        km.deeplabv3_plus(3, backbone="plain", base_filters=8, filters=16),
    ):
        assert model.get_layer("preprocessing").compute_dtype != "float32"
        logits = _logits(model, _images((2, 32, 32, 3)))
        assert logits.dtype == np.float32
        assert np.all(np.isfinite(logits))


# --- registry and helpers ----------------------------------------------------


def test_registry_error_lists_valid_names():
    assert km.available_models() == ["deeplabv3_plus", "unet"]
    with pytest.raises(ValueError, match="Valid names: deeplabv3_plus, unet"):
        km.build("segformer", num_classes=2)


def test_class_names_and_helpers():
    model = km.unet(3, base_filters=16, depth=3, class_names=["sky", "road", "car"])
    assert km.get_class_names(model) == ["sky", "road", "car"]
    assert km.num_classes(model) == 3
    assert km.get_class_names(_model("unet-plain-small"))[:2] == [
        "class_0",
        "class_1",
    ]
    with pytest.raises(ModelError, match="no klseg ImagePreprocessing"):
        km.size_multiple(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2, "class_names": ["a"]}, "class_names"),
        ({"num_classes": 2, "backbone": "vgg"}, "Valid backbones: plain, resnet50"),
        ({"num_classes": 2, "depth": 7}, "depth"),
        ({"num_classes": 2, "input_shape": (32, 32, 1)}, "input_shape"),
        ({"num_classes": 2, "weights": "imagenet"}, "plain"),
        ({"num_classes": 2, "backbone": "resnet50", "weights": "/nope.h5"}, "/nope.h5"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.unet(**kwargs)


def test_invalid_output_stride():
    with pytest.raises(ValueError, match="output_stride=32"):
        km.deeplabv3_plus(2, backbone="plain", output_stride=32)


# --- saving and weights ------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    _params(["unet-plain-small", "deeplab-plain-os16", "deeplab-mobilenetv2-os8"]),
)
def test_save_and_load_give_identical_outputs(tmp_path, key):
    model = _model(key)
    images = _images((2, 64, 64, 3), seed=1)
    expected = _logits(model, images)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    got = _logits(loaded, images)
    np.testing.assert_array_equal(got, expected)
    assert km.size_multiple(loaded) == km.size_multiple(model)
    assert km.get_class_names(loaded) == km.get_class_names(model)


@pytest.mark.slow
def test_local_backbone_weights_file_is_loaded(tmp_path):
    app = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    rng = np.random.default_rng(0)
    app.set_weights([rng.normal(size=w.shape).astype("float32") for w in app.weights])
    path = tmp_path / "mobilenetv2_notop.weights.h5"
    app.save_weights(path)
    # Output stride 8 rebuilds the backbone with dilated convolutions; the
    # loaded weights must survive that.
    model = km.deeplabv3_plus(
        2, backbone="mobilenetv2", output_stride=8, weights=str(path)
    )
    encoder = model.get_layer("mobilenetv2_encoder")
    for name in ("Conv1", "block_6_depthwise", "block_15_depthwise"):
        for got, want in zip(
            encoder.get_layer(name).get_weights(), app.get_layer(name).get_weights()
        ):
            np.testing.assert_array_equal(got, want)
    assert encoder.get_layer("block_15_depthwise").dilation_rate == (4, 4)


def test_unreadable_weights_file_raises_model_error(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not an h5 file")
    with pytest.raises(ModelError, match="broken.weights.h5"):
        km.unet(2, backbone="mobilenetv2", weights=str(path))


def test_imagenet_weights_are_passed_to_keras(monkeypatch):
    seen = []
    original = keras.applications.MobileNetV2

    def fake(*args, weights=None, **kwargs):
        seen.append(weights)
        return original(*args, weights=None, **kwargs)

    monkeypatch.setattr(keras.applications, "MobileNetV2", fake)
    km.unet(2, backbone="mobilenetv2", depth=2, weights="imagenet")
    assert seen == ["imagenet"]


# --- training ----------------------------------------------------------------


def _toy_data(num=16, size=32, seed=0):
    """Dark noisy images with one bright rectangle (class 1) each."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 96, size=(num, size, size, 3)).astype("uint8")
    labels = np.zeros((num, size, size), "int32")
    for i in range(num):
        top, left = rng.integers(0, size - 12, size=2)
        height, width = rng.integers(8, 13, size=2)
        images[i, top : top + height, left : left + width] += 128
        labels[i, top : top + height, left : left + width] = 1
    labels[:, :2] = 255  # an ignored band
    return images, labels


def _train(builder, **kwargs):
    keras.utils.set_random_seed(0)
    model = km.build(builder, num_classes=2, **kwargs)
    model.compile(
        # SGD: its update traces to fewer ops than Adam's (a faster test).
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=SparseKLDivergence(ignore_class=255),
    )
    images, labels = _toy_data()
    history = model.fit(images, labels, batch_size=8, epochs=4, verbose=0)
    return history.history["loss"]


def test_a_few_training_steps_reduce_the_kl_loss_unet():
    losses = _train("unet", base_filters=8, depth=2)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow  # tracing the train step of DeepLabV3+ takes a while on CPU
def test_a_few_training_steps_reduce_the_kl_loss_deeplab():
    losses = _train("deeplabv3_plus", backbone="plain", base_filters=4, filters=8)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_klseg_load_model_in_a_fresh_process(tmp_path):
    """``import klseg; klseg.load_model`` rebuilds a compiled klseg model.

    A fresh process matters: in this one the classes are registered already.
    """
    import json
    import os
    import subprocess
    import sys

    from klseg.metrics import MeanIoU

    model = km.unet(3, base_filters=4, depth=2)
    model.compile(
        optimizer="adam",
        loss=SparseKLDivergence(ignore_class=255, label_smoothing=0.1),
        metrics=[MeanIoU(3, ignore_class=255)],
    )
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype="uint8")
    labels = np.zeros((2, 16, 16), "int32")
    model.train_on_batch(images, labels)
    path = tmp_path / "m.keras"
    model.save(path)
    np.save(tmp_path / "images.npy", images)
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    script = (
        "import json, sys, numpy as np, klseg\n"
        "m = klseg.load_model(sys.argv[1])\n"
        "out = np.asarray(m(np.load(sys.argv[2]), training=False))\n"
        "np.save(sys.argv[3], out)\n"
        "print(json.dumps({'loss': type(m.loss).__name__,\n"
        "  'smoothing': m.loss.label_smoothing,\n"
        "  'scores': m.evaluate(np.load(sys.argv[2]), np.zeros((2, 16, 16), 'int32'),\n"
        "                       return_dict=True, verbose=0)}))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(path),
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npy"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": BACKEND},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["loss"] == "SparseKLDivergence"
    assert info["smoothing"] == pytest.approx(0.1)
    assert set(info["scores"]) == {"loss", "mean_iou"}
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


def test_docstring_examples_run():
    import doctest

    from klseg.models import layers

    for module in (km, layers):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
