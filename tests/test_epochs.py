"""Epochs of a chosen length and validation every N epochs.

``steps_per_epoch`` fixes the optimizer steps of an epoch; ``val_every``
validates after every N-th epoch and after the last. The checkpoint is
written after every epoch, ``model.keras`` is the best validated epoch, the
history keeps one set of columns (empty cells where an epoch was not
validated), and an interrupted run resumed with these options is the
uninterrupted run.
"""

import dataclasses
import json
import math

import pytest
import yaml
from helpers import (
    Interrupt,
    assert_same_run,
    finetune_config,
    history,
    interrupted_then_resumed,
    invoke,
)
from helpers import resume_train_config as train_config

from klseg import errors, runs

# 6 training images in batches of 4: one pass is 2 steps, so 3 steps per
# epoch cross the end of a pass in the middle of an epoch.
BENCH = {"num_train": 6, "num_unlabeled": 2, "num_target_train": 3}


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


@pytest.mark.parametrize(
    "epoch, step", [(1, None), (2, 2)], ids=["after-epoch-1", "inside-epoch-2"]
)
def test_resumed_run_with_these_options_is_the_uninterrupted_run(
    bench, reference, tmp_path, epoch, step
):
    out = tmp_path / "run"
    cfg = train_config(bench, out, steps_per_epoch=3, val_every=2, epochs=3)
    interrupted_then_resumed(runs.train, cfg, Interrupt(epoch=epoch, step=step))
    assert_same_run(out, reference, random_state=False)


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
        finetune_config(
            bench,
            reference / "model.keras",
            out,
            kl_weight=(0.5,),
            steps_per_epoch=1,
            val_every=5,
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
    result = invoke(command, "--output", tmp_path / "out", option, value)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"'{option}'" in text and value in text
    assert not (tmp_path / "out").exists()


def test_a_bad_value_in_a_config_file_names_the_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  val_every: 0\n")
    result = invoke("train", "--config", config, "--output", tmp_path / "out")
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
    result = invoke(
        "train", "--config", config, "--data", tmp_path / "d", "--val-data",
        tmp_path / "v", "--output", tmp_path / "out", "--steps-per-epoch", "7",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["cfg"].steps_per_epoch == 7
    assert seen["cfg"].val_every == 4
