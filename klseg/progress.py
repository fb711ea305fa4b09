"""Progress of long loops: a bar on a terminal, a few lines in a log file.

A loop that ends within ``delay`` seconds (2 on a terminal, 10 elsewhere)
prints nothing, so short steps stay quiet. After that:

- on a terminal (the stream is a tty), one bar redrawn in place, at most
  ten times a second, with the count, the elapsed time and the time left;
  ``transient=True`` clears it at the end (inside a Keras epoch, whose own
  bar then completes its line), otherwise it ends with a newline;
- elsewhere (a log file, CI, ``nohup``), one line each time another tenth
  of the work is done (a line every ``interval`` seconds when the total is
  unknown), and a last line with the time taken: about ten lines however
  long the loop, never a carriage-return update per step.

``verbose=0`` prints nothing. ``verbose=None`` takes the process default
(:func:`verbosity`), so that library code without a ``verbose`` argument
follows the command's ``--quiet``. Output goes to ``sys.stderr`` unless a
stream is given, so it never mixes with a command's result on stdout.

Standard library only.

Example:

>>> import io
>>> log = io.StringIO()
>>> for batch in iterate(range(3), label="Scoring", stream=log, delay=0):
...     pass
>>> print(log.getvalue().strip().splitlines()[-1])
Scoring: 3/3 batches done in 0 s.
"""

import contextlib
import sys
import time

__all__ = ["Progress", "iterate", "verbosity"]

_default_verbose = [1]


@contextlib.contextmanager
def verbosity(verbose):
    """Make ``verbose`` the default of progress made with ``verbose=None``."""
    _default_verbose.append(int(verbose))
    try:
        yield
    finally:
        _default_verbose.pop()


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{seconds:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class Progress:
    """Progress of ``total`` units of work (see the module docstring).

    Args:
        total: units to do, or None when unknown.
        label: what is being done ("Validating", ...).
        unit: name of one unit, plural with an "s". Defaults to "batch".
        verbose: 0 prints nothing; None takes :func:`verbosity`'s default.
            Defaults to None.
        stream: where to write. Defaults to ``sys.stderr``.
        delay: seconds before anything is shown. Defaults to None: 2 on a
            terminal, 10 elsewhere.
        interval: seconds between lines on a non-terminal stream when the
            total is unknown. Defaults to 60.
        transient: on a terminal, clear the bar at the end instead of
            keeping it. Defaults to False.
        clock: ``time.monotonic`` or a stand-in (tests).
    """

    def __init__(
        self,
        total=None,
        label="Working",
        *,
        unit="batch",
        verbose=None,
        stream=None,
        delay=None,
        interval=60.0,
        transient=False,
        clock=time.monotonic,
    ):
        self.total = None if total is None or total < 0 else int(total)
        self.label = label
        self.unit = unit
        self.verbose = _default_verbose[-1] if verbose is None else int(verbose)
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.transient = transient
        self.clock = clock
        self.done = 0
        self.start = clock()
        self.shown = False
        self.closed = False
        self._last_draw = None
        self._last_tenth = 0
        self._width = 0
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.delay = (2.0 if self.tty else 10.0) if delay is None else delay

    def _units(self, n):
        return (
            self.unit
            if n == 1
            else self.unit + ("es" if self.unit[-1] in "hs" else "s")
        )

    def _count(self):
        total = "" if self.total is None else f"/{self.total}"
        return f"{self.done}{total} {self._units(self.total or self.done)}"

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream
            self.verbose = 0

    def update(self, n=1):
        """Count ``n`` more units done."""
        self.done += n
        if not self.verbose or self.closed:
            return
        now = self.clock()
        elapsed = now - self.start
        if elapsed < self.delay:
            return
        if self.tty:
            if self._last_draw is None or now - self._last_draw >= 0.1:
                self._draw(elapsed)
                self._last_draw = now
            return
        if self.total:
            tenth = min(10, self.done * 10 // self.total)
            due = tenth > self._last_tenth
        else:
            tenth = 0
            due = self._last_draw is None or now - self._last_draw >= self.interval
        if due and self.done != self.total:
            self._last_tenth = tenth
            self._last_draw = now
            self.shown = True
            left = self._left(elapsed)
            self._write(f"{self.label}: {self._count()}, {_duration(elapsed)}{left}\n")

    def _left(self, elapsed):
        if not self.total or not self.done or self.done >= self.total:
            return ""
        remaining = elapsed * (self.total - self.done) / self.done
        return f", about {_duration(remaining)} left"

    def _draw(self, elapsed):
        if self.total:
            filled = int(20 * min(self.done, self.total) / self.total)
            bar = "[" + "=" * filled + " " * (20 - filled) + "] "
        else:
            bar = ""
        text = (
            f"{self.label} {bar}{self._count()} {_duration(elapsed)}"
            f"{self._left(elapsed)}"
        )
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.shown = True
        self._write("\r" + text + pad)

    def close(self):
        """End the progress: the last line, if anything was shown."""
        if self.closed:
            return
        self.closed = True
        if not self.verbose:
            return
        elapsed = self.clock() - self.start
        if self.tty:
            if not self.shown:
                return
            if self.transient:
                self._write("\r" + " " * self._width + "\r")
            else:
                self._draw(elapsed)
                self._write("\n")
            return
        if self.shown or (self.delay <= 0):
            self._write(
                f"{self.label}: {self._count()} done in {_duration(elapsed)}.\n"
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _length(items):
    try:
        return len(items)
    except TypeError:  # unknown or infinite (tf.data without a cardinality)
        return None


class _Iterable:
    """Re-iterable: each pass over ``items`` shows its own progress."""

    def __init__(self, items, total, kwargs):
        self.items, self.total, self.kwargs = items, total, kwargs

    def __iter__(self):
        total = self.total if self.total is not None else _length(self.items)
        with Progress(total, **self.kwargs) as progress:
            for item in self.items:
                yield item
                # Counted when the consumer asks for the next item: the one
                # before it is then finished.
                progress.update(1)

    def __len__(self):
        total = self.total if self.total is not None else _length(self.items)
        if total is None:
            raise TypeError("length unknown")
        return total


def iterate(items, total=None, label="Working", **kwargs):
    """``items``, counted as the loop over them advances.

    Each item counts as one ``unit`` (see :class:`Progress`, whose keyword
    arguments this takes). The result can be iterated again (a validation
    set each epoch); every pass shows its own progress.

    Args:
        items: any iterable; ``len(items)`` is the total unless ``total``
            is given.
        total: the number of items, when ``len`` cannot tell it.
        label: what is being done.
    """
    return _Iterable(items, total, {"label": label, **kwargs})
