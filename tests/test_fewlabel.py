"""``klseg finetune --consistency-weight``: the mean-teacher run end to end.

A tiny source model (32x32 images, a 2-level U-Net with 4 base filters) is
fine-tuned on 3 labelled and 5 unlabelled target images. Checked: the
options and their errors, the unlabelled stream beside the labelled one,
the history columns of the student and of the EMA teacher, that
``model.keras`` holds the EMA teacher's weights of the best epoch (read
back from the checkpoint, not from the run's own records), the
consistency-weight sweep, and exact resume of a run interrupted in the
middle of an epoch (EMA weights, step counter and the strong view's random
state included).
"""

import dataclasses
import inspect
import json
import math

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import (
    SIZE,
    Interrupt,
    assert_same_arrays,
    assert_same_history,
    finetune_args,
    finetune_config,
    history,
    interrupted_then_resumed,
    metrics,
    npz,
    ok,
    weights,
)

from klseg import errors, registry, runs
from klseg.cli.main import cli
from klseg.consistency import MIX_MODES, MeanTeacherModel
from klseg.finetune import clone_student
from klseg.runs import mean_teacher
from klseg.runs import sweep as sweep_job
from klseg.runs.configs import CONSISTENCY_MIX

BENCH = {"num_train": 6, "num_unlabeled": 5, "num_target_train": 3}


def config(bench, source, out, **changes):
    return finetune_config(
        bench,
        source,
        out,
        **{
            "unlabeled_data": str(bench / "target" / "unlabeled"),
            "source_val_data": str(bench / "source" / "val"),
            "source_images": str(bench / "source" / "unlabeled"),
            "kl_weight": (0.1,),
            "consistency_weight": (1.0,),
            "consistency_threshold": 0.5,
            "seed": 5,
            # The mechanics under the job's defaults (one pass over the data
            # per epoch, EMA 0.99); the CLI sweep below runs the mode's.
            "mode_defaults": False,
            **changes,
        },
    )


# --------------------------------------------------------------------------
# options


def test_defaults_are_the_library_defaults():
    params = inspect.signature(MeanTeacherModel.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(runs.FinetuneConfig)}
    # The job's defaults outside the few-label mode are the library's; in it,
    # the measured recipe (tests/test_cli.py).
    defaults = registry.FINETUNE_DEFAULTS
    assert defaults["ema_decay"] == params["ema_decay"].default
    assert defaults["consistency_rampup"] == params["consistency_rampup"].default
    assert fields["ema_decay"] is None and fields["consistency_rampup"] is None
    assert fields["consistency_threshold"] == params["consistency_threshold"].default
    assert fields["consistency_mix"] == params["mix"].default
    assert fields["consistency_weight"] is None  # off unless asked for
    assert CONSISTENCY_MIX is registry.MIX_MODES
    assert MIX_MODES is registry.MIX_MODES


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"consistency_weight": -1.0}, "consistency_weight must be a number >= 0"),
        ({"consistency_weight": [1, "x"]}, "consistency_weight must be a number"),
        ({"consistency_weight": []}, "consistency_weight must not be an empty"),
        ({"ema_decay": 1}, "ema_decay must be below 1 .*Received: ema_decay=1"),
        ({"ema_decay": -0.1}, "Received: ema_decay=-0.1"),
        ({"consistency_threshold": 1.5}, "Received: consistency_threshold=1.5"),
        ({"consistency_rampup": -1}, "consistency_rampup"),
        ({"consistency_mix": "mosaic"}, "consistency_mix.*'mosaic'"),
        (
            {"unlabeled_data": None},
            "consistency_weight > 0 needs unlabeled_data.*consistency_weight=0,1",
        ),
    ],
)
def test_bad_settings_name_the_field_and_the_value(changes, message):
    base = {
        "source": "s.keras",
        "data": "d",
        "val_data": "v",
        "output": "o",
        "unlabeled_data": "u",
        "consistency_weight": [0, 1],
    }
    with pytest.raises(errors.InvalidArgumentError, match=message):
        runs.FinetuneConfig(**{**base, **changes})


def test_the_note_names_both_scores_when_the_student_beat_the_teacher():
    last = {"epoch": 7, "student": {"target": 0.823}, "ema": {"target": 0.713}}
    note = mean_teacher.student_note(last)
    assert "epoch (7)" in note and "82.3" in note and "71.3" in note
    assert "--ema-decay" in note
    assert mean_teacher.student_note({**last, "ema": {"target": 0.9}}) is None
    assert mean_teacher.student_note({**last, "ema": {}}) is None
    assert mean_teacher.student_note(None) is None


def test_weight_zero_is_off_and_lists_make_a_sweep():
    cfg = runs.FinetuneConfig(
        source="s.keras", data="d", val_data="v", output="o", consistency_weight=0
    )
    assert not cfg.uses_consistency and not cfg.is_sweep  # no unlabeled_data needed
    assert mean_teacher.settings(cfg) is None
    grid = dataclasses.replace(
        cfg, kl_weight=(0.1, 0.3), consistency_weight=(0, 1), unlabeled_data="u"
    )
    assert grid.is_sweep and grid.uses_consistency
    varies = sweep_job._varies(grid)
    names = [
        sweep_job._weight_folder(k, c, varies) for k, c in sweep_job._settings(grid)
    ]
    assert names == ["kl_0.1_cons_0", "kl_0.1_cons_1", "kl_0.3_cons_0", "kl_0.3_cons_1"]
    assert sweep_job._label(0.3, 1.0, varies) == "w=0.3 c=1"
    only = dataclasses.replace(grid, kl_weight=(0.1,))
    assert sweep_job._weight_folder(0.1, 1.0, sweep_job._varies(only)) == "cons_1"


def test_help_and_bad_options():
    runner = CliRunner()
    text = runner.invoke(cli, ["finetune", "--help"], terminal_width=200).output
    for option in (
        "--consistency-weight",
        "--ema-decay",
        "--consistency-threshold",
        "--consistency-rampup",
        "--consistency-mix",
    ):
        assert option in text
    assert "[default: 0.99; 0<=x<1]" in text and "[default: 0.9; 0<=x<=1]" in text
    common = ["finetune", "--source", "s.keras", "--data", "d", "--val-data", "v"]
    common += ["--output", "o"]
    result = runner.invoke(cli, [*common, "--ema-decay", "1"])
    assert result.exit_code == 2 and "--ema-decay" in result.output
    result = runner.invoke(cli, [*common, "--consistency-weight", "1"])
    assert result.exit_code == 2
    assert "needs unlabeled_data" in result.output


def test_the_unlabelled_stream_joins_each_labelled_batch():
    import tensorflow as tf

    labelled = tf.data.Dataset.from_tensor_slices(
        (np.zeros((6, 4, 4, 3), "uint8"), np.zeros((6, 4, 4), "int32"))
    ).batch(2)
    unlabelled = tf.data.Dataset.from_tensor_slices(
        (np.arange(10 * 48, dtype="uint8").reshape(10, 4, 4, 3), np.zeros((10, 4, 4)))
    ).batch(2)
    batches = list(mean_teacher.with_unlabeled(labelled, unlabelled))
    assert len(batches) == 3  # the shorter stream ends the zip (runs repeat both)
    x, masks = batches[1]
    assert set(x) == {"images", "unlabeled_images"}
    assert x["unlabeled_images"].shape == (2, 4, 4, 3) and masks.shape == (2, 4, 4)
    np.testing.assert_array_equal(x["unlabeled_images"][0, 0, 0], [96, 97, 98])


# --------------------------------------------------------------------------
# a run from the command line: a consistency-weight sweep of 0 and 1


@pytest.fixture(scope="module")
def cli_sweep(bench, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    result = ok(
        *finetune_args(bench, source, out),
        "--unlabeled-data",
        bench / "target" / "unlabeled",
        "--source-val-data",
        bench / "source" / "val",
        "--source-images",
        bench / "source" / "unlabeled",
        "--kl-weight",
        "0.1",
        "--consistency-weight",
        "0,1",
        "--consistency-threshold",
        "0.5",
        # The few-label mode's other defaults (frozen BatchNorm, EMA 0.97,
        # ramp-up 100, Adam 3e-3); a run length short enough for a test.
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--image-size",
        SIZE,
        "--batch-size",
        "2",
    )
    return out, result.output


def test_the_sweep_writes_one_folder_per_consistency_weight(cli_sweep):
    out, output = cli_sweep
    top = json.loads((out / "metrics.json").read_text())
    assert set(top["runs"]) == {"cons_0", "cons_1"}
    assert top["runs"]["cons_1"]["saved_model"] == "ema_teacher"
    assert top["runs"]["cons_0"]["saved_model"] == "student"
    assert "setting  source mIoU  target mIoU" in output
    assert "[c=1](cons_1/report.md)" in (out / "report.md").read_text()
    assert (out / "tradeoff.png").stat().st_size > 1000
    # Weight 0 is plain KL fine-tuning: no teacher columns.
    plain = history(out / "cons_0" / "history.csv")
    assert "val_ema_target_mean_iou" not in plain[0]
    assert json.loads((out / "cons_0" / "metrics.json").read_text())["monitor"] == (
        "val_target_mean_iou"
    )


def test_the_consistency_run_records_both_models(cli_sweep):
    out, output = cli_sweep
    run = out / "cons_1"
    assert "feed the consistency term to the EMA teacher" in output
    rows = history(run / "history.csv")
    assert len(rows) == 2
    for column in (
        "consistency_loss",
        "teacher_confidence",
        "kl_loss",
        "val_target_mean_iou",
        "val_source_mean_iou",
        "val_ema_target_mean_iou",
        "val_ema_source_mean_iou",
        "val_ema_forgetting",
    ):
        values = [float(r[column]) for r in rows]
        assert all(math.isfinite(v) for v in values), column
    confidence = [float(r["teacher_confidence"]) for r in rows]
    assert all(1 / 6 <= c <= 1 for c in confidence)  # mean max prob, 6 classes
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["saved_model"] == "ema_teacher"
    assert metrics["monitor"] == "val_ema_target_mean_iou"
    assert metrics["consistency"] == {
        "weight": 1.0,
        "ema_decay": 0.97,
        "threshold": 0.5,
        "rampup": 100,
        "mix": "classmix",
    }
    # The mode's defaults were said once, for the whole sweep, and recorded.
    assert output.count("[defaults of the few-label mode: ") == 1
    assert (
        "[defaults of the few-label mode: student_bn=frozen, ema_decay=0.97, "
        "consistency_rampup=100, learning_rate=0.003; docs/finetune.md]" in output
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["student_bn"], saved["learning_rate"]) == ("frozen", 0.003)
    assert saved["kl_weight"] == [0.1] and saved["mode_defaults"] is True
    # The last epoch's scores of both models are the history's last row.
    last = metrics["last_epoch"]
    assert last["epoch"] == 2
    assert last["ema"]["target"] == pytest.approx(
        float(rows[-1]["val_ema_target_mean_iou"])
    )
    assert last["student"]["source"] == pytest.approx(
        float(rows[-1]["val_source_mean_iou"])
    )
    # The run says so when the student beat the saved teacher on the target.
    said = "Note: at the last validated epoch (2) the student scored" in output
    assert said == (last["student"]["target"] > last["ema"]["target"])
    # metrics.json's scores are model.keras's: the EMA teacher's best epoch.
    best = metrics["best_epoch"]
    ema_best = max(float(r["val_ema_target_mean_iou"]) for r in rows)
    assert float(rows[best - 1]["val_ema_target_mean_iou"]) == ema_best
    assert metrics["target"]["mean_iou"] == pytest.approx(ema_best, abs=1e-9)
    text = (run / "report.md").read_text()
    assert "## Student and EMA teacher" in text
    assert "EMA teacher, epoch" in text and "student, last epoch (2)" in text
    state = json.loads((run / "checkpoints" / "epoch_0002" / "state.json").read_text())
    assert state["steps_per_epoch"] == 3


def test_model_keras_is_the_ema_teacher_of_the_best_epoch(cli_sweep, source):
    run = cli_sweep[0] / "cons_1"
    metrics = json.loads((run / "metrics.json").read_text())
    saved = runs.load_model(run / "model.keras")
    # Rebuild the wrapper and read the best epoch's checkpoint into it.
    source_model = runs.load_model(source)
    wrapper = MeanTeacherModel(
        clone_student(source_model),
        source_model,
        kl_inputs="source",
        student_bn="frozen",  # the few-label mode's
        seed=1,
    )
    optimizer = keras.optimizers.Adam()
    optimizer.build(wrapper.trainable_variables)
    wrapper.optimizer = optimizer
    checkpoint = run / "checkpoints" / f"epoch_{metrics['best_epoch']:04d}"
    wrapper.load_weights(checkpoint / "model.weights.h5")
    assert int(wrapper.consistency_step.numpy()) == 3 * metrics["best_epoch"]
    saved_weights = saved.get_weights()
    ema = wrapper.ema_model.get_weights()
    assert len(saved_weights) == len(ema)
    for a, b in zip(saved_weights, ema):
        np.testing.assert_array_equal(a, b)
    student = wrapper.student.get_weights()
    assert max(np.max(np.abs(a - b)) for a, b in zip(saved_weights, student)) > 1e-4
    assert saved.name.endswith("_ema")


# --------------------------------------------------------------------------
# exact resume


def test_a_resumed_run_is_the_uninterrupted_run(bench, source, tmp_path):
    """Interrupted inside epoch 2, resumed: the same EMA and student weights,
    optimizer and random state, history and metrics."""
    reference = tmp_path / "reference"
    # Three streams (labelled, unlabelled, source images); scored on the
    # target domain only, to keep the test short.
    cfg = config(bench, source, reference, source_val_data=None)
    runs.finetune(cfg)
    out = tmp_path / "resumed"
    interrupted_then_resumed(runs.finetune, cfg, Interrupt(epoch=2, step=2), output=out)
    a = out / "checkpoints" / "epoch_0002"
    b = reference / "checkpoints" / "epoch_0002"
    weights_a = weights(a / "model.weights.h5")
    assert any(k.startswith("ema_model/") for k in weights_a)  # the teacher is in
    assert_same_arrays(weights_a, weights(b / "model.weights.h5"), "weights")
    for name in ("optimizer.npz", "random.npz"):
        assert_same_arrays(npz(a / name), npz(b / name), name)
    rows_a, rows_b = history(out / "history.csv"), history(reference / "history.csv")
    assert len(rows_a) == len(rows_b) == 2
    assert_same_history(rows_a, rows_b)
    assert metrics(out / "metrics.json") == metrics(reference / "metrics.json")
