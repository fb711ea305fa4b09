"""Epochs of a chosen length and validation every N epochs.

``steps_per_epoch`` fixes the optimizer steps of an epoch; ``val_every``
validates after every N-th epoch and after the last. The checkpoint is
written after every epoch, ``model.keras`` is the best validated epoch, the
history keeps one set of columns (empty cells where an epoch was not
validated), and an interrupted run resumed with these options is the
uninterrupted run.
"""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from test_resume import (
    Interrupt,
    assert_same_arrays,
    interrupted_then_resumed,
    last_checkpoint,
    metrics,
    npz,
    train_config,
    weights,
)

from klseg import errors, runs
from klseg.cli.main import cli
from klseg.data import synthetic

SIZE = 32


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    # 6 training images in batches of 4: one pass is 2 steps, so 3 steps per
    # epoch cross the end of a pass in the middle of an epoch.
    return synthetic.write_benchmark(
        tmp_path_factory.mktemp("data") / "bench",
        image_size=SIZE,
        num_train=6,
        num_val=4,
        num_unlabeled=2,
        num_target_train=3,
    )


def history(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def state(out, epoch):
    path = out / "checkpoints" / f"epoch_{epoch:04d}" / "state.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def reference(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    runs.train(train_config(bench, out, steps_per_epoch=3, val_every=2, epochs=3))
    return out


def test_steps_per_epoch_sets_the_optimizer_steps_of_an_epoch(reference):
    for epoch in (2, 3):
        saved = state(reference, epoch)
        assert saved["steps_per_epoch"] == 3
        assert saved["optimizer_iterations"] == 3 * epoch


def test_val_every_validates_the_chosen_epochs_and_the_last(reference):
    rows = history(reference / "history.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    val_columns = [k for k in rows[0] if k.startswith("val_")]
    assert sorted(val_columns) == ["val_loss", "val_mean_iou", "val_pixel_accuracy"]
    # Epoch 1 (row 0) was not validated: empty cells, not NaN; the training
    # columns are filled in every row.
    assert all(rows[0][k] == "" for k in val_columns)
    for row in rows[1:]:
        assert all(math.isfinite(float(row[k])) for k in val_columns)
    for row in rows:
        assert math.isfinite(float(row["loss"]))


def test_the_best_model_is_the_best_validated_epoch(reference):
    rows = history(reference / "history.csv")
    scores = {int(r["epoch"]) + 1: float(r["val_mean_iou"]) for r in rows[1:]}
    best_epoch = max(scores, key=scores.get)
    saved = state(reference, 3)
    assert saved["best_epoch"] == best_epoch
    assert saved["best"] == pytest.approx(scores[best_epoch], abs=1e-6)
    # model.keras is that epoch's model: scored again after the run, it gets
    # the validation mIoU logged for that epoch.
    result = json.loads((reference / "metrics.json").read_text())
    assert result["best_epoch"] == best_epoch
    assert result["val"]["mean_iou"] == pytest.approx(scores[best_epoch], abs=1e-6)


def _same_history(a, b):
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


@pytest.mark.parametrize(
    "epoch, step", [(1, None), (2, 2)], ids=["after-epoch-1", "inside-epoch-2"]
)
def test_resumed_run_with_these_options_is_the_uninterrupted_run(
    bench, reference, tmp_path, epoch, step
):
    out = tmp_path / "run"
    cfg = train_config(bench, out, steps_per_epoch=3, val_every=2, epochs=3)
    interrupted_then_resumed(runs.train, cfg, Interrupt(epoch=epoch, step=step))
    a, b = last_checkpoint(out), last_checkpoint(reference)
    assert a.name == b.name
    assert_same_arrays(
        weights(a / "model.weights.h5"), weights(b / "model.weights.h5"), "weights"
    )
    assert_same_arrays(
        npz(a / "optimizer.npz"), npz(b / "optimizer.npz"), "optimizer state"
    )
    _same_history(history(out / "history.csv"), history(reference / "history.csv"))
    assert metrics(out / "metrics.json") == metrics(reference / "metrics.json")


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"steps_per_epoch": 2}, "steps_per_epoch: saved 3, now 2"),
        ({"steps_per_epoch": None}, "steps_per_epoch: saved 3, now None"),
        ({"val_every": 1}, "val_every: saved 2, now 1"),
    ],
)
def test_resume_with_other_epoch_options_is_refused(
    bench, reference, tmp_path, change, shown
):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(reference, out)
    cfg = train_config(
        bench, out, steps_per_epoch=3, val_every=2, epochs=4, resume=True
    )
    with pytest.raises(errors.RunError, match=shown):
        runs.train(dataclasses.replace(cfg, **change))


def test_a_run_saved_before_these_options_resumes_with_their_defaults(
    bench, reference, tmp_path
):
    """A config.yaml without the keys reads as the defaults (None and 1)."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(reference, out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["steps_per_epoch"], saved["val_every"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = train_config(bench, out, resume=True)
    run, checkpoint = runs.folder.open_run(cfg, ignore=runs.configs.RESUMABLE_CHANGES)
    assert checkpoint[1]["epoch"] == 3
    refused = dataclasses.replace(cfg, val_every=2)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(errors.RunError, match="val_every: saved 1, now 2"):
        runs.folder.open_run(refused, ignore=runs.configs.RESUMABLE_CHANGES)


def test_finetune_takes_both_options(bench, reference, tmp_path):
    out = tmp_path / "finetune"
    runs.finetune(
        runs.FinetuneConfig(
            source=str(reference / "model.keras"),
            data=str(bench / "target" / "train"),
            val_data=str(bench / "target" / "val"),
            kl_weight=(0.5,),
            output=str(out),
            epochs=2,
            batch_size=2,
            image_size=SIZE,
            steps_per_epoch=1,
            val_every=5,
            verbose=0,
        )
    )
    assert state(out, 2)["optimizer_iterations"] == 2
    rows = history(out / "history.csv")
    assert rows[0]["val_target_mean_iou"] == ""
    assert math.isfinite(float(rows[1]["val_target_mean_iou"]))
    assert state(out, 2)["best_epoch"] == 2


# --------------------------------------------------------------------------
# bad values


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("steps_per_epoch", 0, "steps_per_epoch must be a positive integer"),
        ("steps_per_epoch", 2.5, "steps_per_epoch must be a positive integer"),
        ("val_every", 0, "val_every must be a positive integer"),
        ("val_every", None, "val_every must be a positive integer"),
    ],
)
def test_bad_values_in_the_config_name_the_field(tmp_path, field, value, expected):
    with pytest.raises(errors.InvalidArgumentError, match=expected) as info:
        runs.TrainConfig(data="d", val_data="v", output=str(tmp_path), **{field: value})
    assert f"Received: {field}={value!r}" in str(info.value)


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize(
    "option, value", [("--steps-per-epoch", "0"), ("--val-every", "-1")]
)
def test_bad_values_on_the_command_line_exit_2(tmp_path, command, option, value):
    result = CliRunner().invoke(
        cli, [command, "--output", str(tmp_path / "out"), option, value]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"'{option}'" in text and value in text
    assert not (tmp_path / "out").exists()


def test_a_bad_value_in_a_config_file_names_the_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  val_every: 0\n")
    result = CliRunner().invoke(
        cli, ["train", "--config", str(config), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "val_every" in text and "0" in text


def test_the_options_reach_the_config(monkeypatch, tmp_path):
    seen = {}

    def fake(cfg, **_):
        seen["cfg"] = cfg

    monkeypatch.setattr(runs, "train", fake)
    config = tmp_path / "run.toml"
    config.write_text("val_every = 4\n")
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            str(config),
            "--data",
            str(tmp_path / "d"),
            "--val-data",
            str(tmp_path / "v"),
            "--output",
            str(tmp_path / "out"),
            "--steps-per-epoch",
            "7",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen["cfg"].steps_per_epoch == 7
    assert seen["cfg"].val_every == 4
