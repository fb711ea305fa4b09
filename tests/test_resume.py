"""Exact resume: an interrupted run, resumed, is the run that was interrupted.

Each run kind (train; fine-tuning with live and with stored source
predictions, with unlabelled target images; a KL-weight sweep) runs once
uninterrupted, and again interrupted, after an epoch or in the middle of one,
then resumed. The resumed run must end with the same weights, optimizer
state, random state, ``history.csv`` and ``metrics.json`` (all but the wall
time) as the uninterrupted one. The reference is the uninterrupted run, not
a second reading of the same files.

Damaged checkpoints are detected and passed over for the one before them,
and the history rows past the checkpoint used are dropped, then written
again by the resumed epochs.
"""

import dataclasses
import json
import shutil

import h5py
import keras
import pytest
from helpers import (
    WEIGHTS_TOL,
    Interrupt,
    assert_same_run,
    history,
    interrupted_then_resumed,
    last_checkpoint,
    weights,
)
from helpers import finetune_config as tiny_finetune_config
from helpers import resume_train_config as train_config

from klseg import errors, runs

# 6 training images in batches of 4: epochs end in the middle of a pass
# over the data, so a resumed stream must continue inside a pass.
BENCH = {"num_train": 6, "num_unlabeled": 5, "num_target_train": 3}


# --------------------------------------------------------------------------
# train


@pytest.fixture(scope="module")
def reference_train(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "train_reference"
    runs.train(train_config(bench, out))
    return out


def test_checkpoints_keep_the_two_newest_epochs(reference_train):
    folders = sorted(p.name for p in (reference_train / "checkpoints").iterdir())
    assert folders == ["epoch_0002", "epoch_0003", "latest.json"]
    state = json.loads(
        (reference_train / "checkpoints" / "epoch_0003" / "state.json").read_text()
    )
    assert state["epoch"] == 3 and state["steps_per_epoch"] == 2
    assert state["optimizer_iterations"] == 6


@pytest.mark.parametrize(
    "epoch, step", [(1, None), (2, 2)], ids=["after-epoch-1", "inside-epoch-2"]
)
def test_resumed_train_run_is_the_uninterrupted_run(
    bench, reference_train, tmp_path, epoch, step
):
    out = tmp_path / "run"
    interrupted_then_resumed(
        runs.train, train_config(bench, out), Interrupt(epoch=epoch, step=step)
    )
    assert_same_run(out, reference_train)


def test_the_comparison_sees_a_difference_of_twice_the_tolerance(
    reference_train, tmp_path
):
    """The comparison can fail: one weight moved by 2e-6 is caught."""
    out = _copy(reference_train, tmp_path)
    path = last_checkpoint(out) / "model.weights.h5"
    with h5py.File(path, "r+") as f:
        name = next(k for k, v in weights(path).items() if v.ndim == 4)
        f[name][0, 0, 0, 0] += 2 * WEIGHTS_TOL
    with pytest.raises(AssertionError, match="weights"):
        assert_same_run(out, reference_train)


# --------------------------------------------------------------------------
# damaged checkpoints


def _copy(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def test_a_damaged_checkpoint_falls_back_to_the_one_before(
    bench, reference_train, tmp_path, capsys
):
    out = _copy(reference_train, tmp_path)
    weights_file = out / "checkpoints" / "epoch_0003" / "model.weights.h5"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    rows = []

    class Rows(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            rows.extend(r["epoch"] for r in history(out / "history.csv"))

    runs.train(train_config(bench, out, resume=True, verbose=1), callbacks=[Rows()])
    said = capsys.readouterr().out
    assert "Checkpoint epoch_0003: model.weights.h5 has 1000 bytes" in said
    assert "Resuming from epoch_0002 (epoch 2) instead." in said
    # The history row of epoch 3 (0-based 2) was dropped before training...
    assert rows == ["0", "1"]
    # ... and epoch 3 ran again from epoch 2's state: the same run.
    assert_same_run(out, reference_train)


@pytest.mark.parametrize(
    "damage",
    ["flip a byte of the optimizer state", "state.json unreadable", "no state.json"],
)
def test_every_kind_of_damage_is_detected(reference_train, tmp_path, damage):
    out = _copy(reference_train, tmp_path)
    folder = out / "checkpoints" / "epoch_0003"
    if damage.startswith("flip"):
        data = bytearray((folder / "optimizer.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "optimizer.npz").write_bytes(bytes(data))
    elif damage == "state.json unreadable":
        (folder / "state.json").write_text("{not json")
    else:
        (folder / "state.json").unlink()
    said = []
    folder_, state = runs.folder.RunFolder(out).latest_checkpoint(said.append)
    assert folder_.name == "epoch_0002" and state["epoch"] == 2
    assert len(said) == 1 and said[0].startswith("Checkpoint epoch_0003: ")


def test_no_usable_checkpoint_is_a_clear_error(bench, reference_train, tmp_path):
    out = _copy(reference_train, tmp_path)
    for folder in (out / "checkpoints").glob("epoch_*"):
        (folder / "state.json").write_text("[]")
    with pytest.raises(errors.RunError, match="no usable checkpoint in .*--overwrite"):
        runs.train(train_config(bench, out, resume=True))
    # Nothing was removed.
    assert len(list((out / "checkpoints").glob("epoch_*/model.weights.h5"))) == 2


# --------------------------------------------------------------------------
# fine-tuning and the sweep


def finetune_config(bench, source, out, **changes):
    return tiny_finetune_config(
        bench,
        source / "model.keras",
        out,
        **{
            "unlabeled_data": str(bench / "target" / "unlabeled"),
            "source_val_data": str(bench / "source" / "val"),
            "kl_inputs": "target",
            "kl_weight": (0.5,),
            "seed": 5,
            **changes,
        },
    )


@pytest.mark.parametrize("predictions", ["live", "stored"])
def test_resumed_finetune_is_the_uninterrupted_run(
    bench, reference_train, tmp_path, predictions
):
    """With unlabelled target images mixed into the batches."""
    reference = tmp_path / "reference"
    cfg = finetune_config(bench, reference_train, reference)
    cfg = dataclasses.replace(cfg, source_predictions=predictions)
    runs.finetune(cfg)
    out = tmp_path / "resumed"
    interrupted_then_resumed(runs.finetune, cfg, Interrupt(epoch=2, step=2), output=out)
    assert_same_run(out, reference)


def test_sweep_interrupted_inside_a_weight_is_the_uninterrupted_sweep(
    bench, reference_train, tmp_path
):
    cfg = finetune_config(
        bench,
        reference_train,
        tmp_path / "reference",
        kl_weight=(0.0, 0.5),
        kl_inputs="source",
        unlabeled_data=None,
        source_images=str(bench / "source" / "unlabeled"),
        epochs=2,
    )
    runs.finetune(cfg)
    out = tmp_path / "resumed"
    # Interrupted in the second weight's second epoch, at its second step.
    fired = []
    with pytest.raises(KeyboardInterrupt):
        runs.finetune(
            dataclasses.replace(cfg, output=str(out)),
            callbacks=[InterruptInSecondRun(fired)],
        )
    assert fired
    runs.finetune(dataclasses.replace(cfg, output=str(out), resume=True))
    for weight in ("kl_0", "kl_0.5"):
        assert_same_run(out / weight, tmp_path / "reference" / weight)
    top = json.loads((out / "metrics.json").read_text())
    ref = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert top["runs"] == ref["runs"]


class InterruptInSecondRun(keras.callbacks.Callback):
    """Ctrl-C in the second fit of the process, epoch 2, before step 2."""

    def __init__(self, fired):
        super().__init__()
        self.fired = fired
        self.fits = self.epoch = 0

    def on_train_begin(self, logs=None):
        self.fits += 1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_begin(self, batch, logs=None):
        if self.fits == 2 and self.epoch == 2 and batch == 1:
            self.fired.append(True)
            raise KeyboardInterrupt


def test_a_changed_monitor_is_refused_and_nothing_changes(
    bench, reference_train, tmp_path
):
    out = _copy(reference_train, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = train_config(bench, out, resume=True, epochs=4, monitor="val_loss")
    with pytest.raises(errors.RunError, match="monitor: saved 'auto', now 'val_loss'"):
        runs.train(cfg)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
