"""Honest failure: a diverged run, a refused option and Ctrl-C.

- A NaN or infinite loss (or weights, or a validation loss) stops the run in
  the epoch where it appears, exits 1 naming the epoch and the step with a
  hint, and keeps the last good epoch: no checkpoint, history row or
  ``model.keras`` comes from the bad epoch.
- Non-finite numeric options exit 2 before anything is written.
- Ctrl-C at start-up, before the first epoch ends and after a checkpoint
  exits 130 with one ``Interrupted.`` line and no traceback; the ``--resume``
  command is suggested only when a checkpoint exists, and then it works.

The Ctrl-C tests run the installed ``klseg`` console script in a subprocess
and send it SIGINT; they wait for files and output lines, not fixed times,
except for the start-up moments.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import SIZE, history_epochs, invoke, train_args, train_config

import klseg
from klseg import errors, runs
from klseg.runs.checkpoint import restore_checkpoint

TINY_ARGS = ["--image-size", SIZE, "--batch-size", 4, "--base-filters", 4]
TINY_ARGS += ["--depth", 2]


def _latest(run):
    pointer = run / "checkpoints" / "latest.json"
    return json.loads(pointer.read_text())["checkpoint"] if pointer.is_file() else None


def _weights(model):
    return [keras.ops.convert_to_numpy(w.value) for w in model.weights]


# --------------------------------------------------------------------------
# NaN: a run that diverges after a good epoch (Python API)
# --------------------------------------------------------------------------


class Poison(keras.callbacks.Callback):
    """Make the weights NaN in epoch 2: before its first step (the loss of
    step 1 is NaN) or after its last step (the logged loss stays finite;
    only the weights and the validation show it)."""

    def __init__(self, when, steps=2):
        super().__init__()
        self.when, self.steps, self.epoch = when, steps, 0

    def _poison(self):
        weight = self.model.trainable_variables[0]
        weight.assign(keras.ops.full(weight.shape, float("nan"), weight.dtype))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if epoch == 1 and self.when == "first step":
            self._poison()

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == self.steps - 1 and self.when == "last step":
            self._poison()


class RecordEpoch1(keras.callbacks.Callback):
    """The weights of the model that epoch 1 ended with (the saved model's:
    the student's, for a fine-tuning run)."""

    def __init__(self, saved_model=None):
        super().__init__()
        self.saved_model = saved_model
        self.weights = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.weights = _weights(self.saved_model or self.model)


def _check_kept_epoch_1(out, diverged, recorded, step):
    """What a run that diverged in epoch 2 leaves behind."""
    assert diverged.epoch == 2 and diverged.step == step
    message = str(diverged)
    assert f"at epoch 2, step {step} of 2" in message
    assert "Lower --learning-rate" in message
    assert "--overwrite" in message and "(epoch 1)" in message
    assert _latest(out) == "epoch_0001"
    assert not (out / "checkpoints" / "epoch_0002").exists()
    assert history_epochs(out / "history.csv") == [0]
    assert not (out / "metrics.json").exists()
    model = klseg.load_model(out / "model.keras")
    saved = _weights(model)
    assert all(np.isfinite(w).all() for w in saved)
    assert len(saved) == len(recorded)
    for a, b in zip(saved, recorded):
        np.testing.assert_array_equal(a, b)
    return model


def _train_cfg(bench, out, **kwargs):
    return train_config(bench, out, epochs=3, **kwargs)


@pytest.fixture(scope="module")
def diverged_train(bench, tmp_path_factory):
    """Two training runs that diverge in epoch 2, one per poisoning moment."""
    outcomes = {}
    for when in ("first step", "last step"):
        out = tmp_path_factory.mktemp("runs") / when.replace(" ", "_")
        recorder = RecordEpoch1()
        with pytest.raises(errors.TrainingDiverged) as info:
            runs.train(_train_cfg(bench, out), callbacks=[Poison(when), recorder])
        outcomes[when] = out, info.value, recorder.weights
    return outcomes


@pytest.mark.parametrize("when, step", [("first step", 1), ("last step", 2)])
def test_train_divergence_keeps_the_good_epoch(diverged_train, when, step):
    out, diverged, recorded = diverged_train[when]
    model = _check_kept_epoch_1(out, diverged, recorded, step)
    if when == "last step":
        assert "(after the last step)" in str(diverged)
    # The checkpoint of epoch 1 holds the same weights as model.keras.
    restore_checkpoint(out / "checkpoints" / "epoch_0001", model, model.optimizer)
    for a, b in zip(_weights(model), recorded):
        np.testing.assert_array_equal(a, b)


def test_finetune_divergence_keeps_the_good_epoch(bench, diverged_train, tmp_path):
    source = diverged_train["first step"][0] / "model.keras"
    student = {}

    class Recorder(RecordEpoch1):
        def on_train_begin(self, logs=None):
            self.saved_model = self.model.student
            student["model"] = self.model.student

    recorder = Recorder()
    out = tmp_path / "ft"
    cfg = runs.FinetuneConfig(
        source=str(source),
        data=str(bench / "target" / "train"),
        val_data=str(bench / "target" / "val"),
        source_val_data=str(bench / "source" / "val"),
        output=str(out),
        kl_weight=0.3,
        epochs=3,
        verbose=0,
        image_size=SIZE,
        batch_size=2,
    )
    with pytest.raises(errors.TrainingDiverged) as info:
        runs.finetune(cfg, callbacks=[Poison("last step"), recorder])
    _check_kept_epoch_1(out, info.value, recorder.weights, 2)


# --------------------------------------------------------------------------
# NaN from the command line: divergence in the first epoch
# --------------------------------------------------------------------------


def test_divergence_in_the_first_epoch_saves_nothing(bench, tmp_path):
    """float16 at a learning rate of 10 overflows in the first epoch; the
    loss of its steps stays finite, the validation loss does not."""
    out = tmp_path / "run"
    result = invoke(
        *train_args(bench, out),
        *TINY_ARGS,
        "--epochs",
        2,
        "--learning-rate",
        10,
        "--mixed-precision",
        "float16",
        "--quiet",
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert re.search(r"diverged: .* at epoch 1, step \d of 2", result.output)
    assert "Lower --learning-rate (it was 10)" in result.output
    assert "without --mixed-precision" in result.output
    assert "nothing to --resume" in result.output
    assert not (out / "model.keras").exists()
    assert _latest(out) is None
    assert history_epochs(out / "history.csv") == []
    assert not (out / "metrics.json").exists()


# --------------------------------------------------------------------------
# Non-finite options
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, option, value",
    [
        ("train", "--learning-rate", "nan"),
        ("train", "--learning-rate", "inf"),
        ("finetune", "--learning-rate", "nan"),
        ("finetune", "--learning-rate", "inf"),
        ("finetune", "--temperature", "inf"),
        ("finetune", "--kl-weight", "nan"),
        ("finetune", "--kl-weight", "0,inf"),
    ],
)
def test_non_finite_options_exit_2(bench, tmp_path, command, option, value):
    args = [command, "--data", bench / "target" / "train"]
    args += ["--val-data", bench / "target" / "val", "--output", tmp_path / "o"]
    if command == "finetune":
        args += ["--source", tmp_path / "missing.keras"]
    result = invoke(*args, option, value)
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------
# Ctrl-C (subprocesses)
# --------------------------------------------------------------------------

_SCRIPT = Path(sys.executable).with_name("klseg")


class Klseg:
    """``klseg ARGS`` in a subprocess, its output collected line by line."""

    def __init__(self, *args, cwd):
        command = (
            [str(_SCRIPT)]
            if _SCRIPT.is_file()
            else [
                sys.executable,
                "-c",
                "from klseg.cli.entry import main; main()",
            ]
        )
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", TF_CPP_MIN_LOG_LEVEL="2")
        env["PYTHONFAULTHANDLER"] = "1"  # a crash prints where it happened
        self.process = subprocess.Popen(
            [*command, *(str(a) for a in args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, condition, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail("klseg ended early:\n" + "".join(self.lines))
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail("klseg never got there:\n" + "".join(self.lines))
            time.sleep(0.05)

    def interrupt(self):
        self.process.send_signal(signal.SIGINT)

    def finish(self, timeout=120):
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self._reader.join(10)
        return code, "".join(self.lines)


def _train_args(bench, out, epochs):
    return [
        *train_args(bench, out),
        *TINY_ARGS,
        "--epochs",
        epochs,
    ]


def _check_interrupted(code, output):
    assert code == 130, output
    assert output.count("Interrupted") == 1, output
    assert "\nInterrupted." in output
    assert "Traceback" not in output and "Exception ignored" not in output
    assert "Aborted" not in output


def _startup_seconds():
    """How long this interpreter takes to start (the time before any klseg
    code can run, which a loaded machine stretches)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.monotonic() - started


@pytest.mark.parametrize("delay", [0.3, 1.5, 3.0])
def test_ctrl_c_during_start_up(bench, tmp_path, delay):
    """At 0.3 s klseg is importing its command layer, at 1.5 s and 3 s
    TensorFlow (where a Ctrl-C used to be swallowed by a garbage-collection
    callback)."""
    delay = max(delay, 2 * _startup_seconds())
    out = tmp_path / "run"
    klseg_run = Klseg(*_train_args(bench, out, 2), cwd=tmp_path)
    time.sleep(delay)
    klseg_run.interrupt()
    code, output = klseg_run.finish()
    _check_interrupted(code, output)
    assert "Continue it with" not in output
    assert "nothing to --resume" in output
    assert not (out / "model.keras").exists()


def test_ctrl_c_before_the_first_epoch_ends(bench, tmp_path):
    out = tmp_path / "run"
    klseg_run = Klseg(*_train_args(bench, out, 2), cwd=tmp_path)
    klseg_run.wait_for(lambda: any("Training unet" in s for s in klseg_run.lines))
    klseg_run.interrupt()
    code, output = klseg_run.finish()
    _check_interrupted(code, output)
    # The signal arrives while the first steps compile: no epoch is done.
    assert _latest(out) is None
    assert "nothing to --resume" in output and "Continue it with" not in output
    assert not (out / "model.keras").exists()
    assert history_epochs(out / "history.csv") == []


def test_ctrl_c_after_a_checkpoint_suggests_a_resume_that_works(bench, tmp_path):
    out = tmp_path / "run"
    epochs = 4
    klseg_run = Klseg(*_train_args(bench, out, epochs), "--quiet", cwd=tmp_path)
    klseg_run.wait_for(lambda: _latest(out) is not None)
    klseg_run.interrupt()
    code, output = klseg_run.finish()
    _check_interrupted(code, output)
    done = json.loads((out / "checkpoints" / _latest(out) / "state.json").read_text())[
        "epoch"
    ]
    assert 1 <= done < epochs
    # Every completed epoch has its history row and nothing more.
    assert history_epochs(out / "history.csv") == list(range(done))
    assert not (out / "metrics.json").exists()
    hint = re.search(r"Continue it with: (klseg .*--resume)$", output, re.M)
    assert hint, output
    assert hint.group(1) == f"klseg train --output {shlex.quote(str(out))} --resume"
    resumed = Klseg(*shlex.split(hint.group(1))[1:], "--quiet", cwd=tmp_path)
    code, output = resumed.finish()
    assert code == 0, output
    assert history_epochs(out / "history.csv") == list(range(epochs))
    assert json.loads((out / "metrics.json").read_text())["epochs"] == epochs


def _ctrl_c():
    """A Ctrl-C to this process, in-process."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs at the next bytecode


def test_a_ctrl_c_inside_fit_waits_for_the_batch_end():
    """Inside ``model.fit`` a Ctrl-C only sets the flag; the training loop's
    callback raises it (never TensorFlow's half-done native work), and the
    block still ends with it; a Ctrl-C outside raises at once."""
    from klseg.runs import callbacks, runtime

    with pytest.raises(KeyboardInterrupt):
        with runtime.interrupt_handler():
            with runtime.interrupts_at_batch_ends():
                _ctrl_c()
                assert runtime.was_interrupted()
                with pytest.raises(KeyboardInterrupt):
                    callbacks.StopOnInterrupt().on_train_batch_end(0)
                reached_the_end = True
    assert reached_the_end
    with pytest.raises(KeyboardInterrupt):
        with runtime.interrupt_handler():
            _ctrl_c()
            pytest.fail("the Ctrl-C did not raise")


def test_a_caught_ctrl_c_ends_with_its_handler():
    """An error raised once a Ctrl-C was caught leaves as the interrupt, and
    the flag ends with the handler: the next run of the same process (a
    second command in one Python session) trains instead of stopping at its
    first batch."""
    from klseg.runs import callbacks, runtime

    with pytest.raises(KeyboardInterrupt):
        with runtime.interrupt_handler():
            with runtime.interrupts_at_batch_ends():
                _ctrl_c()
                raise ValueError("an import the Ctrl-C broke")
    assert not runtime.was_interrupted()
    with runtime.interrupts_at_batch_ends():
        callbacks.StopOnInterrupt().on_train_batch_end(0)
    with pytest.raises(ValueError):
        with runtime.interrupt_handler():
            raise ValueError("not an interrupt")
