"""klseg on the JAX backend (the backend the GPU machines run).

Run with ``KERAS_BACKEND=jax``; on any other backend the module is skipped
(the TensorFlow run of the suite covers the same paths in test_finetune.py,
test_export.py and test_runs.py). It checks what the backend-independent
core tests leave out: a ``KLRegularizedModel`` saved to ``.keras`` and
trained further after loading, the SavedModel export (converted with
``jax2tf``) against ``predict``, and a tiny ``train`` then ``finetune`` run
whose saved scores are recomputed here from the saved model.

Every model is a U-Net with the same layers (6 classes, 8 base filters,
depth 2), so that JAX compiles each weight initialiser and step once for
the whole module.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip(
        "JAX backend tests; run with KERAS_BACKEND=jax",
        allow_module_level=True,
    )


from helpers import (  # noqa: E402
    SIZE,
    assert_history_close,
    history,
    read_folder,
    softmax64,
    tiny_unet,
)

from klseg import finetune, losses, metrics, models, runs  # noqa: E402
from klseg.data import synthetic  # noqa: E402
from klseg.export import export_saved_model, pad_to_multiple  # noqa: E402
from klseg.finetune import KLRegularizedModel  # noqa: E402

IGNORE = 255
NUM_CLASSES = synthetic.NUM_CLASSES
NAMES = list(synthetic.CLASS_NAMES)


def _unet(seed):
    return tiny_unet(NUM_CLASSES, seed, base_filters=8, depth=2, class_names=NAMES)


# --------------------------------------------------------------------------
# KLRegularizedModel: .keras save, load, and training on from the file
# --------------------------------------------------------------------------


def _compiled_wrapper(source):
    student = finetune.clone_student(source)
    model = KLRegularizedModel(student, source, kl_weight=0.5, kl_inputs="source")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
        metrics=[metrics.MeanIoU(NUM_CLASSES, ignore_class=IGNORE)],
    )
    return model


def test_wrapper_save_load_and_training_continues(tmp_path):
    model = _compiled_wrapper(_unet(seed=1))
    images, masks = synthetic.generate("target", 4, image_size=SIZE, seed=1)
    source_images, _ = synthetic.generate("source", 4, image_size=SIZE, seed=2)
    x = {"images": images, "source_images": source_images}
    fit_args = {"batch_size": 2, "epochs": 1, "shuffle": False, "verbose": 0}
    model.fit(x, masks, **fit_args)
    assert int(model.optimizer.iterations) == 2
    logits = model.predict(images, verbose=0)
    source_logits = model.source.predict(images, verbose=0)
    logs = model.evaluate(x, masks, batch_size=2, verbose=0, return_dict=True)

    path = tmp_path / "wrapper.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, KLRegularizedModel)
    assert loaded.get_config()["kl_inputs"] == "source"
    assert loaded.kl_weight == 0.5 and loaded.temperature == model.temperature
    assert not loaded.source.trainable_weights
    assert models.get_class_names(loaded.student) == NAMES
    np.testing.assert_allclose(loaded.predict(images, verbose=0), logits, atol=1e-6)
    loaded_logs = loaded.evaluate(x, masks, batch_size=2, verbose=0, return_dict=True)
    for key in ("loss", "task_loss", "kl_loss", "mean_iou"):
        np.testing.assert_allclose(loaded_logs[key], logs[key], rtol=1e-5)

    # Training goes on from the saved optimizer state: the loaded model takes
    # the same step as the model that never left memory.
    assert int(loaded.optimizer.iterations) == 2
    history = loaded.fit(x, masks, **fit_args).history
    reference = model.fit(x, masks, **fit_args).history
    assert int(loaded.optimizer.iterations) == 4
    assert np.isfinite(history["loss"][0]) and history["kl_loss"][0] > 0
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=1e-5)
    after = loaded.predict(images, verbose=0)
    assert np.abs(after - logits).max() > 1e-4  # the student moved ...
    np.testing.assert_allclose(after, model.predict(images, verbose=0), atol=1e-5)
    # ... and the source model did not.
    np.testing.assert_allclose(
        loaded.source.predict(images, verbose=0), source_logits, atol=1e-6
    )


# --------------------------------------------------------------------------
# SavedModel export (jax2tf) against predict
# --------------------------------------------------------------------------

# Serves an export in a process where JAX cannot be imported (an installed
# TensorFlow imports it when present) and klseg is not on the path.
SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["jax"] = sys.modules["jaxlib"] = None
    import numpy as np
    import tensorflow as tf

    path, inputs, output = sys.argv[1:4]
    serve = tf.saved_model.load(path).signatures["serving_default"]
    out = serve(images=tf.constant(np.load(inputs)))
    np.save(output, out["probabilities"].numpy())
    assert not any(m == "klseg" or m.startswith("klseg.") for m in sys.modules)
    """
)


def test_export_serves_the_model_outputs(tmp_path):
    import tensorflow as tf

    model = _unet(seed=3)
    multiple = models.size_multiple(model)
    assert multiple == 4
    path = export_saved_model(model, tmp_path / "exported")
    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    names = loaded.signatures["class_names"]()["class_names"].numpy()
    assert [n.decode() for n in names] == NAMES

    rng = np.random.default_rng(0)
    for shape in [(3, SIZE, SIZE, 3), (2, 13, 10, 3), (1, 8, 20, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        out = serve(images=tf.constant(images))
        assert out["classes"].dtype == tf.int32
        assert out["probabilities"].dtype == tf.float32
        assert tuple(out["classes"].shape) == shape[:3]
        height, width = shape[1:3]
        logits = model.predict(pad_to_multiple(images, multiple), verbose=0)
        probs = softmax64(logits[:, :height, :width])
        np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=2e-5)
        top2 = np.sort(probs, axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 1e-4
        np.testing.assert_array_equal(
            out["classes"].numpy()[clear], probs.argmax(-1)[clear]
        )
        if shape[1] % multiple == 0 and shape[2] % multiple == 0:
            served_logits = loaded.logits(tf.constant(images, tf.float32))
            np.testing.assert_allclose(served_logits.numpy(), logits, atol=1e-4)

    # An empty batch gives empty outputs (the converted model would refuse it).
    for shape in [(0, SIZE, SIZE, 3), (0, 13, 10, 3)]:
        out = serve(images=tf.zeros(shape, tf.uint8))
        assert out["classes"].dtype == tf.int32
        assert tuple(out["classes"].shape) == shape[:3]
        assert out["probabilities"].dtype == tf.float32
        assert tuple(out["probabilities"].shape) == (*shape[:3], NUM_CLASSES)

    # The export runs in a TensorFlow program without JAX and klseg.
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "serve.py").write_text(SERVE_SCRIPT)
    result = subprocess.run(
        [sys.executable, "serve.py", str(path), "images.npy", "served.npy"],
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), probs, atol=2e-5)


# --------------------------------------------------------------------------
# The jobs: train, then finetune, into run folders
# --------------------------------------------------------------------------


# The source model: 2 epochs of the module's U-Net (8 base filters).
SOURCE_RUN = {"epochs": 2, "base_filters": 8}


@pytest.fixture(scope="module")
def finetune_run(bench, source_run, tmp_path_factory):
    cfg = runs.FinetuneConfig(
        source=str(source_run.output / "model.keras"),
        data=str(bench / "target" / "train"),
        val_data=str(bench / "target" / "val"),
        source_val_data=str(bench / "source" / "val"),
        source_images=str(bench / "source" / "unlabeled"),
        output=str(tmp_path_factory.mktemp("runs") / "finetune"),
        kl_weight=0.5,
        epochs=1,
        batch_size=4,
        image_size=SIZE,
        verbose=0,
    )
    return runs.finetune(cfg)


def _scores(model, folder):
    """mIoU and pixel accuracy of ``model`` on ``folder``, in numpy.

    IoU over the whole folder per class; a class absent from both the masks
    and the predictions has none and is left out of the mean.
    """
    images, masks = read_folder(folder)
    assert images.shape[1:3] == (SIZE, SIZE) and masks.shape[1:] == (SIZE, SIZE)
    predicted = np.asarray(model.predict(images, verbose=0)).argmax(-1)
    valid = masks != IGNORE
    ious = {}
    for c, name in enumerate(NAMES):
        truth, guess = (masks == c) & valid, (predicted == c) & valid
        union = np.sum(truth | guess)
        ious[name] = float(np.sum(truth & guess) / union) if union else None
    defined = [v for v in ious.values() if v is not None]
    accuracy = float(np.sum((predicted == masks) & valid) / np.sum(valid))
    return {"mean_iou": float(np.mean(defined)), "pixel_accuracy": accuracy}, ious


def _check_scores(saved, model, folder):
    expected, ious = _scores(model, folder)
    assert 0 <= saved["mean_iou"] <= 1
    assert saved["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-6)
    assert saved["pixel_accuracy"] == pytest.approx(
        expected["pixel_accuracy"], abs=1e-6
    )
    for name, iou in ious.items():
        if iou is None:
            assert saved["per_class_iou"][name] is None
        else:
            assert saved["per_class_iou"][name] == pytest.approx(iou, abs=1e-6)
    assert saved["num_images"] == len(list((folder / "images").glob("*.png")))


def _check_run_folder(out, epochs):
    for name in ("model.keras", "history.csv", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    rows = history(out / "history.csv")
    assert [int(row["epoch"]) for row in rows] == list(range(epochs))
    assert all(np.isfinite(float(row["loss"])) for row in rows)
    assert not list(out.rglob(".*.tmp*"))
    return rows, json.loads((out / "metrics.json").read_text())


def test_train_run_folder_and_scores(bench, source_run):
    out = source_run.output
    rows, saved = _check_run_folder(out, epochs=2)
    assert {"val_mean_iou", "mean_iou"} <= set(rows[0])
    assert saved["epochs"] == 2 and saved["best_epoch"] in (1, 2)
    best = rows[saved["best_epoch"] - 1]
    assert float(best["val_mean_iou"]) == max(float(r["val_mean_iou"]) for r in rows)
    model = keras.saving.load_model(out / "model.keras")
    assert models.get_class_names(model) == NAMES
    _check_scores(saved["val"], model, bench / "source" / "val")
    # The best epoch's validation mIoU in the history is the saved model's.
    assert float(best["val_mean_iou"]) == pytest.approx(
        saved["val"]["mean_iou"], abs=1e-5
    )


def test_finetune_run_folder_and_scores(bench, source_run, finetune_run):
    out = finetune_run.output
    rows, saved = _check_run_folder(out, epochs=1)
    assert float(rows[0]["kl_loss"]) > 0
    assert {"val_target_mean_iou", "val_source_mean_iou"} <= set(rows[0])
    assert saved["kl_weight"] == 0.5 and saved["kl_inputs"] == "source"
    model = keras.saving.load_model(out / "model.keras")
    assert not isinstance(model, KLRegularizedModel)  # the student alone
    _check_scores(saved["target"], model, bench / "target" / "val")
    _check_scores(saved["source"], model, bench / "source" / "val")
    source = keras.saving.load_model(source_run.output / "model.keras")
    _check_scores(saved["source_model"]["source"], source, bench / "source" / "val")
    before, after = saved["source_model"]["source"], saved["source"]
    forgetting = before["mean_iou"] - after["mean_iou"]
    assert saved["forgetting"] == pytest.approx(forgetting, abs=1e-6)


def _count_passes(monkeypatch):
    """The batches of each pass ``fit`` makes over its training data."""
    from keras.src.backend.jax import trainer as jax_trainer

    passes = []
    original = jax_trainer.JAXEpochIterator._get_iterator

    def counted(self):
        passes.append(0)
        for batch in original(self):
            passes[-1] += 1
            yield batch

    monkeypatch.setattr(jax_trainer.JAXEpochIterator, "_get_iterator", counted)
    return passes


def test_fit_reads_the_training_data_in_one_pass(
    bench, source_run, monkeypatch, tmp_path
):
    """Keras' JAX ``fit`` builds its metrics from a batch of a first pass
    over the training data, drops that pass and trains on a second. The
    dropped pass kept reading ahead in the background and took seeds meant
    for the next pass: the augmentations a run trained on changed from run
    to run (3 of 16 runs of one config differed). klseg builds from the
    data's element spec, so training reads one pass, from its first batch."""
    passes = _count_passes(monkeypatch)
    cfg = runs.FinetuneConfig(
        source=str(source_run.model_path),
        data=str(bench / "target" / "train"),
        val_data=str(bench / "target" / "val"),
        source_images=str(bench / "source" / "unlabeled"),
        source_predictions="stored",
        output=str(tmp_path / "run"),
        epochs=2,
        batch_size=4,
        image_size=SIZE,
        verbose=0,
    )
    runs.finetune(cfg)
    # 4 target images in batches of 4: one step per epoch, in one pass.
    assert passes == [2]


@pytest.mark.parametrize("build", [True, False])
def test_build_before_fit_in_python(monkeypatch, build):
    """``runtime.build_before_fit``, as docs/finetune.md tells Python users,
    on a dataset of unknown batch size: no pass is dropped. Without it Keras
    drops one (when this fails, Keras fixed it and the call can go)."""
    import tensorflow as tf

    from klseg.runs import runtime

    passes = _count_passes(monkeypatch)
    source = tiny_unet(3, 0)
    model = KLRegularizedModel(finetune.clone_student(source), source, kl_weight=0.5)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, SIZE, SIZE, 3)).astype("float32")
    masks = rng.integers(0, 3, (8, SIZE, SIZE)).astype("int32")
    x = {"images": images, "source_images": images}
    data = tf.data.Dataset.from_tensor_slices((x, masks)).shuffle(8, seed=1).batch(4)
    model.compile(optimizer="adam", loss=losses.SparseKLDivergence())
    if build:
        runtime.build_before_fit(model, data)
    model.fit(data, epochs=2, shuffle=False, verbose=0)
    assert passes == ([2, 2] if build else [1, 2, 2])


# --------------------------------------------------------------------------
# keras.distribution.DataParallel (strategy="mirrored" on JAX)
# --------------------------------------------------------------------------


def test_data_parallel_on_two_devices(tmp_path):
    """Each training wrapper under ``keras.distribution.DataParallel`` on two
    host devices: the global-batch losses and the weights after training
    equal the one-device run's; each job with ``strategy="mirrored"`` trains
    under DataParallel over both devices to the one-device job's history and
    weights (a fresh process: JAX fixes its device count when it starts)."""
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    )
    script = os.path.join(os.path.dirname(__file__), "data_parallel_check.py")
    done = subprocess.run(
        [sys.executable, script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(s for s in done.stdout.splitlines() if s.startswith("RESULT "))
    found = json.loads(line[len("RESULT ") :])
    assert found["devices"] == 2
    for kind in ("kl", "mean_teacher", "distill"):
        case = found[kind]
        assert case["devices"] == 2, kind  # the weights live on both devices
        assert case["weights"] < 3e-5, (kind, case["weights"])
        for key, values in case["one"].items():
            np.testing.assert_allclose(values, case["two"][key], rtol=1e-5)
    # Each job trains under DataParallel over both devices, and its history
    # and weights are the one-device run's (the tolerances of the
    # TensorFlow mirrored tests).
    for name in (
        "train",
        "finetune_stored",
        "finetune_consistency",
        "distill",
        "adapt",
    ):
        case = found[f"job_{name}"]
        assert case["devices"] == 2, name
        assert case["weights"] < 1e-5, (name, case["weights"])
        mirrored = tmp_path / f"{name}_mirrored" / "history.csv"
        columns = assert_history_close(
            mirrored, tmp_path / f"{name}_default" / "history.csv"
        )
        assert list(columns["epoch"]) == [0, 1] and "loss" in columns, name
        for row in history(mirrored):
            values = [float(v) for v in row.values() if v]
            assert all(math.isfinite(v) for v in values), (name, row)


def test_multi_worker_is_refused_on_jax_naming_mirrored():
    from klseg import errors
    from klseg.runs import runtime

    with pytest.raises(errors.InvalidArgumentError, match="strategy='mirrored'"):
        runtime.make_strategy("multi-worker")
