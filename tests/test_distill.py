"""Tests for klseg.distill and ``klseg distill``.

The library tests run on the TensorFlow and JAX backends; the run and
command-line tests need tf.data (TensorFlow).
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
    TWO_CPU_REPLICAS,
    hub_segmenter,
    invoke,
    log_softmax64,
    run_script,
    tiny_unet,
)

from klseg import errors, losses, metrics, models, registry, runs
from klseg.distill import (
    DEFAULT_KL_TYPE,
    DEFAULT_KL_WEIGHT,
    DEFAULT_TEMPERATURE,
    KL_TYPES,
    DistillationModel,
    default_temperature,
)
from klseg.errors import InvalidArgumentError

IGNORE = 255
SIZE = 16
CLASSES = 3
TENSORFLOW = keras.backend.backend() == "tensorflow"


def _teacher(seed=1, num_classes=CLASSES):
    keras.utils.set_random_seed(seed)
    return models.unet(num_classes, base_filters=4, depth=2)


def _strided_student(seed=2, num_classes=CLASSES, size=SIZE):
    """A student that outputs logits at half the input resolution."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="tanh")(x)
    outputs = keras.layers.Conv2D(num_classes, 3, strides=2, padding="same")(x)
    return keras.Model(inputs, outputs)


def _batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = rng.integers(0, CLASSES, (n, SIZE, SIZE)).astype("int32")
    masks[0, :5] = IGNORE  # some ignored pixels in a labelled image
    masks[1, :, 7:] = IGNORE
    masks[n - 1] = IGNORE  # an unlabelled image
    return images, masks


def _compiled(model, lr=0.0):
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=losses.SparseKLDivergence(ignore_class=IGNORE),
        metrics=[metrics.MeanIoU(CLASSES, ignore_class=IGNORE)],
    )
    return model


# float64 references --------------------------------------------------------


def _resize_bilinear(x, size):
    """(B, h, w, C) -> (B, H, W, C), half-pixel centres, edges clamped."""
    x = np.asarray(x, "float64")

    def axis_weights(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    lo, hi, f = axis_weights(x.shape[1], size[0])
    x = x[:, lo] * (1 - f)[None, :, None, None] + x[:, hi] * f[None, :, None, None]
    lo, hi, f = axis_weights(x.shape[2], size[1])
    return (
        x[:, :, lo] * (1 - f)[None, None, :, None]
        + x[:, :, hi] * f[None, None, :, None]
    )


def _reference(teacher_logits, student_logits, masks, kl_type, temperature):
    """(task loss, KL term) in float64."""
    t, s = np.asarray(teacher_logits, "float64"), np.asarray(student_logits)
    s = _resize_bilinear(s, t.shape[1:3])
    labelled = masks != IGNORE
    lp = log_softmax64(s)
    picked = np.take_along_axis(lp, np.where(labelled, masks, 0)[..., None], -1)
    task = -picked[..., 0][labelled].mean()
    temp = temperature
    if kl_type == "pixel":
        lt, ls = log_softmax64(t / temp), log_softmax64(s / temp)
        kl = (np.exp(lt) * (lt - ls)).sum(-1).mean() * temp**2
        return task, kl
    values = []
    for b in range(t.shape[0]):
        keep = labelled[b] if labelled[b].any() else np.ones_like(labelled[b])
        for c in range(t.shape[-1]):
            lt = log_softmax64(t[b, ..., c][keep] / temp, axis=0)
            ls = log_softmax64(s[b, ..., c][keep] / temp, axis=0)
            values.append((np.exp(lt) * (lt - ls)).sum() * temp**2)
    return task, float(np.mean(values))


# The loss --------------------------------------------------------------------


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_loss_matches_float64_reference_with_a_strided_student(kl_type):
    teacher, student = _teacher(), _strided_student()
    images, masks = _batch()
    model = _compiled(DistillationModel(student, teacher, kl_type=kl_type))
    logs = model.evaluate(images, masks, batch_size=4, verbose=0, return_dict=True)
    task, kl = _reference(
        teacher.predict(images, verbose=0),
        student.predict(images, verbose=0),
        masks,
        kl_type,
        DEFAULT_TEMPERATURE[kl_type],
    )
    assert student.output.shape[1] == SIZE // 2
    np.testing.assert_allclose(logs["task_loss"], task, rtol=1e-4)
    np.testing.assert_allclose(logs["kl_loss"], kl, rtol=1e-4)
    np.testing.assert_allclose(logs["loss"], task + DEFAULT_KL_WEIGHT * kl, rtol=1e-4)
    assert kl > 1e-3
    # call() returns the student's logits at the input size.
    assert tuple(model.predict(images, verbose=0).shape) == (4, SIZE, SIZE, CLASSES)


def test_channel_term_leaves_out_ignored_pixels_of_labelled_images_only():
    teacher, student = _teacher(), _strided_student()
    images, masks = _batch()
    t = teacher.predict(images, verbose=0)
    s = student.predict(images, verbose=0)
    model = _compiled(
        DistillationModel(student, teacher, kl_type="channel", temperature=1.5)
    )
    logs = model.evaluate(images, masks, batch_size=4, verbose=0, return_dict=True)
    # Keeping every pixel gives another value: the ignored ones are left out.
    _, every_pixel = _reference(t, s, np.zeros_like(masks), "channel", 1.5)
    _, expected = _reference(t, s, masks, "channel", 1.5)
    np.testing.assert_allclose(logs["kl_loss"], expected, rtol=1e-4)
    assert abs(every_pixel - expected) > 1e-3


def test_logged_means_weight_batches_by_their_counts():
    """Batches of 2: the epoch means are over pixels (task, pixel KL) and
    over images (channel KL), not means of batch means."""
    teacher, student = _teacher(), _teacher(seed=3)
    images, masks = _batch(n=6, seed=1)
    masks[2:4] = IGNORE  # a batch without labels
    t = teacher.predict(images, verbose=0)
    s = student.predict(images, verbose=0)
    for kl_type in KL_TYPES:
        model = _compiled(DistillationModel(student, teacher, kl_type=kl_type))
        logs = model.evaluate(images, masks, batch_size=2, verbose=0, return_dict=True)
        task, kl = _reference(t, s, masks, kl_type, DEFAULT_TEMPERATURE[kl_type])
        np.testing.assert_allclose(logs["task_loss"], task, rtol=1e-4)
        np.testing.assert_allclose(logs["kl_loss"], kl, rtol=1e-4)


def test_training_moves_the_student_and_never_the_teacher():
    teacher, student = _teacher(), _teacher(seed=3)
    before_teacher = [w.copy() for w in teacher.get_weights()]
    before_student = [w.copy() for w in student.get_weights()]
    images, masks = _batch()
    model = _compiled(DistillationModel(student, teacher, kl_type="channel"), lr=0.1)
    model.fit(images, masks, batch_size=2, epochs=1, verbose=0)
    for a, b in zip(teacher.get_weights(), before_teacher):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.allclose(a, b) for a, b in zip(student.get_weights(), before_student)
    )
    assert not teacher.trainable_weights


def test_bad_arguments_are_refused():
    teacher = _teacher()
    with pytest.raises(InvalidArgumentError, match="teacher's classes"):
        DistillationModel(_teacher(num_classes=2), teacher)
    with pytest.raises(InvalidArgumentError, match="kl_type"):
        DistillationModel(_teacher(seed=3), teacher, kl_type="spatial")
    with pytest.raises(InvalidArgumentError, match="same model object"):
        DistillationModel(teacher, teacher)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        DistillationModel(_teacher(seed=3), teacher, temperature=0)
    probs = keras.Model(teacher.input, keras.layers.Softmax()(teacher.output))
    with pytest.raises(errors.ModelError, match="probabilities"):
        DistillationModel(_teacher(seed=3), probs)
    model = DistillationModel(_teacher(seed=3), teacher)
    with pytest.raises(InvalidArgumentError, match="images"):
        model({"images": _batch()[0], "source_images": _batch()[0]})


def test_defaults_agree_with_the_run_config():
    from klseg.runs import configs as config

    # One definition, in the registry: the model and the run config name it.
    assert KL_TYPES is config.DISTILL_KL_TYPES is registry.DISTILL_KL_TYPES
    assert DEFAULT_KL_WEIGHT is config.DISTILL_KL_WEIGHT is registry.DISTILL_KL_WEIGHT
    assert DEFAULT_TEMPERATURE is config.DISTILL_TEMPERATURE
    assert DEFAULT_TEMPERATURE is registry.DISTILL_TEMPERATURE
    assert default(config.DistillConfig, "kl_type") == DEFAULT_KL_TYPE
    assert default_temperature("channel") == DEFAULT_TEMPERATURE["channel"]


def default(cls, name):
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def test_config_round_trip_and_keras_file(tmp_path):
    teacher, student = _teacher(), _teacher(seed=3)
    model = _compiled(
        DistillationModel(
            student, teacher, kl_type="channel", kl_weight=0.5, temperature=3.0
        )
    )
    images, masks = _batch()
    logs = model.evaluate(images, masks, batch_size=4, verbose=0, return_dict=True)
    config = model.get_config()
    assert config["kl_type"] == "channel" and config["kl_weight"] == 0.5
    clone = DistillationModel.from_config(config)
    assert clone.temperature == 3.0 and clone.kl_type == "channel"
    path = tmp_path / "distill.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DistillationModel)
    assert loaded.kl_type == "channel" and not loaded.teacher.trainable_weights
    again = loaded.evaluate(images, masks, batch_size=4, verbose=0, return_dict=True)
    for key in ("loss", "task_loss", "kl_loss"):
        np.testing.assert_allclose(again[key], logs[key], rtol=1e-5)
    # klseg.load_model in a fresh process, where nothing imported klseg.distill.
    code = (
        "import sys, klseg; m = klseg.load_model(sys.argv[1]); "
        "print(type(m).__name__, m.kl_type)"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", NO_ALBUMENTATIONS_UPDATE="1")
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["DistillationModel", "channel"]


# Two replicas ---------------------------------------------------------------

REPLICA_SCRIPT = TWO_CPU_REPLICAS + textwrap.dedent(
    """
    import json

    import numpy as np

    import keras
    from klseg import losses, models
    from klseg.distill import DistillationModel

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (4, 16, 16)).astype("int32")
    # Replica 1 gets an unlabelled image and a mostly ignored one, replica 2
    # two labelled images, one with a few ignored pixels.
    masks[0] = 255
    masks[1, :12] = 255
    masks[3, :, 13:] = 255
    keras.utils.set_random_seed(1)
    teacher_weights = models.unet(3, base_filters=4, depth=2).get_weights()
    keras.utils.set_random_seed(2)
    student_weights = models.unet(3, base_filters=2, depth=2).get_weights()

    def run(strategy, kl_type):
        with strategy.scope():
            teacher = models.unet(3, base_filters=4, depth=2)
            teacher.set_weights(teacher_weights)
            student = models.unet(3, base_filters=2, depth=2)
            student.set_weights(student_weights)
            model = DistillationModel(
                student, teacher, kl_type=kl_type, student_bn="synchronized"
            )
            model.compile(
                optimizer=keras.optimizers.SGD(0.1),
                loss=losses.SparseKLDivergence(ignore_class=255),
            )
        # One global batch of 4: 2 images on each replica.
        logs = model.evaluate(images, masks, batch_size=4, verbose=0,
                              return_dict=True)
        model.fit(images, masks, batch_size=4, epochs=2, verbose=0,
                  shuffle=False)
        return {"logs": logs,
                "weights": [w.tolist() for w in student.get_weights()]}

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps({
        kl_type: {"mirrored": run(mirrored, kl_type),
                  "single": run(tf.distribute.get_strategy(), kl_type)}
        for kl_type in ("pixel", "channel")
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not TENSORFLOW, reason="tf.distribute needs TensorFlow")
def test_distribute_two_replicas_match_one_device(tmp_path):
    script = tmp_path / "replicas.py"
    script.write_text(REPLICA_SCRIPT)
    out = run_script(script, env={"KERAS_BACKEND": "tensorflow"})
    for kl_type, result in out.items():
        mirrored, single = result["mirrored"], result["single"]
        for key in ("loss", "task_loss", "kl_loss"):
            np.testing.assert_allclose(
                mirrored["logs"][key], single["logs"][key], rtol=1e-5, err_msg=kl_type
            )
        for a, b in zip(mirrored["weights"], single["weights"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# The job and the command ----------------------------------------------------

needs_tf = pytest.mark.skipif(not TENSORFLOW, reason="runs use tf.data")
RUN = ["--image-size", "32", "--batch-size", "4", "--quiet", "--augment", "light"]


BENCH = {"num_train": 4, "num_target_train": 1}


@pytest.fixture(scope="module")
def setup(bench, tmp_path_factory):
    """Tiny synthetic data and a saved teacher (6 classes, trained at 32)."""
    from klseg.data import synthetic

    root = tmp_path_factory.mktemp("distill")
    names = list(synthetic.CLASS_NAMES)
    teacher = tiny_unet(len(names), 0, base_filters=4, depth=2, class_names=names)
    models.set_training_size(teacher, 32)
    teacher.save(root / "teacher.keras")
    return root, bench


def distill_args(setup, output, *extra):
    root, bench = setup
    return [
        "distill",
        "--teacher",
        root / "teacher.keras",
        "--base-filters",
        "2",
        "--depth",
        "2",
        "--data",
        bench / "source" / "train",
        "--unlabeled-data",
        bench / "source" / "unlabeled",
        "--val-data",
        bench / "source" / "val",
        "--epochs",
        "2",
        "--output",
        output,
        *RUN,
        *extra,
    ]


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt


@pytest.mark.slow
@needs_tf
def test_distill_command_end_to_end_and_exact_resume(setup, tmp_path):
    from klseg.runs.configs import DistillConfig

    root, bench = setup
    out = tmp_path / "student"
    done = invoke(*distill_args(setup, out, "--kl-type", "channel"))
    assert done.exit_code == 0, done.output + repr(done.exception)
    found = json.loads((out / "metrics.json").read_text())
    for role in ("teacher", "student"):
        assert set(found[role]) == {
            "mean_iou",
            "pixel_accuracy",
            "parameters",
            "images_per_second",
        }
        assert found[role]["images_per_second"] > 0
    assert found["kl_type"] == "channel" and found["temperature"] == 4.0
    assert found["kl_weight"] == DEFAULT_KL_WEIGHT
    assert found["student"]["parameters"] < found["teacher"]["parameters"]
    # The teacher's score is an independent evaluation of the teacher file.
    evaluated = runs.evaluate(
        runs.EvaluateConfig(
            model=str(root / "teacher.keras"),
            data=str(bench / "source" / "val"),
            image_size=32,
        )
    )
    assert found["teacher"]["mean_iou"] == pytest.approx(evaluated["mean_iou"])
    assert found["student"]["mean_iou"] == pytest.approx(found["val"]["mean_iou"])
    student = keras.saving.load_model(out / "model.keras", compile=False)
    assert models.get_class_names(student) == list(
        json.loads((bench / "classes.json").read_text())["class_names"]
    )
    assert models.get_training_size(student) == (32, 32)
    report = (out / "report.md").read_text()
    assert "Teacher and student" in report and "images/s" in report

    # The same run interrupted after its first epoch, then resumed from the
    # command line, is the uninterrupted run.
    resumed = tmp_path / "resumed"
    cfg = DistillConfig(
        teacher=str(root / "teacher.keras"),
        base_filters=2,
        depth=2,
        data=str(bench / "source" / "train"),
        unlabeled_data=str(bench / "source" / "unlabeled"),
        val_data=str(bench / "source" / "val"),
        epochs=2,
        output=str(resumed),
        image_size=32,
        batch_size=4,
        kl_type="channel",
        verbose=0,
    )
    with pytest.raises(KeyboardInterrupt):
        runs.distill(cfg, callbacks=[InterruptAfterFirstEpoch()])
    assert not (resumed / "metrics.json").exists()
    done = invoke("distill", "--output", resumed, "--resume", "--quiet")
    assert done.exit_code == 0, done.output + repr(done.exception)
    again = keras.saving.load_model(resumed / "model.keras", compile=False)
    for a, b in zip(again.get_weights(), student.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert (resumed / "history.csv").read_text() == (out / "history.csv").read_text()


def test_distill_help_has_an_example_and_library_defaults():
    done = invoke("distill", "--help")
    assert done.exit_code == 0
    text = " ".join(done.output.split())
    assert "Example:" in text and "klseg distill --teacher" in text
    assert "[default: 1 for pixel, 4 for channel]" in text
    assert "[pixel|channel]" in text


def test_bad_options_exit_2_with_a_message(setup, tmp_path):
    out = tmp_path / "bad"
    done = invoke(*distill_args(setup, out, "--kl-type", "spatial"))
    assert done.exit_code == 2 and "spatial" in done.output
    done = invoke(*distill_args(setup, out, "--kl-weight", "-1"))
    assert done.exit_code == 2 and "--kl-weight" in done.output
    done = invoke(*distill_args(setup, out, "--model", "resnet"))
    assert done.exit_code == 2 and "model must be one of" in done.output
    done = invoke(*distill_args(setup, out, "--model", "keras-hub:"))
    assert done.exit_code == 2 and "names no KerasHub preset" in done.output
    assert not out.exists()
    # A class count that is not the teacher's is refused before any work.
    done = invoke(*distill_args(setup, out, "--num-classes", "3"))
    assert done.exit_code == 2, done.output
    assert "teacher" in done.output and "6 classes" in done.output
    assert not out.exists()
    done = invoke("distill", "--data", "d", "--val-data", "v", "--output", out)
    assert done.exit_code == 2 and "--teacher" in done.output


def test_missing_teacher_exits_1_without_traceback(setup, tmp_path):
    root, _ = setup
    args = distill_args(setup, tmp_path / "run")
    args[args.index(root / "teacher.keras")] = tmp_path / "nowhere.keras"
    done = invoke(*args)
    assert done.exit_code == 1
    assert "nowhere.keras" in done.output and "does not exist" in done.output
    assert "Traceback" not in done.output


@pytest.mark.slow
@needs_tf
def test_keras_hub_teacher_and_student(setup, tmp_path):
    """A ``keras-hub:DIR`` preset as teacher and as student, in one run."""
    pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    hub_segmenter().save_to_preset(str(tmp_path / "preset"))
    spec = f"keras-hub:{tmp_path / 'preset'}"
    out = tmp_path / "run"
    args = distill_args(setup, out, "--epochs", "1")
    args[args.index("--teacher") + 1] = spec
    done = invoke(*args, "--model", spec)
    assert done.exit_code == 0, done.output + repr(done.exception)
    found = json.loads((out / "metrics.json").read_text())
    assert found["student"]["parameters"] == found["teacher"]["parameters"]
    # The student is named as the teacher names its classes (this preset
    # has no names), not as the data does.
    student = runs.load_model(out / "model.keras")
    assert models.get_class_names(student) == [f"class_{i}" for i in range(6)]
    assert models.get_training_size(student) == (32, 32)
