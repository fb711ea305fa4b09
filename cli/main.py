"""Entry point of the ``klseg`` command.

Heavy imports (Keras, TensorFlow) happen inside the commands, so
``klseg --help`` and ``klseg --version`` answer at once: the options read
their choices and defaults from :mod:`klseg.registry`, and the run layer's
configs load only when a command runs.

The commands live by role: :mod:`klseg.cli.training` (``train``,
``finetune``, ``distill``) and :mod:`klseg.cli.tools` (``evaluate``,
``predict``, ``export``, ``data synth``, ``demo``); the shared option blocks
and error handling live in :mod:`klseg.cli.options`. Each command parses its
options, merges them with ``--config`` (see :mod:`klseg.cli.config_files` for
the order), builds the matching config object of :mod:`klseg.runs` and calls
one function there. Mistakes in options exit with status 2, failed runs (bad
data, missing or incompatible files) with status 1, an interrupted run with
130; none of them prints a traceback.
"""

import importlib

import click

from klseg._version import __version__

__all__ = ["COMMANDS", "cli", "main"]

#: ``{name: (module, attribute, short help)}`` of the commands. A command's
#: module is imported only when that command runs or shows its help, so
#: ``klseg --help`` builds none of their options; the short help is the one
#: the command's docstring gives (a test checks they agree).
COMMANDS = {
    "adapt": (
        "klseg.cli.adapt",
        "adapt",
        "Adapt a trained model to a target domain without target labels.",
    ),
    "data": ("klseg.cli.tools", "data", "Data sets."),
    "demo": (
        "klseg.cli.tools",
        "demo",
        "Show the method end to end on built-in two-domain data.",
    ),
    "distill": (
        "klseg.cli.training",
        "distill",
        "Distil a teacher model into a smaller student model.",
    ),
    "evaluate": (
        "klseg.cli.tools",
        "evaluate",
        "Evaluate a model: mean IoU, pixel accuracy, per-class IoU, precision",
    ),
    "export": (
        "klseg.cli.tools",
        "export",
        "Export a model for serving: SavedModel, LiteRT (TFLite) or ONNX.",
    ),
    "finetune": (
        "klseg.cli.training",
        "finetune",
        "Fine-tune a source model on a target domain with a KL term.",
    ),
    "predict": (
        "klseg.cli.tools",
        "predict",
        "Predict class masks for a folder of images.",
    ),
    "train": (
        "klseg.cli.training",
        "train",
        "Train a segmentation model from scratch (a source model).",
    ),
}


class _LazyGroup(click.Group):
    """A group whose commands load on first use (click's documented
    pattern for lazily loaded subcommands)."""

    def list_commands(self, ctx):
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx, name):
        if name not in self.commands and name in COMMANDS:
            module, attribute, _ = COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, click.utils.make_default_short_help(COMMANDS[name][2], limit))
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="klseg")
def cli():
    """Stable KL-divergence tools for semantic segmentation.

    Train a source model, fine-tune it on a new domain with a KL term that
    keeps it close to the source model, evaluate both domains, predict,
    export a SavedModel. `klseg demo` runs all of it on built-in data.
    """


def main():
    cli()


if __name__ == "__main__":
    main()
