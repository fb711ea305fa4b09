"""The jobs behind the commands, run for real on tiny data.

One chain of runs is shared by the module (32x32 images, a handful of them,
a 2-level U-Net with 4 base filters): a training run interrupted after its
first epoch and resumed from the command line, a two-weight fine-tuning sweep
on top of it, then evaluate, predict, export and serving the export.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from helpers import (
    SIZE,
    finetune_args,
    history_epochs,
    invoke,
    miou64,
    ok,
    predict_args,
    read_folder,
    train_args,
    train_config,
)
from PIL import Image

from klseg import errors, models, runs
from klseg.data import synthetic

TINY_MODEL = ["--base-filters", "4", "--depth", "2"]
TINY_RUN = ["--image-size", str(SIZE), "--batch-size", "4", "--quiet"]


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def source_run(bench, tmp_path_factory):
    """A 2-epoch training run, interrupted after epoch 1, then resumed."""
    out = tmp_path_factory.mktemp("runs") / "source"
    cfg = train_config(bench, out, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        runs.train(cfg, callbacks=[InterruptAfterFirstEpoch()])
    interrupted = {
        "history": (out / "history.csv").read_text(),
        "state": json.loads(
            (out / "checkpoints" / "epoch_0001" / "state.json").read_text()
        ),
        "metrics_written": (out / "metrics.json").exists(),
    }
    # Resume from the command line: every setting comes from the saved config.
    result = ok("train", "--output", out, "--resume", "--quiet")
    return out, interrupted, result.output


def source_finetune_args(bench, source_run):
    """``klseg finetune`` of the source run on the benchmark's folders."""
    return [
        *finetune_args(bench, source_run[0] / "model.keras"),
        "--source-val-data",
        bench / "source" / "val",
        "--source-images",
        bench / "source" / "unlabeled",
    ]


@pytest.fixture(scope="module")
def sweep(bench, source_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    result = ok(
        *source_finetune_args(bench, source_run),
        "--kl-weight",
        "0,0.5",
        "--epochs",
        1,
        "--strategy",
        "mirrored",
        "--output",
        out,
        *TINY_RUN,
    )
    return out, result.output


# --------------------------------------------------------------------------
# train, resume, run folder
# --------------------------------------------------------------------------


def test_interrupted_run_keeps_its_first_epoch(source_run):
    _, interrupted, _ = source_run
    assert interrupted["state"]["epoch"] == 1
    assert interrupted["state"]["optimizer_iterations"] == 2  # 8 images / 4
    assert interrupted["history"].count("\n") == 2  # header + epoch 0
    assert not interrupted["metrics_written"]


def test_resume_continues_from_the_last_completed_epoch(source_run):
    out, interrupted, output = source_run
    assert "Resuming" not in output  # --quiet
    assert history_epochs(out / "history.csv") == [0, 1]
    first_row = interrupted["history"].splitlines()[1]
    assert first_row in (out / "history.csv").read_text()  # epoch 0 kept as is
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    state = json.loads(
        (out / "checkpoints" / latest["checkpoint"] / "state.json").read_text()
    )
    assert state["epoch"] == 2
    # The optimizer continued: 2 steps per epoch, nothing restarted at 0.
    assert state["optimizer_iterations"] == 4
    assert state["best_epoch"] in (1, 2)


def test_run_folder_layout(source_run):
    out = source_run[0]
    for name in (
        "model.keras",
        "metrics.json",
        "history.csv",
        "config.yaml",
        "report.md",
    ):
        assert (out / name).is_file(), name
    assert list((out / "logs" / "train").glob("events.out.tfevents.*"))
    assert list((out / "logs" / "validation").glob("events.out.tfevents.*"))
    assert (out / "plots" / "training_curves.png").stat().st_size > 1000
    assert (out / "plots" / "overlays.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val"]["mean_iou"] <= 1
    assert set(metrics["val"]["per_class_iou"]) == set(synthetic.CLASS_NAMES)
    report = (out / "report.md").read_text()
    assert "plots/training_curves.png" in report
    assert not list(out.rglob(".*.tmp*"))  # no temporary files left behind


def test_tensorboard_logs_hold_the_epoch_scalars(source_run):
    import tensorflow as tf

    folder = source_run[0] / "logs" / "validation"
    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(v.tag for v in event.summary.value)
    assert "epoch_mean_iou" in tags and "epoch_loss" in tags


def test_resume_refuses_changed_settings(source_run):
    result = invoke("train", "--output", source_run[0], "--resume", "--batch-size", 2)
    assert result.exit_code == 1
    assert "batch_size: saved 4, now 2" in result.output


def test_resume_with_nothing_left_to_do(source_run):
    result = ok("train", "--output", source_run[0], "--resume")
    assert "nothing to train" in result.output


def test_new_run_refuses_a_used_folder(bench, source_run):
    result = invoke(
        *train_args(bench, source_run[0]),
        *TINY_RUN,
    )
    assert result.exit_code == 1
    assert "--resume" in result.output and "--overwrite" in result.output


# --------------------------------------------------------------------------
# finetune sweep, evaluate, predict, export
# --------------------------------------------------------------------------


def test_kl_weight_list_runs_one_finetune_per_weight(sweep):
    out, output = sweep
    for name in ("kl_0", "kl_0.5"):
        run = out / name
        assert (run / "model.keras").is_file()
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics) >= {"source", "target", "source_model", "forgetting"}
        assert metrics["kl_weight"] == float(name[3:])
        assert "val_source_mean_iou" in (run / "history.csv").read_text()
    assert (out / "tradeoff.png").stat().st_size > 1000
    top = json.loads((out / "metrics.json").read_text())
    assert set(top["runs"]) == {"kl_0", "kl_0.5"}
    assert "kl_weight  source mIoU  target mIoU" in output
    assert "kl_0.5/report.md" in (out / "report.md").read_text()


def test_sweep_resume_keeps_finished_weights(sweep):
    out, _ = sweep
    result = ok("finetune", "--output", out, "--resume")
    assert result.output.count("finished earlier") == 2


def test_evaluate_json(bench, sweep):
    model = sweep[0] / "kl_0.5" / "model.keras"
    result = ok(
        "evaluate", "--model", model, "--data", bench / "target" / "val", "--json"
    )
    metrics = json.loads(result.output)
    assert metrics["num_images"] == 4
    assert metrics["image_size"] == SIZE  # read from the run's config.yaml
    # Against float64 numpy: the saved model's predictions on the folder's
    # images (already at the run's size), a confusion matrix of the masks.
    images, masks = read_folder(bench / "target" / "val")
    logits = runs.load_model(model).predict(images, verbose=0).astype("float64")
    predicted = logits.argmax(-1)
    valid = masks != 255
    assert valid.any()
    n = synthetic.NUM_CLASSES
    confusion = np.bincount(
        masks[valid] * n + predicted[valid], minlength=n * n
    ).reshape(n, n)
    tp = np.diag(confusion).astype("float64")
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = {
        name: (tp[c] / union[c] if union[c] else None)
        for c, name in enumerate(synthetic.CLASS_NAMES)
    }
    assert metrics["per_class_iou"] == pytest.approx(iou, abs=1e-9)
    assert metrics["mean_iou"] == pytest.approx(miou64(masks, predicted, n), abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(tp.sum() / valid.sum(), abs=1e-9)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.where(valid, masks, 0)[..., None], -1)
    assert metrics["loss"] == pytest.approx(-picked[..., 0][valid].mean(), rel=1e-5)


def test_predict_export_and_serve(bench, sweep, tmp_path):
    model = sweep[0] / "kl_0.5" / "model.keras"
    images = bench / "target" / "val"
    ok(
        *predict_args(model, images, tmp_path / "pred"),
        "--quiet",
    )
    masks = sorted((tmp_path / "pred" / "masks").glob("*.png"))
    assert len(masks) == 4
    assert len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == 4
    predicted = np.asarray(Image.open(masks[0]))
    assert predicted.shape == (SIZE, SIZE)
    assert predicted.max() < synthetic.NUM_CLASSES

    ok("export", "--model", model, "--output", tmp_path / "exported")
    # Serve in a process that never imports klseg.
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, tensorflow as tf
        from PIL import Image
        image = np.asarray(Image.open({str(images / "images" / masks[0].name)!r}))
        loaded = tf.saved_model.load({str(tmp_path / "exported")!r})
        out = loaded.signatures["serving_default"](images=tf.constant(image[None]))
        np.save({str(tmp_path / "served.npy")!r}, out["classes"][0].numpy())
        assert not any(m.startswith("klseg") for m in sys.modules)
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    served = np.load(tmp_path / "served.npy")
    np.testing.assert_array_equal(served, predicted)


@pytest.mark.slow
def test_finetune_with_every_kind_of_input(bench, source_run, tmp_path):
    """Unlabelled target images, KL on both domains, stored source
    predictions, frozen BatchNorm and bfloat16 in one run."""
    out = tmp_path / "all"
    with pytest.warns(UserWarning, match="slower than float32"):
        result = ok(
            "finetune",
            "--source",
            source_run[0] / "model.keras",
            "--data",
            bench / "target" / "train",
            "--unlabeled-data",
            bench / "target" / "unlabeled",
            "--val-data",
            bench / "target" / "val",
            "--source-images",
            bench / "source" / "unlabeled",
            "--kl-inputs",
            "both",
            "--source-predictions",
            "stored",
            "--student-bn",
            "frozen",
            "--mixed-precision",
            "bfloat16",
            "--kl-weight",
            "0.5",
            "--epochs",
            1,
            "--output",
            out,
            "--image-size",
            SIZE,
            "--batch-size",
            4,
        )
    assert keras.config.dtype_policy().name == "float32"  # restored afterwards
    assert "Stored source predictions" in result.output  # the memory estimate
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kl_inputs"] == "both"
    assert "source" not in metrics  # no --source-val-data
    history = (out / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    kl = float(history[1].split(",")[header.index("kl_loss")])
    assert np.isfinite(kl) and kl > 0
    student = runs.load_model(out / "model.keras")
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in student.layers}
    logits = student(np.zeros((1, SIZE, SIZE, 3), "uint8"))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_synth_command(tmp_path):
    out = tmp_path / "synth"
    ok(
        "data",
        "synth",
        "--output",
        out,
        "--image-size",
        16,
        "--num-train",
        2,
        "--num-val",
        1,
        "--num-unlabeled",
        1,
    )
    for domain in ("source", "target"):
        assert len(list((out / domain / "train" / "images").glob("*.png"))) >= 1
        assert (out / domain / "val" / "masks").is_dir()
        assert (out / domain / "unlabeled" / "images").is_dir()
    again = invoke("data", "synth", "--output", out)
    assert again.exit_code == 1 and "--overwrite" in again.output


# --------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------


def test_unwritable_output(bench, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke(
        *train_args(bench, blocker / "run"),
        *TINY_RUN,
    )
    assert result.exit_code == 1
    assert "cannot write to output folder" in result.output
    assert "Traceback" not in result.output


def test_missing_files(bench, tmp_path):
    result = invoke(
        *finetune_args(bench, tmp_path / "missing.keras", tmp_path / "o"),
        *TINY_RUN,
    )
    assert result.exit_code == 1
    assert "missing.keras does not exist" in result.output
    result = invoke(
        "train",
        "--data",
        tmp_path / "nothing",
        "--val-data",
        tmp_path / "x",
        "--output",
        tmp_path / "o2",
        *TINY_RUN,
    )
    assert result.exit_code == 1
    assert "nothing" in result.output
    # Valid images, so that the missing model is the error.
    result = invoke(
        "predict",
        "--model",
        tmp_path / "m.keras",
        "--images",
        bench / "target" / "val",
        "-o",
        tmp_path / "p",
    )
    assert result.exit_code == 1
    assert "m.keras does not exist" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_run_that_failed_early_leaves_a_reusable_folder(bench, tmp_path):
    args = ["train", "--data", bench / "source" / "train", "--output", tmp_path / "o"]
    first = invoke(
        *args, "--val-data", bench / "source" / "val", "--depth", 2, "--image-size", 30
    )
    assert first.exit_code == 2 and "nearest valid sizes" in first.output
    assert (tmp_path / "o" / "config.yaml").is_file()
    second = invoke(*args, "--val-data", tmp_path / "missing", *TINY_RUN)
    assert second.exit_code == 1
    assert "missing" in second.output and "not empty" not in second.output


def test_incompatible_source_model(bench, tmp_path):
    import klseg.models

    three = klseg.models.unet(3, base_filters=4, depth=2)
    three.save(tmp_path / "three.keras")
    result = invoke(
        *finetune_args(bench, tmp_path / "three.keras", tmp_path / "o"),
        *TINY_RUN,
    )
    assert result.exit_code == 1
    assert "predicts 3 classes" in result.output

    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    plain.save(tmp_path / "plain.keras")
    result = invoke("export", "--model", tmp_path / "plain.keras", "-o", tmp_path / "e")
    assert result.exit_code == 1
    assert "not a klseg segmentation model" in result.output
    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    result = invoke(
        "evaluate",
        "--model",
        tmp_path / "broken.keras",
        "--data",
        bench / "target" / "val",
    )
    assert result.exit_code == 1
    assert "cannot load model" in result.output


def test_image_size_must_fit_the_model(bench, source_run, tmp_path):
    result = invoke(
        "evaluate",
        "--model",
        source_run[0] / "model.keras",
        "--data",
        bench / "target" / "val",
        "--image-size",
        30,
    )
    assert result.exit_code == 2
    assert "nearest valid sizes for 30 are 28 and 32" in result.output


def test_unlabelled_folder_cannot_be_evaluated(bench, source_run):
    result = invoke(
        "evaluate",
        "--model",
        source_run[0] / "model.keras",
        "--data",
        bench / "target" / "unlabeled",
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output


def test_monitor_direction():
    assert runs._lower_is_better("val_loss")
    assert runs._lower_is_better("val_target_loss")
    assert runs._lower_is_better("val_forgetting")
    assert not runs._lower_is_better("val_mean_iou")
    assert not runs._lower_is_better("val_source_mean_iou")


def test_config_validation_in_python():
    with pytest.raises(errors.InvalidArgumentError, match="jit cannot be combined"):
        runs.TrainConfig(
            data="a", val_data="b", output="o", jit=True, strategy="mirrored"
        )
    with pytest.raises(errors.InvalidArgumentError, match="kl_weight"):
        runs.FinetuneConfig(
            source="s", data="a", val_data="b", output="o", kl_weight=-1
        )


# --------------------------------------------------------------------------
# mixed precision, demo
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo(tmp_path):
    result = ok("demo", "--quick", "--output", tmp_path / "demo", "--quiet")
    for row in ("source model", "plain fine-tuning", "KL fine-tuning"):
        assert row in result.output
    out = tmp_path / "demo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["mean_iou"]) == {
        "source model",
        "plain fine-tuning",
        "KL fine-tuning (w=0.3)",
    }
    assert (out / "report.md").is_file()
    assert (out / "plots" / "domains.png").is_file()
    assert (out / "export" / "saved_model.pb").is_file()
    again = invoke("demo", "--quick", "--output", out)
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_finetune_to_another_class_set(bench, source_run, tmp_path):
    """Merge tree into ground and car into a new 'vehicle' class."""
    target = ["sky", "ground", "road", "building", "vehicle"]
    mask_map = tmp_path / "target_masks.json"
    mask_map.write_text(json.dumps({"0": 0, "1": 1, "2": 2, "3": 3, "4": 1, "5": 4}))
    source_map = tmp_path / "source_classes.json"
    source_map.write_text(json.dumps({"merge": {"tree": "ground", "car": "vehicle"}}))
    common = [
        *source_finetune_args(bench, source_run),
        "--class-map",
        mask_map,
        "--class-names",
        ",".join(target),
        "--epochs",
        1,
        *TINY_RUN,
    ]
    # Without a map for tree and car: a clear error naming them, exit 1.
    result = invoke(*common, "--output", tmp_path / "unmapped")
    assert result.exit_code == 1, result.output
    assert "tree" in result.output and "car" in result.output
    assert "vehicle" in result.output

    bad = tmp_path / "bad.json"
    bad.write_text('{"merge": {"tree": 3}}')
    result = invoke(*common, "--source-class-map", bad, "--output", tmp_path / "bad")
    assert result.exit_code == 1 and "bad.json" in result.output, result.output

    # Stored source predictions (source classes, mapped by the wrapper); the
    # live path with a class map is tested in test_finetune.py.
    out = tmp_path / "mapped"
    ok(
        *common,
        "--source-class-map",
        source_map,
        "--source-predictions",
        "stored",
        "--output",
        out,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_map"] == {
        "sky": "sky",
        "ground": "ground",
        "road": "road",
        "building": "building",
        "tree": "ground",
        "car": "vehicle",
    }
    assert list(metrics["target"]["per_class_iou"]) == target
    assert list(metrics["source"]["per_class_iou"]) == target
    model = runs.load_model(out / "model.keras")
    assert models.get_class_names(model) == target
    assert model.output.shape[-1] == 5
    # The source model's source-domain score, in the target classes,
    # against a float64 reference: merged probabilities, mapped labels.
    source = runs.load_model(source_run[0] / "model.keras")
    images, masks = read_folder(bench / "source" / "val")
    probs = keras.ops.convert_to_numpy(
        keras.ops.softmax(source.predict(images, verbose=0).astype("float64"))
    )
    merged = np.stack(
        [
            probs[..., 0],
            probs[..., 1] + probs[..., 4],
            probs[..., 2],
            probs[..., 3],
            probs[..., 5],
        ],
        axis=-1,
    )
    lut = np.array([0, 1, 2, 3, 1, 4] + [255] * 250)
    expected = miou64(lut[masks], merged.argmax(-1), 5)
    got = metrics["source_model"]["source"]["mean_iou"]
    assert 0 < expected < 1
    assert got == pytest.approx(expected, abs=1e-9)
    assert metrics["forgetting"] == pytest.approx(
        got - metrics["source"]["mean_iou"], abs=1e-9
    )
