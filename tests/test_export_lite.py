"""Tests for the fixed-size exports: LiteRT (TFLite) and ONNX.

A small U-Net is trained on the built-in synthetic scenes (so that its
argmax is not constant), exported without quantisation, with float16 weights
and full-integer int8, and run with the LiteRT runtime on uint8 images; the
class maps must agree with the Keras model's argmax on the validation images
(float32: 99.9% of pixels, float16: 99.5%, int8: 97%). Then ONNX through
ONNX Runtime, the command line end to end, and the errors.
"""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from klseg import models
from klseg.cli.main import cli
from klseg.data import synthetic
from klseg.errors import InvalidArgumentError, ModelError
from klseg.export import export_litert, export_onnx, pad_to_multiple, run_litert
from klseg.files import save_model, write_png

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="LiteRT and ONNX export run on the TensorFlow backend",
)

SIZE = 32
#: Smallest share of pixels whose class equals the Keras model's argmax.
TARGETS = {"none": 0.999, "float16": 0.995, "int8": 0.97}


def _argmax(model, images):
    logits = model.predict(images.astype("float32"), verbose=0, batch_size=16)
    return np.asarray(logits).argmax(-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A U-Net trained briefly on synthetic scenes, saved with its size."""
    keras.utils.set_random_seed(0)
    images, masks = synthetic.generate("source", 128, image_size=SIZE, seed=0)
    model = models.unet(
        synthetic.NUM_CLASSES,
        base_filters=8,
        depth=2,
        class_names=list(synthetic.CLASS_NAMES),
    )
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images, masks, epochs=15, batch_size=16, verbose=0)
    models.set_training_size(model, SIZE)
    folder = tmp_path_factory.mktemp("lite")
    save_model(model, folder / "model.keras")
    val, _ = synthetic.generate("source", 24, image_size=SIZE, seed=1)
    (folder / "calibration").mkdir()
    for i, image in enumerate(images[:32]):
        write_png(folder / "calibration" / f"{i:03d}.png", image)
    expected = _argmax(model, val)
    # The test means something only if the model predicts several classes.
    assert len(np.unique(expected)) >= 4
    return {"model": model, "dir": folder, "val": val, "expected": expected}


def _agreement(classes, expected):
    assert classes.shape == expected.shape
    return float((classes == expected).mean())


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "float16", "int8"])
def test_tflite_agrees_with_keras(trained, tmp_path, quantize):
    calibration = None
    if quantize == "int8":
        calibration, _ = synthetic.generate("source", 32, image_size=SIZE, seed=2)
    path = export_litert(
        trained["model"],
        tmp_path / "m.tflite",
        image_size=SIZE,
        quantize=quantize,
        representative_images=calibration,
    )
    assert path == tmp_path / "m.tflite"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]  # no leftovers

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    assert source["dtype"] == np.uint8
    assert tuple(source["shape"]) == (1, SIZE, SIZE, 3)
    assert target["dtype"] == np.int32
    assert tuple(target["shape"]) == (1, SIZE, SIZE)

    agreement = _agreement(run_litert(path, trained["val"]), trained["expected"])
    assert agreement >= TARGETS[quantize], agreement
    size = path.stat().st_size
    # Weights of 4 bytes (float32), 2 (float16) or 1 (int8) a parameter, and
    # the graph (about 20 kB here).
    params = trained["model"].count_params()
    per_param = {"none": 4, "float16": 2, "int8": 1}[quantize]
    assert size < per_param * params + 40_000, (size, params)


@pytest.mark.slow
def test_tflite_pads_sizes_that_are_not_multiples(trained, tmp_path):
    # 30x22 is no multiple of the U-Net's 4: the graph pads with zeros and
    # crops back, as the SavedModel does; predict on padded images agrees.
    model = trained["model"]
    images = trained["val"][:6, :30, :22]
    path = export_litert(model, tmp_path / "odd.tflite", image_size=(30, 22))
    padded = pad_to_multiple(images, models.size_multiple(model))
    expected = _argmax(model, padded)[:, :30, :22]
    assert _agreement(run_litert(path, images), expected) >= 0.999
    with pytest.raises(InvalidArgumentError, match=r"takes uint8 images \(30, 22, 3\)"):
        run_litert(path, trained["val"][:1])


@pytest.mark.slow
def test_onnx_runs_in_onnxruntime(trained, tmp_path):
    import onnxruntime

    path = export_onnx(trained["model"], tmp_path / "m.onnx", image_size=SIZE)
    session = onnxruntime.InferenceSession(str(path))
    (source,) = session.get_inputs()
    assert source.type == "tensor(uint8)"
    assert source.shape[1:] == [SIZE, SIZE, 3]
    # Any batch size: the whole validation set at once.
    (classes,) = session.run(None, {source.name: trained["val"]})
    assert classes.dtype == np.int32
    assert _agreement(classes, trained["expected"]) >= 0.999


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def _invoke(*args):
    result = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert "Traceback" not in result.output
    return result


@pytest.mark.slow
def test_cli_int8_end_to_end_then_onnx_in_the_same_folder(trained, tmp_path):
    folder = trained["dir"]
    out = tmp_path / "lite"
    result = _invoke(
        "--model", folder / "model.keras", "--output", out, "--format", "tflite",
        "--quantize", "int8", "--representative-data", folder / "calibration",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "LiteRT model (32x32, quantize int8, " in result.output
    assert f"{out / 'model.tflite'}" in result.output
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "tflite"
    assert info["quantize"] == "int8"
    assert info["image_size"] == [SIZE, SIZE]  # the model's training size
    assert info["class_names"] == list(synthetic.CLASS_NAMES)
    assert info["representative_images"] == 32
    assert info["bytes"] == (out / "model.tflite").stat().st_size
    assert info["input"] == {
        "name": "images",
        "dtype": "uint8",
        "shape": [1, SIZE, SIZE, 3],
    }
    classes = run_litert(out / "model.tflite", trained["val"])
    assert _agreement(classes, trained["expected"]) >= TARGETS["int8"]

    # The folder is klseg's now: a second export needs --overwrite, which
    # replaces the .tflite by the .onnx and keeps the user's files.
    (out / "NOTES.txt").write_text("mine\n")
    args = ["--model", folder / "model.keras", "--output", out, "--format", "onnx"]
    refused = _invoke(*args, "--image-size", "32x32")
    assert refused.exit_code == 1
    assert "--overwrite" in refused.output
    result = _invoke(*args, "--image-size", "32x32", "--overwrite")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [".klseg.json", "NOTES.txt", "export.json", "model.onnx"]
    assert json.loads((out / "export.json").read_text())["format"] == "onnx"


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A tiny untrained U-Net that records no training size."""
    keras.utils.set_random_seed(0)
    model = models.unet(3, base_filters=4, depth=2)
    path = tmp_path_factory.mktemp("untrained") / "model.keras"
    save_model(model, path)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tflite", "--quantize", "int8"], "needs representative_data"),
        (["--format", "tflite2"], "'tflite2' is not one of"),
        (["--quantize", "float16"], "quantize applies to format='tflite' only"),
        (["--format", "onnx", "--quantize", "int8"], "quantize applies"),
        (
            ["--format", "tflite", "--representative-data", "imgs"],
            "used only with quantize='int8'",
        ),
        (["--format", "tflite", "--image-size", "0x4"], "sides must be positive"),
    ],
)
def test_bad_options_exit_2_without_touching_anything(tmp_path, args, message):
    result = _invoke("--model", tmp_path / "m.keras", "--output", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_a_fixed_size_needs_image_size_or_a_recorded_size(untrained, tmp_path):
    result = _invoke("--model", untrained, "-o", tmp_path / "o", "--format", "onnx")
    assert result.exit_code == 2, result.output
    assert "records no training size: give --image-size" in result.output
    assert not (tmp_path / "o").exists()


def test_int8_without_images_in_the_folder_fails_naming_it(untrained, tmp_path):
    empty = tmp_path / "calibration"
    empty.mkdir()
    result = _invoke(
        "--model", untrained, "-o", tmp_path / "o", "--format", "tflite",
        "--image-size", "16", "--quantize", "int8", "--representative-data", empty,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert str(empty) in result.output
    assert not (tmp_path / "o").exists()


def test_a_failed_conversion_is_one_clear_error(untrained, tmp_path, monkeypatch):
    # Where Keras' converter fails, the command says so (exit 1) and leaves
    # no file and no temporary folder behind: no folder when it made the
    # folder, the folder as it was otherwise.
    def broken_export(self, filepath, format="tf_saved_model", **kwargs):
        raise ValueError(f"{format} cannot convert op FancyOp")

    monkeypatch.setattr(keras.Model, "export", broken_export)
    out = tmp_path / "o"
    for fmt in ("onnx", "tflite"):
        args = ["--format", fmt, "--image-size", "16", "--overwrite"]
        result = _invoke("--model", untrained, "-o", out, *args)
        assert result.exit_code == 1, result.output
        name = {"onnx": "ONNX", "tflite": "LiteRT"}[fmt]
        assert f"{name} conversion failed: ValueError: " in result.output
        assert "cannot convert op FancyOp" in result.output
        assert not out.exists()
    out.mkdir()  # an empty folder of the user's stays, marked as klseg's
    result = _invoke("--model", untrained, "-o", out, *args)
    assert result.exit_code == 1 and "conversion failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == [".klseg.json"]


def test_onnx_without_tf2onnx_says_what_to_install(untrained, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    result = _invoke(
        "--model", untrained, "-o", tmp_path / "o", "--format", "onnx",
        "--image-size", "16",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "pip install tf2onnx onnx" in result.output


def test_library_arguments(untrained, tmp_path):
    model = keras.saving.load_model(untrained)
    with pytest.raises(InvalidArgumentError, match="must end with .tflite"):
        export_litert(model, tmp_path / "m.lite", image_size=16)
    with pytest.raises(InvalidArgumentError, match="must end with .onnx"):
        export_onnx(model, tmp_path / "m.tflite", image_size=16)
    with pytest.raises(InvalidArgumentError, match="quantize"):
        export_litert(model, tmp_path / "m.tflite", image_size=16, quantize="int4")
    with pytest.raises(InvalidArgumentError, match="needs `representative_images`"):
        export_litert(model, tmp_path / "m.tflite", image_size=16, quantize="int8")
    bad = [np.zeros((16, 17, 3), np.uint8)]
    with pytest.raises(InvalidArgumentError, match=r"\(16, 16, 3\).*\(16, 17, 3\)"):
        export_litert(
            model,
            tmp_path / "m.tflite",
            image_size=16,
            quantize="int8",
            representative_images=bad,
        )
    with pytest.raises(InvalidArgumentError, match="image_size"):
        export_litert(model, tmp_path / "m.tflite", image_size=(16,))
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ModelError, match="per-pixel"):
        export_litert(flat, tmp_path / "m.tflite", image_size=16)
    assert list(tmp_path.iterdir()) == []
