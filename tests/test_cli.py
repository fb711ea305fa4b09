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
    assert f"[default: {klseg.finetune.DEFAULT_KL_WEIGHT:g}]" in text
    assert f"[default: {klseg.finetune.DEFAULT_TEMPERATURE:g}]" in text


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
