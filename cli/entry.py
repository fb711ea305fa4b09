"""The ``klseg`` console script: a clean Ctrl-C from its first line on.

Importing the command layer (click, the option types, the registry) takes a
noticeable time, and Python's own Ctrl-C handling would print a traceback
from the middle of it. :func:`main` therefore holds Ctrl-C before importing
anything (:func:`klseg.cli.interrupts.hold_interrupts`): a Ctrl-C is held
until a command's own handler takes over (it then stops at once; see
``klseg.cli.options.run_errors``), or until the command line is done, and
the process exits with status 130 after one line, ``Interrupted.`` (without
the interpreter's teardown, see :func:`_exit_now`). A second Ctrl-C exits
130 at once.

The quiet start of a command (:func:`quiet_imports`, :func:`capture_stderr`,
:func:`filter_startup_lines`, :data:`HARMLESS`) lives in
:mod:`klseg.cli.startup`; those names stay importable from here and load on
first use.

Standard library only, so that nothing runs before the handler.
"""

import importlib
import sys

from .interrupts import hold_interrupts, take_interrupt

# The names from klseg.cli.startup are defined on first use (__getattr__).
__all__ = [
    "HARMLESS",  # noqa: F822
    "capture_stderr",  # noqa: F822
    "filter_startup_lines",  # noqa: F822
    "main",
    "quiet_imports",  # noqa: F822
    "take_interrupt",
]

_FROM_STARTUP = ("HARMLESS", "capture_stderr", "filter_startup_lines", "quiet_imports")


def __getattr__(name):
    if name in _FROM_STARTUP:
        return getattr(importlib.import_module("klseg.cli.startup"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main():
    hold_interrupts()
    code = 0
    try:
        from klseg.cli.main import main as run

        run()
    except SystemExit as e:
        code = e.code
    if take_interrupt() and code != 130:
        sys.stderr.write("\nInterrupted.\n")
        code = 130
    if code == 130:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code):
    """End an interrupted command without the interpreter's teardown.

    By now the command has unwound: its files are written or removed and its
    run folder released. What is left is native state of an interrupted
    training loop (TensorFlow's input-pipeline and executor threads), whose
    destructors at interpreter exit can abort or crash the process (seen on
    a loaded 2-core machine: "terminate called without an active exception",
    exit -6 instead of 130).
    """
    import os

    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
