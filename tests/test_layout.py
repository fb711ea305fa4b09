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
    "ownership",
    "checkpoint",
    "runtime",
    "inputs",
    "streams",
    "scoring",
    "reports",
    "callbacks",
    "fit",
    "classmaps",
    "hub",
    "mean_teacher",
}
JOBS = {
    "train",
    "finetune",
    "adapt",
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
        assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines"


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
        for p in [
            *_modules(PACKAGE / "runs"),
            *(PACKAGE / f"{n}.py" for n in ("finetune", "consistency", "distill")),
        ]
    }
    counting = [p.name for p, text in sources.items() if "np.bincount" in text]
    assert counting == []
    assert "evaluation.evaluate_each(" in sources[PACKAGE / "runs" / "scoring.py"]
    # Every per-domain score (the run layer's and KLRegularizedModel's) goes
    # through evaluate_each, which calls evaluate once per domain.
    library = (PACKAGE / "evaluation.py").read_text(encoding="utf-8")
    tree = ast.parse(library)
    each = next(
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name == "evaluate_each"
    )
    assert "evaluate(" in ast.get_source_segment(library, each)
    domains = next(
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name == "evaluate_domains"
    )
    assert "evaluate_each(" in ast.get_source_segment(library, domains)


def test_run_temperature_range_is_the_losses_range():
    from klseg import ops
    from klseg.runs import configs as config

    assert tuple(config.TEMPERATURE_RANGE) == tuple(ops.TEMPERATURE_RANGE)


# One idea per module -------------------------------------------------------

#: Longest function body (lines of code: no docstring, blank or comment
#: lines) in klseg/ and cli/, and longest module.
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 700


def _library_files():
    return [*_modules(PACKAGE), *_modules(ROOT / "cli")]


def _code_lines(node, lines):
    skip = set()
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1
        for number in range(node.lineno, node.end_lineno + 1)
        if number not in skip
        and lines[number - 1].strip()
        and not lines[number - 1].strip().startswith("#")
    )


def _function_lengths(path):
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, _code_lines(node, lines)


def test_functions_and_modules_stay_short():
    long_functions = [
        f"{path.relative_to(ROOT)}:{line} {name} ({count} lines)"
        for path in _library_files()
        for name, line, count in _function_lengths(path)
        if count > MAX_FUNCTION_LINES
    ]
    assert long_functions == []
    long_modules = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path in _library_files()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert long_modules == []


def test_the_length_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    path = tmp_path / "long.py"
    path.write_text(f'def f():\n    """Doc."""\n    # note\n\n{body}\n')
    ((name, _, count),) = _function_lengths(path)
    assert (name, count) == ("f", MAX_FUNCTION_LINES + 2)


def _module_name(path):
    if path.is_relative_to(ROOT / "cli"):
        parts = ("klseg", "cli", *path.relative_to(ROOT / "cli").with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _import_graph():
    """``{module: {klseg modules it imports, at any depth}}``; ``from a import
    b`` counts as importing ``a.b`` where that is a module, else ``a``."""
    files = {_module_name(p): p for p in _library_files()}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                    for a in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def _cycles(graph, within):
    """Import cycles among the modules whose names start with ``within``
    (package ``__init__`` files, which re-export, left out)."""
    nodes = {n for n in graph if n.startswith(within) and not _is_package(n, graph)}
    found = []
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node, [])
    return found


def _is_package(name, graph):
    return any(other.startswith(name + ".") for other in graph)


def test_no_import_circle_in_the_run_layer_or_the_library():
    graph = _import_graph()
    assert _cycles(graph, "klseg.runs") == []
    assert _cycles(graph, "klseg.cli") == []
    library = {n: e for n, e in graph.items() if not n.startswith("klseg.runs")}
    library = {n: e for n, e in library.items() if not n.startswith("klseg.cli")}
    assert _cycles(library, "klseg") == []


def test_the_circle_check_can_fail():
    graph = {"klseg.runs.a": {"klseg.runs.b"}, "klseg.runs.b": {"klseg.runs.a"}}
    assert _cycles(graph, "klseg.runs") == [
        ["klseg.runs.a", "klseg.runs.b", "klseg.runs.a"]
    ]


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or node.level):
                offenders += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert offenders == []


def test_jobs_import_no_other_job():
    # A job may call another job's public function (the demo runs the
    # others); it never reaches into another job's private names.
    for name in JOBS:
        for path in _runs_module(name):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                    owner = node.value
                    if isinstance(owner, ast.Name) and owner.id in JOBS - {name}:
                        raise AssertionError(f"{path.name}: {owner.id}.{node.attr}")


def test_each_shared_constant_is_defined_once():
    # Every tuple or dict of klseg.registry is written there only: another
    # module that needs it imports it (a literal copy would drift).
    from klseg import registry

    shared = {
        name: getattr(registry, name)
        for name in registry.__all__
        if isinstance(getattr(registry, name), (tuple, dict))
    }
    copies = []
    for path in _library_files():
        if path == PACKAGE / "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Assign):
                continue
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            copies += [
                f"{path.relative_to(ROOT)}:{node.lineno} copies registry.{name}"
                for name, constant in shared.items()
                if type(value) is type(constant) and value == constant
            ]
    assert copies == []


def test_the_lazy_command_table_is_the_commands():
    # klseg --help lists the commands from klseg.cli.main.COMMANDS without
    # importing them: each entry must be the command, with its own help.
    import importlib

    import click

    from klseg.cli.main import COMMANDS, cli

    for name, (module, attribute, short_help) in COMMANDS.items():
        command = getattr(importlib.import_module(module), attribute)
        assert command.name == name
        assert command.help.split("\n")[0].strip() == short_help
        assert cli.get_command(click.Context(cli), name) is command
    found = {
        n
        for n in dir(importlib.import_module("klseg.cli.tools"))
        if isinstance(
            getattr(importlib.import_module("klseg.cli.tools"), n), click.Command
        )
    } | {
        n
        for module in ("klseg.cli.training", "klseg.cli.adapt")
        for n in dir(importlib.import_module(module))
        if isinstance(getattr(importlib.import_module(module), n), click.Command)
    }
    assert {c for c in found if c in COMMANDS or c != "synth"} == set(COMMANDS)


def test_help_loads_no_command_module():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from klseg.cli.main import cli\n"
        "out = CliRunner().invoke(cli, ['--help']).output\n"
        "assert 'finetune' in out and 'Fine-tune a source model' in out, out\n"
        "print(sorted(m for m in sys.modules if m.startswith('klseg.cli.t')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_config_files_see_every_command_in_a_fresh_process():
    # A config key is checked against the options of every command, which
    # load lazily: the walk must load them, not read what is loaded.
    code = (
        "import click\n"
        "from klseg.cli.main import cli\n"
        "from klseg.cli.config_files import _command_tree\n"
        "print(' '.join(sorted(_command_tree(click.Context(cli)))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    found = out.stdout.strip().split(" ")
    from klseg.cli.main import COMMANDS

    assert set(COMMANDS) <= set(found) and "synth" in found, found
