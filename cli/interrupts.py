"""A Ctrl-C held from the first line of the ``klseg`` console script on.

:func:`hold_interrupts` installs a SIGINT handler that holds a Ctrl-C until a
command's own handler takes over (:func:`take_interrupt` says whether one
came; see ``klseg.cli.options.run_errors``); a second Ctrl-C exits 130 at
once. The console script (:mod:`klseg.cli.entry`) installs it first thing.

Standard library only, so that nothing runs before the handler.
"""

import signal
import sys

__all__ = ["hold_interrupts", "take_interrupt"]

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


def hold_interrupts():
    """Hold a Ctrl-C from now on (see the module docstring)."""
    signal.signal(signal.SIGINT, _hold)
