"""The test kit: helpers shared by the test files.

Fixtures live in ``conftest.py``; these are plain functions, imported as
``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).

- tiny inputs and models: ``random_images``, ``tiny_unet``, ``hub_segmenter``;
- float64 NumPy references and comparisons: ``log_softmax64``,
  ``softmax64``, ``tempered_kl64``, ``kl64``, ``miou64``, ``predict64``,
  ``assert_config_round_trip``;
- the benchmark as a run sees it: ``train_config``, ``resume_train_config``,
  ``finetune_config``, ``train_args``, ``finetune_args``, ``predict_args``,
  ``read_folder``, ``history``, ``history_epochs``;
- what a run leaves, read independently of the run code: ``weights``,
  ``npz``, ``metrics``, ``last_checkpoint``, ``assert_same_arrays``,
  ``assert_same_history``, ``assert_same_run``;
- interrupting and resuming a run: ``Interrupt``, ``interrupted_then_resumed``;
- the command line: ``invoke``, ``ok``, ``refused``, ``readme_command``;
- a Python script in a fresh process: ``run_script``, ``TWO_CPU_REPLICAS``.
"""

import csv
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

__all__ = [
    "SIZE",
    "TWO_CPU_REPLICAS",
    "WEIGHTS_TOL",
    "Interrupt",
    "assert_config_round_trip",
    "assert_same_arrays",
    "assert_same_history",
    "assert_same_run",
    "interrupted_then_resumed",
    "last_checkpoint",
    "metrics",
    "npz",
    "weights",
    "adapt_config",
    "finetune_args",
    "finetune_config",
    "free_ports",
    "history",
    "hub_segmenter",
    "history_epochs",
    "invoke",
    "kl64",
    "log_softmax64",
    "miou64",
    "ok",
    "predict64",
    "predict_args",
    "random_images",
    "readme_command",
    "read_folder",
    "refused",
    "resume_train_config",
    "run_script",
    "softmax64",
    "tempered_kl64",
    "tiny_unet",
    "train_args",
    "train_config",
]

ROOT = Path(__file__).resolve().parents[1]
# Side of the benchmark images the run tests use (the ``bench`` fixture's).
SIZE = 32
# A resumed run's weights and optimizer state agree with the uninterrupted
# run's to this; measured: bit-identical on CPU.
WEIGHTS_TOL = 1e-6


# --------------------------------------------------------------------------
# tiny inputs and models
# --------------------------------------------------------------------------


def hub_segmenter(num_classes=None, activation=None):
    """A tiny KerasHub DeepLabV3 image segmenter (one ResNet block) for
    ``SIZE`` x ``SIZE`` images, with the synthetic benchmark's classes unless
    told; needs keras_hub."""
    import keras_hub

    from klseg.data import synthetic

    num_classes = synthetic.NUM_CLASSES if num_classes is None else num_classes

    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64],
        stackwise_num_blocks=[1],
        stackwise_num_strides=[1],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(None, None, 3),
    )
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P2",
        upsampling_size=4,
        dilation_rates=[1],
        projection_filters=8,
        image_shape=(None, None, 3),
    )
    converter = keras_hub.layers.DeepLabV3ImageConverter(
        image_size=(SIZE, SIZE), scale=1 / 255.0
    )
    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=backbone,
        num_classes=num_classes,
        activation=activation,
        preprocessor=keras_hub.models.DeepLabV3ImageSegmenterPreprocessor(
            image_converter=converter
        ),
    )


def random_images(n, seed, size):
    """``n`` random uint8 RGB images of ``size`` x ``size``."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), "uint8")


def tiny_unet(num_classes=3, seed=0, *, base_filters=2, depth=1, **kwargs):
    """A U-Net small enough to build in milliseconds, seeded."""
    from klseg import models

    keras.utils.set_random_seed(seed)
    return models.unet(num_classes, base_filters=base_filters, depth=depth, **kwargs)


# --------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------


def log_softmax64(z, axis=-1):
    z = np.asarray(z, "float64")
    z = z - z.max(axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis, keepdims=True))


def softmax64(logits):
    logits = np.asarray(logits, "float64")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def kl64(p, lp, lq):
    """sum_c p log(p / q) per pixel, 0 log 0 = 0."""
    has_mass = p > 0
    diff = np.where(has_mass, lp, 0.0) - np.where(has_mass, lq, 0.0)
    return np.where(has_mass, p * diff, 0.0).sum(-1)


def tempered_kl64(teacher_logits, student_logits, temperature):
    """T^2 * KL(softmax(t / T) || softmax(s / T)) per pixel."""
    lp = log_softmax64(np.asarray(teacher_logits, "float64") / temperature)
    lq = log_softmax64(np.asarray(student_logits, "float64") / temperature)
    return temperature**2 * (np.exp(lp) * (lp - lq)).sum(-1)


def assert_config_round_trip(obj, module):
    """``get_config``/``from_config`` and ``module.serialize``/``deserialize``
    (``keras.losses``, ``keras.metrics``) give back ``obj``'s class and config."""
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    restored = module.deserialize(module.serialize(obj))
    assert type(restored) is type(obj)
    assert restored.get_config() == config


def predict64(model, images):
    return np.asarray(model.predict_on_batch(images), "float64")


# --------------------------------------------------------------------------
# the benchmark (``bench`` fixture) as runs see it
# --------------------------------------------------------------------------


def _tiny_config(kind, domain, out, settings, changes):
    """``runs.<kind>`` on the ``train`` and ``val`` folders of ``domain``,
    quiet, at the benchmark's size; ``changes`` override ``settings``."""
    from klseg import runs

    folders = {"data": str(domain / "train"), "val_data": str(domain / "val")}
    common = {"output": str(out), "image_size": SIZE, "verbose": 0}
    return getattr(runs, kind)(**{**folders, **common, **settings, **changes})


def train_config(bench, out, **changes):
    """A tiny ``TrainConfig`` on the benchmark's source domain: one epoch of
    a 4-filter, depth-2 U-Net, batches of 4; ``changes`` override."""
    tiny = {"epochs": 1, "batch_size": 4, "base_filters": 4, "depth": 2}
    return _tiny_config("TrainConfig", bench / "source", out, tiny, changes)


def resume_train_config(bench, out, **changes):
    """The training run the resume tests interrupt: ``train_config`` for
    3 epochs with seed 3."""
    return train_config(bench, out, **{"epochs": 3, "seed": 3, **changes})


def distill_config(bench, teacher, out, **changes):
    """A tiny ``DistillConfig`` of the model file ``teacher`` into a 2-filter,
    depth-2 U-Net on the benchmark's source domain: two epochs in batches
    of 4; ``changes`` override."""
    tiny = {"teacher": str(teacher), "epochs": 2, "batch_size": 4}
    tiny.update(base_filters=2, depth=2)
    return _tiny_config("DistillConfig", bench / "source", out, tiny, changes)


def adapt_config(bench, source, out, **changes):
    """A tiny ``AdaptConfig``: self-training of the model file ``source`` on
    the benchmark's unlabelled target images with its labelled source
    training images, scored on the target's validation images, two steps an
    epoch; ``changes`` override."""
    from klseg import runs

    settings = {
        "source": str(source),
        "target_images": str(bench / "target" / "unlabeled"),
        "source_data": str(bench / "source" / "train"),
        "val_data": str(bench / "target" / "val"),
        "output": str(out),
        "image_size": SIZE,
        "steps_per_epoch": 2,
        "verbose": 0,
    }
    return runs.AdaptConfig(**{**settings, **changes})


def finetune_config(bench, source, out, **changes):
    """A tiny ``FinetuneConfig`` of the model file ``source`` on the
    benchmark's target domain: two epochs in batches of 2; ``changes``
    override."""
    tiny = {"source": str(source), "epochs": 2, "batch_size": 2}
    return _tiny_config("FinetuneConfig", bench / "target", out, tiny, changes)


def train_args(bench, output=None):
    """``klseg train`` on the benchmark's source domain."""
    args = ["train", "--data", bench / "source" / "train"]
    args += ["--val-data", bench / "source" / "val"]
    return args if output is None else [*args, "--output", output]


def finetune_args(bench, source, output=None):
    """``klseg finetune`` of the model ``source`` on the target domain."""
    args = ["finetune", "--source", source, "--data", bench / "target" / "train"]
    args += ["--val-data", bench / "target" / "val"]
    return args if output is None else [*args, "--output", output]


def predict_args(model, images, output):
    """``klseg predict`` of the model file ``model`` on the folder ``images``."""
    return ["predict", "--model", model, "--images", images, "--output", output]


def read_folder(folder):
    """Images (uint8) and masks (int64) of a labelled folder, read with PIL
    (not klseg), in stem order."""
    from PIL import Image

    paths = sorted((folder / "images").glob("*.png"))
    assert paths
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    masks = np.stack([np.asarray(Image.open(folder / "masks" / p.name)) for p in paths])
    return images, masks.astype("int64")


def miou64(labels, predicted, num_classes, ignore=255):
    """Mean IoU over the classes present in ``labels`` or ``predicted``
    (class indices), ignored pixels left out."""
    valid = labels != ignore
    confusion = np.bincount(
        labels[valid] * num_classes + predicted[valid], minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype("float64")
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float((tp[union > 0] / union[union > 0]).mean())


def history(path):
    """The rows of a ``history.csv``."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def history_columns(path):
    """``{column: values}`` of a ``history.csv`` (an empty cell is NaN)."""
    rows = history(path)
    return {k: np.array([float(r[k] or "nan") for r in rows]) for k in rows[0]}


def assert_history_close(path, reference, rtol=1e-5, atol=1e-6):
    """The ``history.csv`` at ``path`` has ``reference``'s columns and
    epochs, and its values within the tolerances of the distributed-vs-one-
    device tests (both cells empty also agree); returns its columns."""
    ours, theirs = history_columns(path), history_columns(reference)
    assert list(ours) == list(theirs)
    for key in theirs:
        np.testing.assert_allclose(
            ours[key], theirs[key], rtol=rtol, atol=atol, err_msg=f"{path}: {key}"
        )
    return ours


def history_epochs(path):
    """The epoch column of a ``history.csv``; none when there is no file."""
    if not path.is_file():
        return []
    return [int(row["epoch"]) for row in history(path)]


# --------------------------------------------------------------------------
# what a run leaves, read independently of the run code
# --------------------------------------------------------------------------


def weights(path):
    """Every array in a Keras weights file, by its path in the file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()])
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    return arrays


def npz(path):
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def metrics(path):
    """A ``metrics.json`` less its wall time, the one figure that cannot match."""
    values = json.loads(path.read_text())
    values.pop("seconds")
    return values


def last_checkpoint(out):
    return sorted((out / "checkpoints").glob("epoch_*"))[-1]


def assert_same_arrays(a, b, what):
    """Same keys (at least one), every array within ``WEIGHTS_TOL``."""
    assert a.keys() == b.keys(), what
    assert a, what
    for key in a:
        diff = np.max(np.abs(a[key].astype(np.float64) - b[key].astype(np.float64)))
        assert diff <= WEIGHTS_TOL, f"{what} {key}: differs by {diff}"


def assert_same_run(resumed, reference, *, random_state=True):
    """Same weights, optimizer state (and random state), history and
    metrics in the last checkpoints of two run folders."""
    a, b = last_checkpoint(resumed), last_checkpoint(reference)
    assert a.name == b.name
    assert_same_arrays(
        weights(a / "model.weights.h5"), weights(b / "model.weights.h5"), "weights"
    )
    assert_same_arrays(
        npz(a / "optimizer.npz"), npz(b / "optimizer.npz"), "optimizer state"
    )
    if random_state:
        ra, rb = npz(a / "random.npz"), npz(b / "random.npz")
        assert ra.keys() == rb.keys()
        for key in ra:
            np.testing.assert_array_equal(ra[key], rb[key])
    assert_same_history(
        history(resumed / "history.csv"), history(reference / "history.csv")
    )
    found, expected = (
        metrics(resumed / "metrics.json"),
        metrics(reference / "metrics.json"),
    )
    assert found == expected, {
        k: (found.get(k), expected.get(k))
        for k in found.keys() | expected.keys()
        if found.get(k) != expected.get(k)
    }


def assert_same_history(a, b):
    """Same epochs and columns; the same numbers, or both cells empty (an
    epoch that was not validated)."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            if row_b[key] == "":
                assert row_a[key] == "", key
                continue
            np.testing.assert_allclose(
                float(row_a[key]), float(row_b[key]), rtol=1e-6, atol=1e-7, err_msg=key
            )


# --------------------------------------------------------------------------
# interrupting and resuming a run
# --------------------------------------------------------------------------


class Interrupt(keras.callbacks.Callback):
    """Ctrl-C at the end of epoch ``epoch`` (1-based) or before its step
    ``step`` (1-based), once per process-wide ``fired`` list."""

    def __init__(self, epoch, step=None, fired=None):
        super().__init__()
        self.epoch, self.step = epoch, step
        self.fired = fired if fired is not None else []
        self.current = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch + 1

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is not None and self._due() and batch + 1 == self.step:
            self.fired.append(True)
            raise KeyboardInterrupt

    def on_epoch_end(self, epoch, logs=None):
        if self.step is None and self._due():
            self.fired.append(True)
            raise KeyboardInterrupt

    def _due(self):
        return not self.fired and self.current == self.epoch


def interrupted_then_resumed(run, cfg, interrupt, *, output=None):
    """``run(cfg)`` stopped by ``interrupt``, then resumed to its end; in the
    folder ``output`` instead of the config's when given."""
    if output is not None:
        cfg = dataclasses.replace(cfg, output=str(output))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, callbacks=[interrupt])
    assert interrupt.fired
    return run(dataclasses.replace(cfg, resume=True))


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def invoke(*args):
    """``klseg ARGS`` in a ``CliRunner``; arguments may be paths or numbers."""
    from click.testing import CliRunner

    from klseg.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    """``klseg ARGS``, which must exit 0."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(*args, code=1):
    """``klseg ARGS``, which must exit ``code`` without a traceback."""
    result = invoke(*args)
    assert result.exit_code == code, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result


def readme_command(flag):
    """The README command-line block's one command containing ``flag``, as
    the arguments after ``klseg``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\n\n```bash\n(.*?)```", text, re.S).group(1)
    commands = re.sub(r"\\\n\s*", " ", block).splitlines()
    found = [c.split("#")[0] for c in commands if flag in c]
    assert len(found) == 1, commands
    command = shlex.split(found[0])
    assert command[0] == "klseg"
    return command[1:]


# --------------------------------------------------------------------------
# a Python script in a fresh process
# --------------------------------------------------------------------------

# The opening of a script that runs on two logical CPU devices (the replicas
# of a tf.distribute strategy); it must come before keras is imported.
TWO_CPU_REPLICAS = textwrap.dedent(
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    """
)


def free_ports(n):
    """``n`` TCP ports free on the loopback interface now."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_script(script, *args, env=None, cwd=None, timeout=600):
    """``python SCRIPT ARGS`` with TensorFlow's logs quiet and ``env`` added;
    it must exit 0. Returns the JSON of its last line of output."""
    result = subprocess.run(
        [sys.executable, str(script), *(str(a) for a in args)],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
