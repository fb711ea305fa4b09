"""KerasHub image segmenters as klseg models (``keras-hub:PRESET_OR_DIR``).

A tiny ``DeepLabV3ImageSegmenter`` (a one-block ResNet, 32x32 images) is
built offline from its config and saved with ``save_to_preset``; the
commands then load it from that folder: train (with a new head), finetune
(as the source), evaluate and export of the result, and the errors.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")
import keras  # noqa: E402
from helpers import SIZE, hub_segmenter, ok, refused, train_args  # noqa: E402

from klseg import errors, models  # noqa: E402
from klseg.data import synthetic  # noqa: E402
from klseg.runs import hub, inputs  # noqa: E402

CLASSES = synthetic.NUM_CLASSES
TINY_RUN = ["--image-size", str(SIZE), "--batch-size", "2", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(0)
    segmenter = hub_segmenter()
    segmenter.save_to_preset(str(root / "logits"))
    hub_segmenter(activation="softmax").save_to_preset(str(root / "softmax"))
    return segmenter, root


BENCH = {"num_train": 4, "num_val": 2, "num_unlabeled": 2, "num_target_train": 2}


def test_spec_syntax():
    assert hub.is_hub_spec("keras-hub:deeplab_v3_plus_resnet50_pascalvoc")
    assert not hub.is_hub_spec("model.keras")
    assert not hub.is_hub_spec(None)


def test_segmenter_equals_the_keras_hub_model(presets, rng):
    segmenter, root = presets
    model = hub.load_segmenter(f"keras-hub:{root / 'logits'}")
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    # The preset's converter scales by 1/255 before its network.
    expected = keras.ops.convert_to_numpy(segmenter(images / 255.0, training=False))
    got = model.predict(images, verbose=0)
    assert got.shape == (2, SIZE, SIZE, CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert inputs.model_info(model, "x") == (CLASSES, 4)  # stride 4 (P2)
    assert models.get_class_names(model)[0] == "class_0"
    named = hub.load_segmenter(
        f"keras-hub:{root / 'logits'}", class_names=list(synthetic.CLASS_NAMES)
    )
    assert models.get_class_names(named) == list(synthetic.CLASS_NAMES)


@pytest.fixture(scope="module")
def hub_runs(presets, bench, tmp_path_factory):
    """``klseg train`` with a new head (7 classes; the preset has 6) and
    ``klseg finetune`` with the preset as the source, one epoch each."""
    spec = f"keras-hub:{presets[1] / 'logits'}"
    out = tmp_path_factory.mktemp("runs")
    source, target = bench / "source", bench / "target"
    ok(
        "train",
        *("--model", spec, "--data", source / "train", "--val-data", source / "val"),
        *("--num-classes", 7, "--output", out / "train", *TINY_RUN),
    )
    ok(
        "finetune",
        *("--source", spec, "--data", target / "train", "--val-data", target / "val"),
        *("--output", out / "finetune", *TINY_RUN),
    )
    return out


def test_train_and_finetune_write_models_that_load(hub_runs):
    metrics = json.loads((hub_runs / "train" / "metrics.json").read_text())
    assert 0 <= metrics["val"]["mean_iou"] <= 1
    model = inputs.load_model(hub_runs / "train" / "model.keras")
    assert inputs.model_info(model, "train") == (7, 4)
    assert models.get_training_size(model) == (SIZE, SIZE)
    metrics = json.loads((hub_runs / "finetune" / "metrics.json").read_text())
    assert 0 <= metrics["target"]["mean_iou"] <= 1, metrics
    tuned = inputs.load_model(hub_runs / "finetune" / "model.keras")
    # The source's classes (the preset names none).
    assert models.get_class_names(tuned) == [f"class_{i}" for i in range(CLASSES)]


def test_saved_models_load_in_a_fresh_process(hub_runs):
    # The test process imported KerasHub; a fresh one has not.
    code = textwrap.dedent(
        f"""
        import numpy as np
        from klseg.runs.inputs import load_model
        for path, count in [({str(hub_runs / "train" / "model.keras")!r}, 7),
                            ({str(hub_runs / "finetune" / "model.keras")!r}, 6)]:
            out = load_model(path).predict(np.zeros((1, 32, 32, 3)), verbose=0)
            assert out.shape == (1, 32, 32, count), out.shape
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_evaluate_the_finetuned_model(hub_runs, bench):
    saved = hub_runs / "finetune" / "model.keras"
    result = ok(
        "evaluate", "--model", saved, "--data", bench / "target" / "val", "--json"
    )
    scores = json.loads(result.output)
    assert scores["num_images"] == 2 and 0 <= scores["mean_iou"] <= 1


def test_export_the_finetuned_model_as_a_saved_model(hub_runs, tmp_path, rng):
    """Keras' bilinear ``UpSampling2D`` in DeepLabV3 cannot be traced at an
    unknown size: the any-size SavedModel is refused with what to do, and
    the one of a fixed ``--image-size`` serves the model's predictions."""
    import tensorflow as tf

    saved = hub_runs / "finetune" / "model.keras"
    output = refused("export", "--model", saved, "--output", tmp_path / "any").output
    assert "any size" in output and "--image-size HxW" in output, output
    assert not (tmp_path / "any").exists()

    ok("export", "--model", saved, "--image-size", SIZE, "--output", tmp_path / "ex")
    info = json.loads((tmp_path / "ex" / "export.json").read_text())
    assert info["input"]["shape"] == [None, SIZE, SIZE, 3]
    served = tf.saved_model.load(str(tmp_path / "ex")).signatures["serving_default"]
    images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    got = served(images=tf.constant(images))
    logits = inputs.load_model(saved).predict(images.astype("float32"), verbose=0)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    np.testing.assert_allclose(got["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(
        got["classes"].numpy(), got["probabilities"].numpy().argmax(-1)
    )
    spec = served.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, SIZE, SIZE, 3] and spec.dtype == tf.uint8


@pytest.mark.slow
def test_export_the_finetuned_model_to_tflite(hub_runs, tmp_path, rng):
    # A fixed-size export: Keras' bilinear UpSampling2D in DeepLabV3 cannot be
    # traced at an unknown size (see above). The file's class maps are the
    # model's (the network called without ``training`` gave other maps).
    from klseg.export import run_litert

    saved = hub_runs / "finetune" / "model.keras"
    ok("export", "--model", saved, "--format", "tflite", "--output", tmp_path / "ex")
    info = json.loads((tmp_path / "ex" / "export.json").read_text())
    assert info["image_size"] == [SIZE, SIZE]
    images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    logits = inputs.load_model(saved).predict(images.astype("float32"), verbose=0)
    classes = run_litert(tmp_path / "ex" / "model.tflite", images)
    assert (classes == logits.argmax(-1)).mean() > 0.99


def test_probability_segmenter_is_refused(presets, bench, tmp_path):
    spec = f"keras-hub:{presets[1] / 'softmax'}"
    with pytest.raises(errors.ModelError, match="probabilities"):
        hub.load_segmenter(spec)
    target = bench / "target"
    output = refused(
        *("finetune", "--source", spec, "--data", target / "train"),
        *("--val-data", target / "val", "--output", tmp_path / "out", *TINY_RUN),
    ).output
    assert spec in output and "probabilities" in output
    assert not (tmp_path / "out").exists()


def test_probabilities_are_found_in_the_loaded_network(presets, monkeypatch):
    # Without the task.json check, the loaded network's softmax is found.
    monkeypatch.setattr(hub, "_saved_activation", lambda path: None)
    spec = f"keras-hub:{presets[1] / 'softmax'}"
    with pytest.raises(errors.ModelError, match="probabilities") as caught:
        hub.load_segmenter(spec)
    assert spec in str(caught.value)


def test_missing_preset_folder_is_named(bench, tmp_path):
    missing = tmp_path / "no_such_preset"
    source = bench / "source"
    output = refused(
        *("train", "--model", f"keras-hub:{missing}", "--data", source / "train"),
        *("--val-data", source / "val", "--output", tmp_path / "out", *TINY_RUN),
    ).output
    assert str(missing) in output and "does not exist" in output
    assert not (tmp_path / "out").exists()


def test_unknown_model_name_lists_the_choices(bench, tmp_path):
    output = refused(
        *train_args(bench, tmp_path / "out"), "--model", "segformer", code=2
    ).output
    assert "unet" in output and "deeplabv3_plus" in output and "keras-hub:" in output


def test_without_keras_hub_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    with pytest.raises(errors.ModelError, match=r'pip install "klseg\[hub\]"'):
        hub.load_segmenter("keras-hub:some_preset")
