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

import click

from klseg._version import __version__

from .tools import data, demo, evaluate, export, predict
from .training import distill, finetune, train

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="klseg")
def cli():
    """Stable KL-divergence tools for semantic segmentation.

    Train a source model, fine-tune it on a new domain with a KL term that
    keeps it close to the source model, evaluate both domains, predict,
    export a SavedModel. `klseg demo` runs all of it on built-in data.
    """


for _command in (train, finetune, distill, evaluate, predict, export, data, demo):
    cli.add_command(_command)


def main():
    cli()


if __name__ == "__main__":
    main()
