"""Failures from below (the disk, the memory, the cluster, Keras' safe mode)
become klseg errors that say what happened, with no traceback and no
staging folder left behind.

- ``klseg export`` onto a full disk: TensorFlow's SaveV2 error is simulated
  by making Keras' SavedModel write raise it (no real full disk in CI).
- ``TF_CONFIG`` that is not JSON, has no cluster, or a task index past its
  list: exit 2 naming TF_CONFIG, before any work.
- ``--strategy multi-worker`` with a peer that never comes: the wait says
  what it waits for, gives up after ``KLSEG_WORKER_TIMEOUT`` and SIGTERM
  ends it with 143 (subprocesses on two free loopback ports).
- A ``.keras`` holding a Lambda layer or ``os.system``: the message says it
  holds Python code and how to load a trusted file.
- Running out of memory in ``predict`` and ``evaluate``: a klseg error that
  offers ``--tile-size`` (the forward pass is made to raise MemoryError).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
from helpers import SIZE, free_ports, invoke, ok, refused, tiny_unet, train_args
from PIL import Image

from klseg import errors
from klseg.runs import runtime

TINY_TRAIN = ["--image-size", SIZE, "--batch-size", 4, "--base-filters", 2]
TINY_TRAIN += ["--depth", 1, "--epochs", 1]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.keras"
    tiny_unet().save(path)
    return path


def _hidden(folder):
    """klseg's temporary (hidden) entries left in ``folder``, the marker and
    the lock aside."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.startswith(".") and not p.name.startswith(".klseg")
    )


# --------------------------------------------------------------------------
# 1. export onto a full disk
# --------------------------------------------------------------------------


def _files(folder):
    """``{relative path: bytes}`` of the files in ``folder`` but klseg's
    marker and lock."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".klseg")
    }


def _full_disk(monkeypatch):
    """The SavedModel write (``tf.saved_model.save``, under Keras' export)
    starts writing, then fails as SaveV2 does on a full disk."""
    import tensorflow as tf

    def save(obj, export_dir, *args, **kwargs):
        os.makedirs(os.path.join(export_dir, "variables"), exist_ok=True)
        partial = os.path.join(export_dir, "variables", "variables.data-00000")
        with open(partial, "wb") as f:
            f.write(b"\0" * 1024)
        raise tf.errors.ResourceExhaustedError(
            None,
            None,
            f"{export_dir}/variables/variables_temp/part-00000-of-00001.data-"
            "00000-of-00001.tempstate123; No space left on device",
        )

    monkeypatch.setattr(tf.saved_model, "save", save)


def test_export_onto_full_disk_keeps_earlier_export(tmp_path, model_file, monkeypatch):
    out = tmp_path / "exported"
    ok("export", "--model", model_file, "--output", out)
    before = _files(out)
    assert "saved_model.pb" in before

    _full_disk(monkeypatch)
    result = refused("export", "--model", model_file, "--output", out, "--overwrite")
    assert str(out) in result.output
    assert "disk is full" in result.output
    assert "No space left on device" in result.output
    assert _files(out) == before
    assert _hidden(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "model.keras"]


def test_export_onto_full_disk_leaves_no_new_folder(tmp_path, model_file, monkeypatch):
    _full_disk(monkeypatch)
    result = refused("export", "--model", model_file, "--output", tmp_path / "new")
    assert "disk is full" in result.output
    assert not (tmp_path / "new").exists()


def test_disk_full_and_out_of_memory_are_told_apart():
    import errno

    import tensorflow as tf

    enospc = OSError(errno.ENOSPC, "No space left on device", "x")
    no_space = tf.errors.ResourceExhaustedError(None, None, "No space left on device")
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    assert runtime.disk_full(enospc) and runtime.disk_full(no_space)
    assert not runtime.disk_full(oom) and not runtime.disk_full(MemoryError())
    assert runtime.out_of_memory(oom) and runtime.out_of_memory(MemoryError())
    assert not runtime.out_of_memory(no_space) and not runtime.out_of_memory(enospc)


# --------------------------------------------------------------------------
# 2. TF_CONFIG
# --------------------------------------------------------------------------

_CLUSTER = {"worker": ["localhost:1", "localhost:2"]}


@pytest.mark.parametrize(
    "tf_config, expected",
    [
        (json.dumps({"cluster": _CLUSTER, "task": {"type": "worker", "index": 2}}),
         "task index 2 is past the worker list (2 workers: indices 0..1)"),
        (json.dumps({"cluster": _CLUSTER, "task": {"type": "chief", "index": 0}}),
         "task type 'chief' is not in the cluster"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), 'has no "cluster"'),
        (json.dumps({"cluster": {"worker": ["localhost"]},
                     "task": {"type": "worker", "index": 0}}),
         "address 'localhost' is not host:port"),
        ('{"cluster": {"worker": [', "is not valid JSON"),
    ],
    ids=["index-past-list", "type-not-in-cluster", "no-cluster", "no-port", "json"],
)  # fmt: skip
def test_bad_tf_config_is_refused_before_any_work(
    tf_config, expected, monkeypatch, bench, tmp_path
):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(errors.InvalidArgumentError, match="TF_CONFIG") as info:
        runtime.make_strategy("multi-worker")
    assert expected in str(info.value)

    out = tmp_path / "run"
    args = [*train_args(bench, out), *TINY_TRAIN, "--strategy", "multi-worker"]
    result = refused(*args, code=2)
    assert "TF_CONFIG" in result.output and expected in result.output
    assert not out.exists()


def test_bad_worker_timeout_is_refused(monkeypatch):
    monkeypatch.setenv("KLSEG_WORKER_TIMEOUT", "soon")
    with pytest.raises(errors.InvalidArgumentError, match="KLSEG_WORKER_TIMEOUT"):
        runtime.worker_timeout()
    monkeypatch.delenv("KLSEG_WORKER_TIMEOUT")
    assert runtime.worker_timeout() == runtime.WORKER_TIMEOUT == 300


# --------------------------------------------------------------------------
# 3. a multi-worker peer that never comes (subprocesses)
# --------------------------------------------------------------------------


class _Worker:
    """``klseg train --strategy multi-worker`` as worker 0 of two on
    loopback, with no worker 1; its output collected line by line."""

    def __init__(self, bench, out, timeout):
        ports = free_ports(2)
        self.peer = f"localhost:{ports[1]}"
        tf_config = {
            "cluster": {"worker": [f"localhost:{ports[0]}", self.peer]},
            "task": {"type": "worker", "index": 0},
        }
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(tf_config),
            KLSEG_WORKER_TIMEOUT=str(timeout),
            NO_ALBUMENTATIONS_UPDATE="1",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        args = [*train_args(bench, out), *TINY_TRAIN, "--strategy", "multi-worker"]
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from klseg.cli.entry import main; main()"]
            + [str(a) for a in args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines = []
        self.waiting_since = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            if line.startswith("Waiting") and self.waiting_since is None:
                self.waiting_since = time.monotonic()
            self.lines.append(line)

    def wait_for_wait(self, timeout=60):
        deadline = time.monotonic() + timeout
        while self.waiting_since is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail("klseg never waited:\n" + "".join(self.lines))
            time.sleep(0.05)

    def finish(self, timeout):
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail("klseg did not end:\n" + "".join(self.lines))
        self._reader.join(10)
        return code, "".join(self.lines)


def test_absent_peer_times_out_with_a_message(bench, tmp_path):
    worker = _Worker(bench, tmp_path / "run", timeout=3)
    worker.wait_for_wait()
    code, output = worker.finish(timeout=20)
    waited = time.monotonic() - worker.waiting_since
    assert code == 1, output
    assert f"worker 1 at {worker.peer}" in output.split("Waiting")[1].splitlines()[0]
    assert "KLSEG_WORKER_TIMEOUT" in output
    assert f"gave up after 3 s waiting for worker 1 at {worker.peer}" in output
    assert "Traceback" not in output
    assert waited < 10, output
    assert not (tmp_path / "run").exists()


def test_sigterm_ends_the_wait_for_peers(bench, tmp_path):
    worker = _Worker(bench, tmp_path / "run", timeout=120)
    worker.wait_for_wait()
    worker.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, output = worker.finish(timeout=15)
    assert code == 143, output
    assert time.monotonic() - sent < 5, output
    assert "Terminated while waiting for the other workers." in output
    assert "Traceback" not in output


# --------------------------------------------------------------------------
# 4. a .keras holding Python code
# --------------------------------------------------------------------------


def _save_with_lambda(path, function, **kwargs):
    model = tiny_unet()
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Lambda(function, name="code", **kwargs)(model(inputs))
    keras.Model(inputs, outputs).save(path)


@pytest.mark.parametrize("kind", ["lambda", "os.system"])
def test_model_with_python_code_is_refused_saying_so(kind, tmp_path):
    import klseg

    path = tmp_path / "code.keras"
    if kind == "lambda":
        _save_with_lambda(path, lambda x: x * 2)
        what = "a Lambda layer 'code'"
    else:
        _save_with_lambda(path, os.system, output_shape=(None, None, 3))
        what = "a reference to builtins.system"
    with pytest.raises(errors.ModelError) as info:
        klseg.load_model(path)
    message = str(info.value)
    assert f"{path} contains Python code (a Lambda layer 'code'" in message
    assert what in message
    assert "klseg loads only safe models" in message
    assert "safe_mode=False" in message

    images = _images(tmp_path / "images", n=1)
    result = refused("predict", "--model", path, "--images", images, "--output",
                     tmp_path / "out")  # fmt: skip
    assert "contains Python code" in result.output
    assert "safe_mode=False" in result.output
    # A trusted file still loads, the user's own way.
    if kind == "lambda":
        assert klseg.load_model(path, safe_mode=False) is not None


# --------------------------------------------------------------------------
# 5. out of memory in predict and evaluate
# --------------------------------------------------------------------------


def _no_memory(monkeypatch):
    from klseg import models

    def forward(model, windows, *args, **kwargs):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(models, "predict_logits", forward)


def _images(folder, n=2, size=SIZE):
    folder.mkdir(parents=True)
    for i, image in enumerate(
        np.random.default_rng(0).integers(0, 256, (n, size, size, 3), "uint8")
    ):
        Image.fromarray(image).save(folder / f"img{i}.png")
    return folder


def test_predict_out_of_memory_offers_tile_size(tmp_path, model_file, monkeypatch):
    images = _images(tmp_path / "images")
    out = tmp_path / "out"
    ok("predict", "--model", model_file, "--images", images, "--output", out)
    masks = sorted(p.name for p in (out / "masks").iterdir())

    _no_memory(monkeypatch)
    result = refused(
        "predict", "--model", model_file, "--images", images, "--output", out,
        "--overwrite",
    )  # fmt: skip
    assert "out of memory predicting" in result.output
    assert "img0.png" in result.output and "--tile-size" in result.output
    assert _hidden(out) == []
    assert sorted(p.name for p in (out / "masks").iterdir()) == masks

    new = tmp_path / "new"
    result = refused("predict", "--model", model_file, "--images", images,
                     "--output", new, "--tile-size", 16)  # fmt: skip
    assert "smaller --tile-size than 16" in result.output
    assert not new.exists()


def test_evaluate_out_of_memory_offers_tile_size(tmp_path, model_file, monkeypatch):
    import importlib

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(
        importlib.import_module("klseg.runs.evaluate"), "evaluate_model", no_memory
    )
    data = tmp_path / "data"
    _images(data / "images")
    (data / "masks").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((SIZE, SIZE), "uint8")).save(
            data / "masks" / f"img{i}.png"
        )
    result = invoke("evaluate", "--model", model_file, "--data", data)
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert "out of memory evaluating" in result.output
    assert "--tile-size" in result.output
