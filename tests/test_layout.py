"""The package's structure: one list of names, imports in one direction.

These checks read the source with ``ast``; they fail when a module imports
upward (``klseg`` importing ``cli``, the library importing ``klseg.runs``,
an engine module of ``klseg.runs`` importing a job), when the run layer's
config stops being importable without Keras, or when the model registry and
the names the command line offers disagree.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "klseg"

#: Modules of klseg.runs that make up the engine; the jobs build on them.
ENGINE = {
    "configs",
    "checks",
    "results",
    "folder",
    "checkpoint",
    "runtime",
    "inputs",
    "scoring",
    "callbacks",
    "fit",
    "classmaps",
    "hub",
    "mean_teacher",
}
JOBS = {
    "train",
    "finetune",
    "sweep",
    "evaluate",
    "predict",
    "export",
    "synth",
    "demo",
    "distill",
}


def _imports(path):
    """Every module name ``path`` imports (at any depth)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(folder):
    return sorted(p for p in folder.rglob("*.py"))


def test_the_library_never_imports_the_command_line_or_the_run_layer():
    for path in _modules(PACKAGE):
        if "runs" in path.relative_to(PACKAGE).parts:
            continue
        names = _imports(path)
        assert not any(n == "cli" or n.startswith("cli.") for n in names), path
        assert not any(n.startswith("klseg.cli") for n in names), path
        assert not any(n.startswith("klseg.runs") for n in names), path


def _runs_module(name):
    """The files of ``klseg.runs.NAME`` (a module, or a package's modules)."""
    folder = PACKAGE / "runs" / name
    return _modules(folder) if folder.is_dir() else [folder.with_suffix(".py")]


def test_engine_modules_do_not_import_jobs():
    for name in ENGINE:
        names = set().union(*(_imports(p) for p in _runs_module(name)))
        upward = {n for n in names if n.split(".")[-1] in JOBS and "klseg.runs" in n}
        assert not upward, (name, upward)


def test_every_runs_module_is_engine_or_job_and_stays_small():
    found = {
        p.stem
        for p in (PACKAGE / "runs").iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    } - {"__init__"}
    assert found == ENGINE | JOBS
    for path in _modules(PACKAGE / "runs"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 600, f"{path.name} has {lines} lines"


def test_run_config_and_the_cli_import_without_keras():
    code = (
        "import sys\n"
        "import klseg.runs, klseg.runs.configs, klseg.registry\n"
        "import klseg.cli.main\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'numpy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_one_list_of_model_and_backbone_names():
    from click.testing import CliRunner

    from klseg import models, registry
    from klseg.cli.main import cli

    assert tuple(sorted(registry.MODELS)) == tuple(models.available_models())
    assert tuple(registry.BACKBONES) == tuple(models.BACKBONES)
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    for name in (*registry.MODELS, *registry.BACKBONES):
        assert name in help_text


def test_one_evaluation_path():
    # The run layer's and the fine-tuning scores go through klseg.evaluation;
    # no second confusion-matrix computation remains.
    sources = {
        p: p.read_text(encoding="utf-8")
        for p in [*_modules(PACKAGE / "runs"), PACKAGE / "finetune.py"]
    }
    counting = [p.name for p, text in sources.items() if "np.bincount" in text]
    assert counting == []
    assert "klseg.evaluation" in sources[PACKAGE / "runs" / "scoring.py"]
    assert "evaluation.evaluate(" in sources[PACKAGE / "finetune.py"]


def test_run_temperature_range_is_the_losses_range():
    from klseg import ops
    from klseg.runs import configs as config

    assert tuple(config.TEMPERATURE_RANGE) == tuple(ops.TEMPERATURE_RANGE)
