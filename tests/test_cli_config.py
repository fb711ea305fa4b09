"""Config files and option values: strict types, sections, non-finite numbers.

Every failing case goes through the real ``klseg`` command line and must stop
during option resolution: exit 2, a message naming the file, the section, the
key and the value, no traceback, and no output folder. The passing cases
resolve the options without running a job.
"""

import click
import pytest

from klseg.cli.config_files import resolve_options
from klseg.cli.main import cli


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _train(runner, tmp_path, config, *extra):
    """``klseg train --config FILE`` that must fail before any work starts."""
    out = tmp_path / "out"
    result = runner.invoke(
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
            str(out),
            *extra,
        ],
    )
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert not out.exists()
    return " ".join(result.output.split())  # undo click's line wrapping


def _resolve(path, args):
    """Resolve the options of ``klseg PATH... ARGS`` without running the job."""
    ctx = click.Context(cli, info_name="klseg")
    command = cli
    for name in path[:-1]:
        command = command.get_command(ctx, name)
        ctx = click.Context(command, info_name=name, parent=ctx)
    command = command.get_command(ctx, path[-1])
    ctx = command.make_context(path[-1], list(args), parent=ctx)
    values, _ = resolve_options(ctx)
    return values


# --------------------------------------------------------------------------
# a value of the wrong type
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "where", "key", "shown"),
    [
        ("run.toml", "epochs = 1.5\n", "top level", "epochs", "1.5"),
        ("run.toml", "[train]\nbatch_size = true\n", "section 'train'", "batch_size",
         "true"),
        ("run.json", '{"image_size": 32.9}', "top level", "image_size", "32.9"),
        ("run.yaml", "epochs: '1.5'\n", "top level", "epochs", "'1.5'"),
        ("run.yaml", "epochs: '8'\n", "top level", "epochs", "'8'"),
        ("run.yaml", "seed: 1.0\n", "top level", "seed", "1.0"),
        ("run.yaml", "epochs: 1e3\n", "top level", "epochs", "1000.0"),
        ("run.json", '{"data": ["a", "b"]}', "top level", "data", "['a', 'b']"),
        ("run.json", '{"train": {"output": {"a": 1}}}', "section 'train'", "output",
         "{'a': 1}"),
        ("run.yaml", "class_map: 3\n", "top level", "class_map", "3"),
        ("run.yaml", "output: 2024-01-01\n", "top level", "output", "2024-01-01"),
        ("run.yaml", "monitor: [val_loss]\n", "top level", "monitor", "['val_loss']"),
        ("run.json", '{"learning_rate": "0.01"}', "top level", "learning_rate",
         "'0.01'"),
        ("run.json", '{"learning_rate": false}', "top level", "learning_rate",
         "false"),
        ("run.json", '{"learning_rate": [0.1]}', "top level", "learning_rate",
         "[0.1]"),
        ("run.yaml", "jit: 'yes'\n", "top level", "jit", "'yes'"),
        ("run.toml", "jit = 1\n", "top level", "jit", "1"),
        ("run.yaml", "augment: 1\n", "top level", "augment", "1"),
        ("run.yaml", "augment: heavy\n", "top level", "augment", "'heavy'"),
        ("run.yaml", "mixed_precision: 16\n", "top level", "mixed_precision", "16"),
        ("run.yaml", "class_names: [sky, 3]\n", "top level", "class_names",
         "['sky', 3]"),
        ("run.yaml", "class_names: {a: 1}\n", "top level", "class_names",
         "{'a': 1}"),
        ("run.yaml", "epochs: 0\n", "top level", "epochs", "0"),
        ("run.yaml", "ignore_value: 256\n", "top level", "ignore_value", "256"),
    ],
)  # fmt: skip
def test_a_wrong_type_names_file_section_key_and_value(
    runner, tmp_path, name, text, where, key, shown
):
    config = _write(tmp_path, name, text)
    output = _train(runner, tmp_path, config)
    assert str(config) in output
    assert f"{where}, key '{key}'" in output
    assert shown in output
    option = "--" + key.replace("_", "-")
    assert f"'{option}'" in output


def test_a_quoted_whole_number_says_how_to_write_it(runner, tmp_path):
    config = _write(tmp_path, "run.yaml", "train:\n  epochs: '8'\n")
    output = _train(runner, tmp_path, config)
    assert "section 'train', key 'epochs'" in output
    assert "write 8 without quotes" in output


def test_the_existing_message_for_a_word_where_an_integer_belongs(runner, tmp_path):
    config = _write(tmp_path, "run.yaml", "epochs: many\n")
    assert "'many' is not a valid integer" in _train(runner, tmp_path, config)


def test_a_bad_value_is_refused_even_when_the_command_line_overrides_it(
    runner, tmp_path
):
    config = _write(tmp_path, "run.toml", "epochs = 1.5\n")
    output = _train(runner, tmp_path, config, "--epochs", "3")
    assert "key 'epochs'" in output and "1.5" in output


# --------------------------------------------------------------------------
# sections and keys
# --------------------------------------------------------------------------


def test_another_commands_option_in_a_section_names_its_commands(runner, tmp_path):
    config = _write(tmp_path, "run.toml", "[train]\nkl_weight = 0.3\n")
    output = _train(runner, tmp_path, config)
    assert str(config) in output
    assert "section 'train', key 'kl_weight'" in output
    assert "'klseg finetune'" in output and "'klseg demo'" in output
    assert "'klseg train'" in output


def test_top_level_keys_of_other_commands_are_ignored(tmp_path):
    config = _write(
        tmp_path,
        "run.yaml",
        "kl_weight: [0, 0.5]\ntemperature: 3\nsource: s.keras\nalpha: 0.2\n"
        "json: true\nepochs: 4\n",
    )
    values = _resolve(["train"], ["--config", str(config)])
    assert values["epochs"] == 4
    assert "kl_weight" not in values


@pytest.mark.parametrize(
    ("text", "where", "key"),
    [
        ("epochz: 3\n", "top level", "epochz"),
        ("train:\n  epochz: 3\n", "section 'train'", "epochz"),
    ],
)
def test_unknown_keys_stay_errors(runner, tmp_path, text, where, key):
    config = _write(tmp_path, "run.yaml", text)
    output = _train(runner, tmp_path, config)
    assert f"unknown key '{key}' in {where} of {config}" in output


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.yaml", "1: x\n", "top level, key 1: a key must be a string"),
        ("run.yaml", "true: x\n", "top level, key True: a key must be a string"),
        ("run.yaml", "train:\n  2: x\n", "section 'train', key 2: a key must be"),
        ("run.yaml", "train: 5\n", "top level, key 'train': 5 is an integer"),
        ("run.json", '{"train": [1]}', "top level, key 'train': [1] is a list"),
        ("run.yaml", "data:\n  x: 1\n", "section 'data', key 'x'"),
        ("run.yaml", "epochs: 3\nepochs: 4\n", "key 'epochs' is given twice"),
        ("run.json", '{"epochs": 3, "epochs": 4}', "key 'epochs' is given twice"),
        ("run.yaml", "batch-size: 2\nbatch_size: 4\n", "key 'batch_size'"),
        ("run.yaml", "config: other.yaml\n", "cannot name another one"),
    ],
)
def test_malformed_keys_and_sections(runner, tmp_path, name, text, message):
    config = _write(tmp_path, name, text)
    output = _train(runner, tmp_path, config)
    assert str(config) in output
    assert message in output


def test_data_synth_reads_both_section_forms(tmp_path):
    config = _write(tmp_path, "run.yaml", "synth:\n  num_train: 3\n")
    values = _resolve(["data", "synth"], ["--config", str(config)])
    assert values["num_train"] == 3
    config = _write(tmp_path, "run.yaml", "data:\n  synth:\n    num_val: 5\n")
    values = _resolve(["data", "synth"], ["--config", str(config)])
    assert values["num_val"] == 5


def test_data_synth_section_value_is_checked(runner, tmp_path):
    config = _write(tmp_path, "run.yaml", "data:\n  synth:\n    num_val: 2.5\n")
    result = runner.invoke(
        cli, ["data", "synth", "--config", str(config), "-o", str(tmp_path / "s")]
    )
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "section 'data.synth', key 'num_val'" in output and "2.5" in output
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------
# file content that is no config
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("run.yaml", "- a\n- b\n", "found a list"),
        ("run.json", "[]", "found a list"),
        ("run.json", "3", "found an integer"),
        ("run.json", "null", "found null"),
        ("run.yaml", "just words\n", "found a string"),
        ("run.yaml", b"\xff\xfe\x00\x01garbage", "is not UTF-8 text"),
        ("run.toml", b"epochs = \xe9\n", "is not UTF-8 text"),
        ("run.json", bytes(range(256)), "is not UTF-8 text"),
        ("run.yaml", "a: \x00\x01\n", "not valid YAML"),
        ("run.json", "{\x00}", "not valid JSON"),
        ("run.toml", "epochs = [\n", "not valid TOML"),
        ("run.yaml", "a: [\n", "not valid YAML"),
        ("run.yaml", "!!python/object:os.system\nx: 1\n", "not valid YAML"),
        ("run.json", "[" * 100000, "not valid JSON"),
    ],
)
def test_no_traceback_for_any_content(runner, tmp_path, name, content, message):
    config = _write(tmp_path, name, content)
    output = _train(runner, tmp_path, config)
    assert str(config) in output
    assert message in output


def test_a_folder_as_config_exits_2(runner, tmp_path):
    folder = tmp_path / "conf.yaml"
    folder.mkdir()
    output = _train(runner, tmp_path, folder)
    assert "conf.yaml" in output and "directory" in output


@pytest.mark.parametrize("name", ["e.yaml", "e.toml", "e.json"])
@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_file_sets_nothing(tmp_path, name, text):
    config = _write(tmp_path, name, text)
    values = _resolve(["train"], ["--config", str(config)])
    assert values["epochs"] == 20 and values["learning_rate"] is None


def test_a_yaml_file_of_comments_sets_nothing(tmp_path):
    config = _write(tmp_path, "c.yaml", "# nothing yet\n")
    assert _resolve(["train"], ["--config", str(config)])["epochs"] == 20


# --------------------------------------------------------------------------
# null
# --------------------------------------------------------------------------


def test_null_means_not_set_here(tmp_path):
    config = _write(
        tmp_path,
        "run.yaml",
        "epochs: null\nbatch_size: 4\nlearning_rate: ~\ntrain:\n  batch_size: null\n",
    )
    values = _resolve(["train"], ["--config", str(config)])
    assert values["epochs"] == 20  # the default
    assert values["batch_size"] == 4  # the section's null leaves the top level
    assert values["learning_rate"] is None
    config = _write(tmp_path, "run.json", '{"augment": null, "jit": null}')
    values = _resolve(["train"], ["--config", str(config)])
    assert values["augment"] == "light" and values["jit"] is False


# --------------------------------------------------------------------------
# values that are right
# --------------------------------------------------------------------------


def test_valid_values_of_every_kind_resolve(tmp_path):
    config = _write(
        tmp_path,
        "run.yaml",
        "learning_rate: 1e-3\nseed: 3\nclass_names: [sky, road]\n"
        "mixed_precision: true\njit: true\naugment: strong\noutput: runs/a\n"
        "finetune:\n  temperature: 2\n  kl_weight: [0, 0.5]\n",
    )
    values = _resolve(["train"], ["--config", str(config)])
    assert values["learning_rate"] == 0.001
    assert isinstance(values["learning_rate"], float)
    assert values["seed"] == 3
    assert values["class_names"] == ("sky", "road")
    assert values["mixed_precision"] == "auto"
    assert values["jit"] is True
    assert values["augment"] == "strong"
    assert values["output"] == "runs/a"
    values = _resolve(["finetune"], ["--config", str(config)])
    assert values["temperature"] == 2.0 and isinstance(values["temperature"], float)
    assert values["kl_weight"] == (0.0, 0.5)


def test_a_float_option_accepts_an_integer(tmp_path):
    config = _write(tmp_path, "run.toml", "[predict]\nalpha = 1\n")
    values = _resolve(["predict"], ["--config", str(config)])
    assert values["alpha"] == 1.0 and isinstance(values["alpha"], float)


def test_list_options_take_one_value(tmp_path):
    config = _write(tmp_path, "run.toml", "kl_weight = 1\nclass_names = 'a,b'\n")
    values = _resolve(["finetune"], ["--config", str(config)])
    assert values["kl_weight"] == (1.0,)
    assert values["class_names"] == ("a", "b")


# --------------------------------------------------------------------------
# non-finite numbers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["train", "--learning-rate", "nan"], "--learning-rate"),
        (["train", "--learning-rate", "inf"], "--learning-rate"),
        (["finetune", "--learning-rate", "-inf"], "--learning-rate"),
        (["finetune", "--temperature", "inf"], "--temperature"),
        (["finetune", "--temperature", "nan"], "--temperature"),
        (["finetune", "--kl-weight", "nan"], "--kl-weight"),
        (["finetune", "--kl-weight", "0,inf"], "--kl-weight"),
        (["demo", "--kl-weight", "nan"], "--kl-weight"),
        (["demo", "--kl-weight", "inf"], "--kl-weight"),
        (["predict", "--alpha", "nan"], "--alpha"),
    ],
)
def test_non_finite_options_exit_2(runner, tmp_path, args, option):
    out = tmp_path / "out"
    result = runner.invoke(cli, [*args, "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert f"'{option}'" in result.output
    assert "finite" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "name", "text", "key"),
    [
        ("train", "run.yaml", "learning_rate: .nan\n", "learning_rate"),
        ("train", "run.yaml", "learning_rate: .inf\n", "learning_rate"),
        ("train", "run.json", '{"learning_rate": NaN}', "learning_rate"),
        ("train", "run.toml", "learning_rate = inf\n", "learning_rate"),
        ("finetune", "run.json", '{"temperature": Infinity}', "temperature"),
        ("finetune", "run.json", '{"temperature": 1e999}', "temperature"),
        ("finetune", "run.toml", "kl_weight = nan\n", "kl_weight"),
        ("finetune", "run.toml", "kl_weight = [0, inf]\n", "kl_weight"),
        ("demo", "run.yaml", "kl_weight: .nan\n", "kl_weight"),
        ("predict", "run.yaml", "alpha: .nan\n", "alpha"),
    ],
)
def test_non_finite_values_in_files_exit_2(runner, tmp_path, command, name, text, key):
    config = _write(tmp_path, name, text)
    out = tmp_path / "out"
    result = runner.invoke(cli, [command, "--config", str(config), "-o", str(out)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"{config}, top level, key '{key}'" in output
    assert "finite" in output
    assert not out.exists()


# --------------------------------------------------------------------------
# the saved config of a resumed run
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        ("epochs: 1.5\n", "epochs", "1.5"),
        ("data: [a]\n", "data", "['a']"),
        ("learning_rate: .nan\n", "learning_rate", "nan"),
    ],
)
def test_a_resumed_runs_saved_config_is_checked(runner, tmp_path, text, key, shown):
    run = tmp_path / "run"
    run.mkdir()
    saved = run / "config.yaml"
    saved.write_text(text)
    result = runner.invoke(cli, ["train", "--output", str(run), "--resume"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"{saved}, top level, key '{key}'" in output and shown in output
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert saved.read_text() == text


def test_an_unreadable_saved_config_exits_2(runner, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"\xff\xfe")
    result = runner.invoke(cli, ["train", "--output", str(run), "--resume"])
    assert result.exit_code == 2, result.output
    assert "config.yaml" in result.output and "UTF-8" in result.output
