"""Tests for klseg.export: the SavedModel serving signature."""

import json
import textwrap

import keras
import numpy as np
import pytest
from helpers import run_script

from klseg import models
from klseg.errors import InvalidArgumentError, ModelError
from klseg.export import export_saved_model, pad_to_multiple

NAMES = ["sky", "road", "car"]


def _tiny_model(num_classes=3):
    """A small model with klseg's conventions built by hand (multiple 4)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    skip = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(skip)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.UpSampling2D(4)(x)
    x = keras.layers.Concatenate()([skip, x])
    outputs = keras.layers.Conv2D(num_classes, 1)(x)
    return keras.Model(inputs, outputs)


def _images(height, width, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def _reference(model, images, multiple):
    """What the signature should return: predict on the padded images."""
    height, width = images.shape[1:3]
    logits = model.predict(pad_to_multiple(images, multiple), verbose=0)
    logits = np.asarray(logits, "float64")[:, :height, :width]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return logits.argmax(-1), probs


SERVE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    path, inputs, output = sys.argv[1:4]
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    arrays = np.load(inputs)
    result = {}
    for key in arrays.files:
        out = serve(images=tf.constant(arrays[key]))
        result[key + "_classes"] = out["classes"].numpy()
        result[key + "_probs"] = out["probabilities"].numpy()
        assert out["classes"].dtype == tf.int32
        assert out["probabilities"].dtype == tf.float32
    names = loaded.signatures["class_names"]()["class_names"].numpy()
    np.savez(output, **result)
    klseg_loaded = any(m == "klseg" or m.startswith("klseg.") for m in sys.modules)
    print(json.dumps({"names": [n.decode() for n in names],
                      "klseg_loaded": klseg_loaded}))
    """
)


def _serve_in_subprocess(path, arrays, tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)
    np.savez(tmp_path / "inputs.npz", **arrays)
    # Run from the temporary folder so that the repository (and klseg) is
    # not importable by accident through the working directory.
    info = run_script(
        script, path, "inputs.npz", "outputs.npz", cwd=tmp_path, timeout=300
    )
    return info, np.load(tmp_path / "outputs.npz")


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="export test runs on TF"
)
def test_wrapper_served_in_fresh_process_equals_student_predict(tmp_path):
    from klseg.finetune import KLRegularizedModel

    keras.utils.set_random_seed(0)
    source = models.unet(3, base_filters=4, depth=2, class_names=NAMES)
    student = models.unet(3, base_filters=4, depth=2, class_names=NAMES)
    wrapper = KLRegularizedModel(student, source, kl_inputs="target")
    # The wrapper exports its student, with the class names it carries.
    path = export_saved_model(wrapper, tmp_path / "exported")
    assert path == tmp_path / "exported"
    arrays = {"odd": _images(13, 10), "exact": _images(8, 12, batch=1, seed=1)}
    info, served = _serve_in_subprocess(path, arrays, tmp_path)
    assert info == {"names": NAMES, "klseg_loaded": False}
    multiple = models.size_multiple(student)
    assert multiple == 4
    for key, images in arrays.items():
        classes, probs = _reference(student, images, multiple)
        assert served[key + "_classes"].shape == images.shape[:3]
        np.testing.assert_allclose(served[key + "_probs"], probs, atol=2e-5)
        # Classes equal the argmax wherever the top two are not tied.
        top2 = np.sort(probs, axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 1e-4
        np.testing.assert_array_equal(served[key + "_classes"][clear], classes[clear])
    _, source_probs = _reference(source, arrays["odd"], multiple)
    assert np.abs(served["odd_probs"] - source_probs).max() > 1e-3


def test_hand_built_model_atomic_replace_and_names(tmp_path, monkeypatch):
    import tensorflow as tf

    model = _tiny_model()
    target = tmp_path / "m"
    target.mkdir()
    (target / "old.txt").write_text("previous export")

    # A failure while writing leaves the previous folder untouched and no
    # temporary folder behind.
    archive_class = type(keras.export.ExportArchive())

    def broken_write_out(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(archive_class, "write_out", broken_write_out)
        with pytest.raises(OSError, match="disk full"):
            export_saved_model(model, target, size_multiple=4)
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]

    # A successful export replaces the old folder, without leftovers.
    path = export_saved_model(model, target, class_names=NAMES, size_multiple=4)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert not (path / "old.txt").exists()
    names = json.loads((path / "assets.extra" / "class_names.json").read_text())
    assert names == NAMES

    loaded = tf.saved_model.load(str(path))
    assert set(loaded.signatures) >= {"serving_default", "serve", "class_names"}
    images = _images(7, 9)
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    _, probs = _reference(model, images, 4)
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=2e-5)
    assert out["classes"].shape == (2, 7, 9)


def test_bad_arguments(tmp_path):
    model = _tiny_model()
    with pytest.raises(InvalidArgumentError, match="class_names"):
        export_saved_model(model, tmp_path / "m", class_names=["a", "b"])
    with pytest.raises(InvalidArgumentError, match="size_multiple"):
        export_saved_model(model, tmp_path / "m", size_multiple=0)
    with pytest.raises(InvalidArgumentError, match="keras.Model"):
        export_saved_model("model.keras", tmp_path / "m")
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ModelError, match="per-pixel"):
        export_saved_model(flat, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_empty_batch_gives_empty_outputs(tmp_path):
    import tensorflow as tf

    path = export_saved_model(_tiny_model(), tmp_path / "m", size_multiple=4)
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    for shape in [(0, 8, 12, 3), (0, 7, 9, 3), (2, 0, 9, 3)]:
        out = serve(images=tf.zeros(shape, tf.uint8))
        assert out["classes"].dtype == tf.int32
        assert out["probabilities"].dtype == tf.float32
        assert tuple(out["classes"].shape) == shape[:3]
        assert tuple(out["probabilities"].shape) == (*shape[:3], 3)
    # The same signature still serves images after an empty batch.
    images = _images(7, 9)
    out = serve(images=tf.constant(images))
    _, probs = _reference(_tiny_model(), images, 4)
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=2e-5)
