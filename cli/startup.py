"""A quiet start of a command.

:func:`quiet_imports` makes a command's start quiet: TensorFlow's
native libraries print their CUDA probe ("Could not find cuda drivers on
your machine, GPU will not be used.", a failed ``cuInit`` on a machine
without a GPU) straight to file descriptor 2, before any log level applies.
The first import of TensorFlow (and Keras) runs with descriptor 2 sent
to a temporary file (:func:`capture_stderr`); the lines it caught are
then written to stderr, except the known harmless ones
(:data:`HARMLESS`, matched whole). Any other line, a real error included,
is shown.

Standard library only. The console script (:mod:`klseg.cli.entry`) loads it
when a command starts (its patterns are compiled then), not for ``--help``.
"""

import os
import re
import sys
import tempfile

__all__ = [
    "HARMLESS",
    "capture_stderr",
    "filter_startup_lines",
    "quiet_imports",
]

_STAMP = r"[IWEF]\d{4} [\d:.]+ +\d+ "

_NO_DRIVER = re.compile(
    _STAMP + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your "
    r"machine, GPU will not be used\."
)

#: Lines of TensorFlow's start-up that say only that there is no GPU (or
#: that a CUDA plugin was registered twice); each matches a whole line.
HARMLESS = tuple(
    re.compile(pattern)
    for pattern in (
        r"WARNING: All log messages before absl::InitializeLog\(\) is called "
        r"are written to STDERR",
        _NO_DRIVER.pattern,
        _STAMP + r"cuda_executor\.cc:\d+\] could not open file to read NUMA node: .*",
        _STAMP + r"cuda_(?:dnn|fft|blas)\.cc:\d+\] Unable to register "
        r"cu(?:DNN|FFT|BLAS) factory: Attempting to register factory for plugin "
        r"cu(?:DNN|FFT|BLAS) when one has already been registered",
        _STAMP + r"computation_placer\.cc:\d+\] computation placer already "
        r"registered\. Please check linkage and avoid linking the same target "
        r"more than once\.",
    )
)
# Harmless only where the probe found no CUDA driver at all.
_NO_DRIVER_CUINIT = re.compile(
    _STAMP + r"cuda_(?:platform|diagnostics|executor)\.cc:\d+\] failed call to "
    r"cuInit: .*"
)


def filter_startup_lines(text):
    """``text`` without the harmless start-up lines (see :data:`HARMLESS`).

    A failed ``cuInit`` counts as harmless only when the same start-up said
    that no CUDA driver was found.
    """
    lines = text.splitlines(keepends=True)
    no_driver = any(_NO_DRIVER.fullmatch(line.rstrip("\r\n")) for line in lines)
    kept = []
    for line in lines:
        bare = line.rstrip("\r\n")
        if any(p.fullmatch(bare) for p in HARMLESS):
            continue
        if no_driver and _NO_DRIVER_CUINIT.fullmatch(bare):
            continue
        kept.append(line)
    return "".join(kept)


def capture_stderr(fn):
    """Run ``fn()`` with file descriptor 2 caught; show what it wrote, less
    :func:`filter_startup_lines`. Returns what ``fn`` returns; an error it
    raises is raised after its lines are shown."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable descriptor 2
        return fn()
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            return fn()
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = filter_startup_lines(caught.read().decode("utf-8", "replace"))
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


class _QuietLoader:
    """Runs a module's loader inside :func:`capture_stderr`."""

    def __init__(self, loader, probe):
        self.loader, self.probe = loader, probe

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        def run():
            self.loader.exec_module(module)
            if self.probe:
                # The device probe (cuInit) runs when devices are first listed.
                module.config.list_physical_devices()

        try:
            capture_stderr(run)
        finally:
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _QuietFinder:
    """Finds the first import of each name in ``names`` for the real finders
    and wraps its loader in :class:`_QuietLoader`."""

    def __init__(self, names):
        self.pending = set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _QuietLoader(spec.loader, probe=name == "tensorflow")
        return spec


def quiet_imports(names=("tensorflow", "keras")):
    """Make the first import of TensorFlow and Keras quiet (see the module
    docstring); later imports are untouched. Sets
    ``TF_CPP_MIN_LOG_LEVEL=2`` unless the environment sets it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    names = [n for n in names if n not in sys.modules]
    if names and not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder(names))
