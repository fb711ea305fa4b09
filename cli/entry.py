"""The ``klseg`` console script: a clean Ctrl-C from its first line on.

Importing the command layer (click, the option types, the run configs)
takes a noticeable time, and Python's own Ctrl-C handling would print a
traceback from the middle of it. :func:`main` therefore installs a handler
before importing anything: a Ctrl-C is held until a command's own handler
takes over (it then stops at once; see ``klseg.cli.options.run_errors``), or
until the command line is done, and the process exits with status 130 after
one line, ``Interrupted.``. A second Ctrl-C exits 130 at once.

Standard library only, so that nothing runs before the handler.
"""

import signal
import sys

__all__ = ["main", "take_interrupt"]

_pending = False


def _hold(signum, frame):
    global _pending
    if _pending:
        sys.stderr.write("\nInterrupted again: stopping now.\n")
        sys.stderr.flush()
        import os

        os._exit(130)
    _pending = True


def take_interrupt():
    """Whether a Ctrl-C was held since start-up; clears it."""
    global _pending
    pending, _pending = _pending, False
    return pending


def main():
    signal.signal(signal.SIGINT, _hold)
    code = 0
    try:
        from klseg.cli.main import main as run

        run()
    except SystemExit as e:
        code = e.code
    if take_interrupt() and code != 130:
        sys.stderr.write("\nInterrupted.\n")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
