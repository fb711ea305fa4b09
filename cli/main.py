"""Entry point of the ``klseg`` command.

Heavy imports (Keras, TensorFlow) happen inside the commands, so
``klseg --help`` and ``klseg --version`` answer at once.
"""

import click

from klseg._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="klseg")
def cli():
    """Stable KL-divergence tools for semantic segmentation."""


def main():
    cli()


if __name__ == "__main__":
    main()
