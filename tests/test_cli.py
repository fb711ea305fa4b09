"""The command layer: help, option parsing, config files, exit codes.

These tests replace the jobs in ``klseg.runs`` with recorders, so they check
what each command hands to its job without training anything. The jobs
themselves are tested in test_runs.py.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from klseg import errors, runs
from klseg.cli.main import cli

COMMANDS = [
    ["train"],
    ["finetune"],
    ["distill"],
    ["evaluate"],
    ["predict"],
    ["export"],
    ["data"],
    ["data", "synth"],
    ["demo"],
]


@pytest.fixture
def recorded(monkeypatch):
    """Replace every job with a recorder of the config it was given."""
    calls = {}

    def recorder(name):
        def job(cfg, **kwargs):
            calls[name] = cfg
            return None

        return job

    for name in ("train", "finetune", "predict", "export", "synth_data", "demo"):
        monkeypatch.setattr(runs, name, recorder(name))

    def fake_evaluate(cfg):
        calls["evaluate"] = cfg
        return {
            "model": str(cfg.model),
            "data": str(cfg.data),
            "image_size": 32,
            "num_images": 2,
            "mean_iou": 0.5,
            "pixel_accuracy": 0.75,
            "per_class_iou": {"a": 0.5, "b": None},
        }

    monkeypatch.setattr(runs, "evaluate", fake_evaluate)
    return calls


TRAIN_ARGS = ["train", "--data", "d/train", "--val-data", "d/val", "--output", "o"]
FINETUNE_ARGS = ["finetune", "--source", "m", "--data", "t", "--val-data", "v"]
FINETUNE_ARGS += ["-o", "o"]


# --------------------------------------------------------------------------
# help and start-up
# --------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(runner, command):
    result = runner.invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    assert "--help" in result.output


def test_help_states_the_library_defaults(runner):
    import klseg.finetune

    text = " ".join(runner.invoke(cli, ["finetune", "--help"]).output.split())
    from klseg.registry import FINETUNE_RECIPES

    few = FINETUNE_RECIPES["few-label"]
    assert (
        f"[default: {klseg.finetune.DEFAULT_KL_WEIGHT:g}; "
        f"{few['kl_weight']:g} in the few-label mode]" in text
    )
    assert f"[default: {klseg.finetune.DEFAULT_TEMPERATURE:g}]" in text
    # The few-label mode's recipe, as options, in --consistency-weight's help.
    assert f"--ema-decay {few['ema_decay']:g}" in text.replace("- ", "-")


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert "klseg" in result.output


def test_help_does_not_import_tensorflow_or_keras():
    code = textwrap.dedent(
        """
        import sys
        from click.testing import CliRunner
        from klseg.cli.main import cli
        for args in (["--help"], ["train", "--help"], ["finetune", "--help"],
                     ["demo", "--help"], ["data", "synth", "--help"]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
        heavy = [m for m in ("tensorflow", "keras", "jax", "matplotlib")
                 if m in sys.modules]
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "HEAVY []" in out


# --------------------------------------------------------------------------
# options reach the jobs
# --------------------------------------------------------------------------


def test_train_options_reach_the_config(runner, recorded):
    result = runner.invoke(
        cli,
        [
            *TRAIN_ARGS,
            "--epochs",
            "3",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--model",
            "unet",
            "--base-filters",
            "8",
            "--seed",
            "7",
            "--mixed-precision",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    cfg = recorded["train"]
    assert isinstance(cfg, runs.TrainConfig)
    assert (cfg.data, cfg.val_data, cfg.output) == ("d/train", "d/val", "o")
    assert (cfg.epochs, cfg.batch_size, cfg.image_size) == (3, 2, 32)
    assert (cfg.base_filters, cfg.seed) == (8, 7)
    assert cfg.mixed_precision == "auto"  # a bare flag
    assert cfg.verbose == 0
    assert cfg.strategy == "default" and cfg.jit is False


def test_mixed_precision_takes_a_value(runner, recorded):
    result = runner.invoke(cli, [*TRAIN_ARGS, "--mixed-precision", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert recorded["train"].mixed_precision == "bfloat16"


def test_kl_weight_list(runner, recorded):
    args = ["finetune", "--source", "m.keras", "--data", "t", "--val-data", "v"]
    result = runner.invoke(cli, [*args, "--output", "o", "--kl-weight", "0,0.1,0.3,1"])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert cfg.kl_weight == (0.0, 0.1, 0.3, 1.0)
    assert cfg.is_sweep


def test_evaluate_json_output(runner, recorded):
    result = runner.invoke(
        cli, ["evaluate", "--model", "m.keras", "--data", "v", "--json"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["mean_iou"] == 0.5
    result = runner.invoke(cli, ["evaluate", "--model", "m.keras", "--data", "v"])
    assert result.exit_code == 0
    assert "mean IoU:       50.0" in result.output
    assert "absent" in result.output


def test_other_commands_reach_their_jobs(runner, recorded):
    assert (
        runner.invoke(
            cli, ["predict", "--model", "m", "--images", "i", "-o", "p"]
        ).exit_code
        == 0
    )
    assert recorded["predict"].overlay is True
    assert runner.invoke(cli, ["export", "--model", "m", "-o", "e"]).exit_code == 0
    assert recorded["export"].output == "e"
    assert (
        runner.invoke(cli, ["data", "synth", "-o", "s", "--num-train", "4"]).exit_code
        == 0
    )
    assert recorded["synth_data"].num_train == 4
    assert runner.invoke(cli, ["demo", "--quick", "-o", "x"]).exit_code == 0
    assert recorded["demo"].quick is True


# --------------------------------------------------------------------------
# bad options exit 2
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [*TRAIN_ARGS, "--epochs", "0"],
        [*TRAIN_ARGS, "--model", "resnet"],
        [*TRAIN_ARGS, "--strategy", "tpu"],
        [*TRAIN_ARGS, "--mixed-precision", "float8"],
        [*TRAIN_ARGS, "--jit", "--strategy", "mirrored"],
        [*TRAIN_ARGS, "--jit", "--strategy", "multi-worker"],
        [*TRAIN_ARGS, "--resume", "--overwrite"],
        ["train", "--data", "d"],  # missing --val-data and --output
        [*FINETUNE_ARGS, "--kl-weight", "-1"],
        [*FINETUNE_ARGS, "--kl-weight", "0,,1"],
        [*FINETUNE_ARGS, "--kl-inputs", "source"],  # needs --source-images
        ["evaluate", "--model", "m"],
        ["predict", "--model", "m", "--images", "i"],
        ["train", "--no-such-option"],
    ],
    ids=lambda a: " ".join(a[-2:]),
)
def test_bad_options_exit_2(runner, recorded, args):
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not recorded  # no job started


def test_jit_with_mirrored_says_why(runner, recorded):
    result = runner.invoke(cli, [*TRAIN_ARGS, "--jit", "--strategy", "mirrored"])
    assert result.exit_code == 2
    assert "jit" in result.output and "mirrored" in result.output


# --------------------------------------------------------------------------
# errors of the jobs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.DataError("mask m.png: value 9 is not a class"), 1),
        (errors.ModelError("model m.keras has 3 classes"), 1),
        (errors.RunError("cannot write to output folder o"), 1),
        (errors.InvalidArgumentError("image_size must be a multiple of 16"), 2),
        (PermissionError(13, "Permission denied", "o/x"), 1),
    ],
)
def test_job_errors_map_to_exit_codes(runner, monkeypatch, error, code):
    def failing(cfg, **kwargs):
        raise error

    monkeypatch.setattr(runs, "train", failing)
    result = runner.invoke(cli, TRAIN_ARGS)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert "Error" in result.output
    assert (str(error.args[-1]) if isinstance(error, OSError) else str(error)) in (
        result.output
    )


def test_interrupt_exits_130_with_a_resume_hint(runner, monkeypatch):
    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", interrupted)
    result = runner.invoke(cli, TRAIN_ARGS)
    assert result.exit_code == 130
    assert "--resume" in result.output


# --------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------


def test_yaml_config_with_command_line_overrides(runner, recorded, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            """
            seed: 3
            epochs: 5
            batch-size: 4
            image_size: 64
            source: ignored-by-train.keras   # an option of another command
            train:
              image_size: 32
              data: from/file
              val_data: from/file/val
              output: out/file
            finetune:
              kl_weight: [0, 0.5]
            """
        )
    )
    result = runner.invoke(cli, ["train", "--config", str(config), "--epochs", "7"])
    assert result.exit_code == 0, result.output
    cfg = recorded["train"]
    assert cfg.epochs == 7  # command line over file
    assert cfg.batch_size == 4 and cfg.seed == 3  # file over default
    assert cfg.image_size == 32  # the command's section over the top level
    assert (cfg.data, cfg.val_data, cfg.output) == (
        "from/file",
        "from/file/val",
        "out/file",
    )
    assert cfg.learning_rate is None  # default
    result = runner.invoke(
        cli,
        [
            "finetune",
            "--config",
            str(config),
            "--data",
            "t",
            "--val-data",
            "v",
            "-o",
            "o",
        ],
    )
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert cfg.kl_weight == (0.0, 0.5)
    assert cfg.source == "ignored-by-train.keras"
    assert cfg.image_size == 64  # train's section does not apply


def test_toml_config(runner, recorded, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(
            """
            kl_weight = 0.3
            mixed_precision = true
            [finetune]
            source = "s.keras"
            data = "t"
            val_data = "v"
            output = "o"
            jit = true
            """
        )
    )
    result = runner.invoke(cli, ["finetune", "--config", str(config)])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert cfg.kl_weight == (0.3,)
    assert cfg.mixed_precision == "auto"
    assert cfg.jit is True
    result = runner.invoke(cli, ["finetune", "--config", str(config), "--no-jit"])
    assert recorded["finetune"].jit is False


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("epochz: 3\n", ".yaml", "unknown key 'epochz'"),
        ("epochs: many\n", ".yaml", "'many' is not a valid integer"),
        ("- a\n- b\n", ".yaml", "must hold a mapping"),
        ("epochs = [\n", ".toml", "not valid TOML"),
        ("{}", ".ini", "must end in"),
    ],
)
def test_bad_config_files_exit_2(runner, recorded, tmp_path, text, suffix, message):
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    result = runner.invoke(cli, [*TRAIN_ARGS, "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not recorded


def test_missing_config_file_exits_2(runner, recorded, tmp_path):
    result = runner.invoke(cli, [*TRAIN_ARGS, "--config", str(tmp_path / "no.yaml")])
    assert result.exit_code == 2
    assert "no.yaml" in result.output


def test_resume_reads_the_saved_config(runner, recorded, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(
        "data: saved/train\nval_data: saved/val\nepochs: 4\nbatch_size: 2\n"
        "output: elsewhere\n"
    )
    result = runner.invoke(
        cli, ["train", "--output", str(out), "--resume", "--epochs", "6"]
    )
    assert result.exit_code == 0, result.output
    cfg = recorded["train"]
    assert cfg.resume is True
    assert (cfg.data, cfg.val_data, cfg.batch_size) == ("saved/train", "saved/val", 2)
    assert cfg.epochs == 6  # the command line still wins
    assert cfg.output == str(out)  # the folder given, not the saved path


def test_saved_config_round_trips_through_config(runner, recorded, tmp_path):
    cfg = runs.TrainConfig(
        data="a", val_data="b", output=str(tmp_path / "o"), epochs=3, image_size=32
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(runs._yaml_dump(cfg.to_dict()))
    result = runner.invoke(cli, ["train", "--config", str(saved)])
    assert result.exit_code == 0, result.output
    again = recorded["train"]
    assert again.to_dict() == cfg.to_dict()


# --------------------------------------------------------------------------
# the defaults of finetune's modes
# --------------------------------------------------------------------------

FEW = ["--unlabeled-data", "u", "--consistency-weight"]


def test_consistency_weight_alone_gives_the_few_label_recipe(runner, recorded):
    from klseg.registry import FINETUNE_RECIPES

    result = runner.invoke(cli, [*FINETUNE_ARGS, *FEW, "1", "--output", "o"])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    recipe = FINETUNE_RECIPES["few-label"]
    assert cfg.mode == "few-label" and cfg.applied == recipe
    assert cfg.kl_weight == (1.0,) and cfg.student_bn == "frozen"
    assert (cfg.ema_decay, cfg.consistency_rampup) == (0.97, 100)
    assert (cfg.learning_rate, cfg.epochs, cfg.steps_per_epoch) == (3e-3, 72, 25)
    # config.yaml records the values used, not "the mode's".
    saved = cfg.to_dict()
    assert saved["student_bn"] == "frozen" and saved["epochs"] == 72
    assert saved["mode_defaults"] is True
    note = cfg.recipe_note()
    assert note.startswith("[defaults of the few-label mode: kl_weight=1, ")
    assert "(1800 optimizer steps)" in note


def test_an_explicit_option_wins_over_the_mode(runner, recorded, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("finetune:\n  student_bn: trainable\n  learning_rate: 0.001\n")
    args = [*FINETUNE_ARGS, *FEW, "1", "--ema-decay", "0.95", "--epochs", "3"]
    result = runner.invoke(cli, [*args, "--config", str(config), "--output", "o"])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert (cfg.ema_decay, cfg.epochs) == (0.95, 3)
    assert (cfg.student_bn, cfg.learning_rate) == ("trainable", 1e-3)
    assert set(cfg.applied) == {"kl_weight", "consistency_rampup", "steps_per_epoch"}
    assert "ema_decay" not in cfg.recipe_note()


def test_a_sweep_with_the_consistency_term_is_few_label_throughout(runner, recorded):
    result = runner.invoke(cli, [*FINETUNE_ARGS, *FEW, "0,1", "--output", "o"])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert cfg.consistency_weight == (0.0, 1.0) and cfg.mode == "few-label"
    assert cfg.student_bn == "frozen" and cfg.kl_weight == (1.0,)


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the KL mode
        ["--kl-weight", "0"],  # plain
        [*FEW, "0"],  # the consistency term off
        [*FEW, "1", "--no-mode-defaults"],
    ],
)
def test_the_other_modes_keep_the_job_defaults(runner, recorded, extra):
    result = runner.invoke(cli, [*FINETUNE_ARGS, *extra, "--output", "o"])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert cfg.applied == {} and cfg.recipe_note() is None
    assert (cfg.student_bn, cfg.ema_decay, cfg.consistency_rampup) == (
        "trainable",
        0.99,
        0,
    )
    assert (cfg.learning_rate, cfg.epochs, cfg.steps_per_epoch) == (None, 20, None)
    assert cfg.kl_weight in (None, (0.0,))


def test_a_run_saved_before_the_mode_defaults_resumes_with_its_values(
    runner, recorded, tmp_path
):
    import yaml

    out = tmp_path / "run"
    out.mkdir()
    # A few-label run's config.yaml as klseg wrote it before the mode
    # defaults: the job's defaults, no mode_defaults key.
    old = {
        "source": "m.keras",
        "data": "t",
        "val_data": "v",
        "unlabeled_data": "u",
        "consistency_weight": [1.0],
        "student_bn": "trainable",
        "ema_decay": 0.99,
        "consistency_rampup": 0,
        "epochs": 20,
        "learning_rate": None,
        "steps_per_epoch": None,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    result = runner.invoke(cli, ["finetune", "--output", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert cfg.mode_defaults is False and cfg.applied == {}
    assert (cfg.learning_rate, cfg.steps_per_epoch, cfg.kl_weight) == (None, None, None)
    # A run saved with them resumes with the values it recorded.
    new = {**old, "mode_defaults": True, "student_bn": "frozen", "epochs": 72}
    new.update(kl_weight=[1.0], learning_rate=3e-3, steps_per_epoch=25)
    new.update(ema_decay=0.97, consistency_rampup=100)
    (out / "config.yaml").write_text(yaml.safe_dump(new))
    result = runner.invoke(cli, ["finetune", "--output", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    cfg = recorded["finetune"]
    assert cfg.mode_defaults is True and cfg.applied == {}
    assert (cfg.student_bn, cfg.learning_rate, cfg.epochs) == ("frozen", 3e-3, 72)


def test_a_saved_config_without_mode_defaults_compares_as_made_without_them():
    from klseg.runs.folder import _with_defaults

    cfg = runs.FinetuneConfig(
        source="m.keras", data="t", val_data="v", output="o", mode_defaults=False
    )
    current = cfg.to_dict()
    saved = {k: v for k, v in current.items() if k != "mode_defaults"}
    assert _with_defaults(saved, cfg, current)["mode_defaults"] is False
