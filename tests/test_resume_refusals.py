"""What ``--resume`` refuses, and what it repairs.

A run folder that shows completed epochs but keeps no checkpoint is refused
(continuing would retrain from scratch over its results); a ``history.csv``
that does not match the checkpoint resumed from is rebuilt from the
checkpoint's record; a finished run continues with more epochs and says it
is done with the same; a run another command wrote is named as such; and a
``--monitor`` that names no column of the run is refused before the first
epoch.
"""

import csv
import json
import shutil

import pytest
from helpers import finetune_config, history, ok, refused
from helpers import resume_train_config as train_config

from klseg import errors, runs

BENCH = {"num_train": 6}


@pytest.fixture(scope="module")
def finished(bench, tmp_path_factory):
    """A finished 3-epoch training run."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    runs.train(train_config(bench, out))
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to damage."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _files(folder):
    """Every file under ``folder`` and its bytes (the lock file aside: it
    holds the PID of the last process that wrote the folder)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".klseg.lock"
    }


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# --------------------------------------------------------------------------
# no checkpoint to continue from


def test_completed_epochs_without_a_checkpoint_are_refused_unchanged(run):
    shutil.rmtree(run / "checkpoints")
    before = _files(run)
    result = refused("train", "-o", run, "--resume", "--epochs", "1")
    assert "holds no checkpoint to continue from" in result.output
    assert "--overwrite to start the run over" in result.output
    assert _files(run) == before


def test_the_refusal_is_a_run_error(bench, run):
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.json").unlink()
    (run / "model.keras").unlink()
    before = _files(run)
    # history.csv alone shows the completed epochs.
    with pytest.raises(errors.RunError, match="history.csv show completed epochs"):
        runs.train(train_config(bench, run, resume=True, epochs=1))
    assert _files(run) == before


# --------------------------------------------------------------------------
# history.csv against the checkpoint


def test_checkpoints_record_the_history_rows(finished):
    state = json.loads((finished / "checkpoints/epoch_0003/state.json").read_text())
    rows = _rows(finished / "history.csv")
    assert state["history"] == {"columns": rows[0], "rows": rows[1:]}
    state = json.loads((finished / "checkpoints/epoch_0002/state.json").read_text())
    assert state["history"]["rows"] == rows[1:3]


@pytest.mark.parametrize(
    "damage, why",
    [
        ("truncated", "a row has 2 of"),
        ("deleted", "it is missing"),
        ("row repeated", "its epochs are [0, 1, 1, 2]"),
    ],
)
def test_a_damaged_history_is_rebuilt_from_the_checkpoint(
    bench, finished, run, capsys, damage, why
):
    path = run / "history.csv"
    if damage == "truncated":
        text = path.read_text()
        path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + "2,0.5\n")
    elif damage == "deleted":
        path.unlink()
    else:
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join([*lines[:3], lines[2], *lines[3:]]))
    runs.train(train_config(bench, run, resume=True, epochs=4, verbose=1))
    said = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("Rebuilt")
    ]
    assert len(said) == 1 and said[0].endswith("): 3 epochs.")
    assert said[0].startswith(f"Rebuilt history.csv from epoch_0003 ({why}")
    rows = _rows(path)
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    assert all(len(r) == len(rows[0]) for r in rows)
    assert rows[:4] == _rows(finished / "history.csv")


def test_a_damaged_history_without_a_record_is_refused_unchanged(bench, run):
    for state_file in (run / "checkpoints").glob("epoch_*/state.json"):
        state = json.loads(state_file.read_text())
        del state["history"]  # as an older klseg wrote it
        state_file.write_text(json.dumps(state))
    (run / "history.csv").unlink()
    before = _files(run)
    with pytest.raises(errors.RunError, match="history.csv does not match epoch_0003"):
        runs.train(train_config(bench, run, resume=True, epochs=4))
    assert _files(run) == before


# --------------------------------------------------------------------------
# a finished run


def test_a_finished_run_resumed_with_more_epochs_continues(run):
    result = ok("train", "-o", run, "--resume", "--epochs", "4")
    assert f"Resuming {run} after epoch 3." in result.output
    assert [int(r["epoch"]) for r in history(run / "history.csv")] == [0, 1, 2, 3]
    state = json.loads((run / "checkpoints/epoch_0004/state.json").read_text())
    assert state["optimizer_iterations"] == 8
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 4


def test_a_finished_run_resumed_with_the_same_epochs_is_done(run):
    before = _files(run)
    result = ok("train", "-o", run, "--resume")
    assert "all 3 epochs are done; nothing to train" in result.output
    assert _files(run) == before


# --------------------------------------------------------------------------
# a run of another command


@pytest.fixture(scope="module")
def finetuned(bench, finished, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "finetuned"
    runs.finetune(finetune_config(bench, finished / "model.keras", out, epochs=1))
    return out


def test_a_finetune_run_is_not_resumed_by_train(finetuned):
    before = _files(finetuned)
    result = refused("train", "-o", finetuned, "--resume")
    assert f"{finetuned} holds a klseg finetune run, not a train run" in (
        " ".join(result.output.split())
    )
    assert "differences" not in result.output
    assert _files(finetuned) == before


def test_a_train_run_is_not_resumed_by_finetune(bench, finished, run):
    cfg = finetune_config(bench, finished / "model.keras", run, resume=True)
    with pytest.raises(errors.RunError, match="holds a klseg train run, not a "):
        runs.finetune(cfg)


# --------------------------------------------------------------------------
# --monitor


def test_an_unknown_monitor_exits_2_before_the_first_epoch(bench, finished, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", bench / "source" / "train"]
    args += ["--val-data", bench / "source" / "val", "-o", out]
    args += ["--image-size", "32", "--epochs", "1", "--monitor", "val_bogus"]
    result = refused(*args, code=2)
    said = " ".join(result.output.split())
    assert "--monitor" in said and "'val_bogus'" in said
    # The columns it lists are the columns a run of these settings writes.
    columns = _rows(finished / "history.csv")[0][1:]
    assert f"columns: {', '.join(sorted(columns))}." in said
    assert not (out / "history.csv").exists()
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("monitor", ["loss", "pixel_accuracy", "val_loss"])
def test_every_column_is_a_valid_monitor(bench, tmp_path, monitor):
    out = tmp_path / "run"
    runs.train(train_config(bench, out, epochs=1, monitor=monitor))
    assert json.loads((out / "metrics.json").read_text())["monitor"] == monitor
