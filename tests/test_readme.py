"""The README's command-line block: the lines that evaluate with windows and
flip, that export to TFLite, and that adapt without target labels, run as
written on a small built-in data set (tiny models stand in for the trained
ones they name)."""

import json

import numpy as np
import pytest
from helpers import ok, readme_command

from klseg import runs


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """``data/`` from ``klseg data synth`` and a tiny model where the README's
    fine-tuned model would be."""
    root = tmp_path_factory.mktemp("readme")
    ok(
        "data", "synth", "--output", root / "data", "--image-size", 32,
        "--num-train", 8, "--num-val", 4, "--num-unlabeled", 0,
    )  # fmt: skip
    runs.train(
        runs.TrainConfig(
            data=str(root / "data" / "target" / "train"),
            val_data=str(root / "data" / "target" / "val"),
            output=str(root / "runs" / "finetune" / "kl_0.3"),
            image_size=32,
            base_filters=4,
            depth=2,
            epochs=1,
            batch_size=4,
            verbose=0,
        )
    )
    return root


def test_readme_tiled_flip_evaluate_runs(project, monkeypatch):
    monkeypatch.chdir(project)
    command = readme_command("--tile-size")
    assert command[0] == "evaluate" and "--json" in command
    result = ok(*command)
    scores = json.loads(result.output[result.output.index("{") :])
    settings = scores["inference"]
    assert settings["tta"] == "flip" and settings["tile_overlap"] == 0.5
    counts = np.array(scores["confusion_matrix"]["counts"])
    # Every labelled pixel of the 4 validation images is counted once.
    assert counts.sum() == 4 * 32 * 32
    assert np.trace(counts) / counts.sum() == pytest.approx(scores["pixel_accuracy"])
    assert (project / command[command.index("--plot") + 1]).is_file()


def test_readme_int8_tflite_export_runs(project, monkeypatch):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("LiteRT export runs on the TensorFlow backend")
    from klseg.data.images import list_images, read_image
    from klseg.export import run_litert

    monkeypatch.chdir(project)
    command = readme_command("--quantize")
    assert command[0] == "export" and command[command.index("--quantize") + 1] == "int8"
    ok(*command)
    out = project / command[command.index("--output") + 1]
    info = json.loads((out / "export.json").read_text())
    assert (info["format"], info["quantize"]) == ("tflite", "int8")
    assert info["image_size"] == [32, 32]  # the model's training size
    assert info["representative_images"] == len(list_images("data/target/train"))
    images = np.stack([read_image(p) for p in list_images("data/target/val")])
    classes = run_litert(out / "model.tflite", images)
    assert classes.shape == (4, 32, 32) and classes.dtype == np.int32
    assert 0 <= classes.min() and classes.max() < len(info["class_names"])


def test_readme_adapt_runs(tmp_path, monkeypatch):
    root = tmp_path
    ok(
        "data", "synth", "--output", root / "data", "--image-size", 32,
        "--num-train", 8, "--num-val", 4, "--num-unlabeled", 8,
    )  # fmt: skip
    runs.train(
        runs.TrainConfig(
            data=str(root / "data" / "source" / "train"),
            val_data=str(root / "data" / "source" / "val"),
            output=str(root / "runs" / "source"),
            image_size=32,
            base_filters=4,
            depth=2,
            epochs=1,
            batch_size=4,
            verbose=0,
        )  # fmt: skip
    )
    monkeypatch.chdir(root)
    command = readme_command("--target-images")
    assert command[0] == "adapt" and "--source-data" in command
    result = ok(*command)
    assert "unsupervised" in result.output
    out = root / command[command.index("--output") + 1]
    found = json.loads((out / "metrics.json").read_text())
    assert found["mode"] == "unsupervised" and found["epochs"] == 2
    assert {"target", "source", "source_model"} <= set(found)
