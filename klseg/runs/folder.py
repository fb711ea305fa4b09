"""The one output-folder policy: klseg replaces only what klseg wrote.

Every folder a job creates (a run, a sweep, the demo, synthetic data, an
export, predictions) gets a marker file, ``.klseg.json``, written before
anything else. It names the kind of output. The rules:

- A job writes into a folder that does not exist, an empty folder, or a
  folder whose marker names the same kind of output.
- A non-empty folder without a marker holds someone else's files: it is
  refused (the message names the folder and some of its entries) and never
  emptied.
- Resuming, reusing an abandoned run (one that stopped before completing an
  epoch) and ``--overwrite`` apply to marked folders only, and remove only
  the entries klseg writes there (``OWNED[kind]``); other files kept inside
  a klseg folder stay where they are. An entry that is a klseg folder itself
  (``NESTED``: a sweep's ``kl_*`` runs, the demo's parts) is klseg's only
  when it carries a marker, and is cleared by its own policy: foreign files
  in it stay, and so does its marker then.
- Inputs are never outputs: an output that is, contains or lies inside an
  input file or folder is refused before anything is written.
- A run that fails or is interrupted before it completes an epoch leaves a
  marked folder that the next run may reuse without ``--overwrite``.

Standard library only.
"""

import fnmatch
import json
import os
import shutil
import time
from pathlib import Path

from klseg import errors
from klseg._version import __version__
from klseg.data.layout_specs import layout_spec_path
from klseg.files import atomic_write_text, read_yaml, write_yaml

__all__ = [
    "MARKER",
    "OWNED",
    "OutputFolder",
    "RunFolder",
    "check_inputs_not_outputs",
]

MARKER = ".klseg.json"

#: The entries klseg writes in each kind of output folder (glob patterns).
#: Only these, and the marker, are ever removed or replaced.
OWNED = {
    "run": (
        "config.yaml",
        "model.keras",
        "metrics.json",
        "history.csv",
        "logs",
        "checkpoints",
        "plots",
        "report.md",
        ".model.tmp.keras",
    ),
    "sweep": ("config.yaml", "metrics.json", "report.md", "tradeoff.png", "kl_*"),
    "demo": (
        "demo.json",
        "data",
        "source",
        "finetune-plain",
        "finetune-kl",
        "export",
        "plots",
        "metrics.json",
        "report.md",
    ),
    "data": ("source", "target", "classes.json"),
    "predictions": ("masks", "overlays", "classes.json"),
    "export": (
        "saved_model.pb",
        "variables",
        "assets",
        "assets.extra",
        "fingerprint.pb",
        "model.tflite",
        "model.onnx",
        "export.json",
    ),
}

#: The entries of ``OWNED`` that are klseg output folders themselves (a
#: sweep's runs, the demo's data, runs and export): klseg's only when they
#: carry a marker, so a user's own ``kl_backup/`` or ``data/`` is foreign.
NESTED = {
    "sweep": ("kl_*",),
    "demo": ("data", "source", "finetune-plain", "finetune-kl", "export"),
}

_WHAT = {
    "run": "training run",
    "sweep": "KL-weight sweep",
    "demo": "demo",
    "data": "data set",
    "predictions": "prediction folder",
    "export": "model export",
}


def _listing(names, limit=4):
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class OutputFolder:
    """One output folder of a given ``kind`` and the policy above.

    Args:
        path: the folder.
        kind: a key of ``OWNED``.
        option: the option that named the folder, for messages.
    """

    def __init__(self, path, kind, option="--output"):
        if kind not in OWNED:
            raise ValueError(f"unknown output kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.option = option
        self.created = False  # whether claim() made the folder

    @property
    def marker(self):
        return self.path / MARKER

    def marked_kind(self):
        """The kind named by the folder's marker, or None without one."""
        if not self.marker.is_file():
            return None
        try:
            return json.loads(self.marker.read_text(encoding="utf-8"))["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            raise errors.RunError(
                f"the marker {self.marker} is unreadable; klseg cannot tell "
                "what it wrote there. Choose another folder."
            ) from None

    def is_owned(self, name):
        if name == MARKER:
            return True
        if any(fnmatch.fnmatch(name, p) for p in NESTED.get(self.kind, ())):
            return (self.path / name / MARKER).is_file()
        return any(fnmatch.fnmatch(name, pattern) for pattern in OWNED[self.kind])

    def entries(self):
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir())

    def foreign_entries(self):
        return [n for n in self.entries() if not self.is_owned(n)]

    def owned_entries(self):
        return [n for n in self.entries() if self.is_owned(n) and n != MARKER]

    def _check_usable(self):
        if self.path.exists() and not self.path.is_dir():
            raise errors.RunError(
                f"{self.option} {self.path} exists and is not a folder; choose "
                "a folder path."
            )
        entries = self.entries()
        if not entries:
            return None
        kind = self.marked_kind()
        if kind is None:
            raise errors.RunError(
                f"{self.option} {self.path} is not empty and was not written by "
                f"klseg (it holds {_listing(entries)}). klseg writes only into a "
                "new or empty folder, or one it made itself, and never deletes "
                "files it did not write. Choose another folder, or move those "
                "files away."
            )
        if kind != self.kind:
            raise errors.RunError(
                f"{self.option} {self.path} holds a klseg {_WHAT.get(kind, kind)}, "
                f"not a {_WHAT[self.kind]}. Choose another folder."
            )
        return kind

    def is_marked(self):
        """Whether the folder carries a marker of this kind."""
        return self.path.is_dir() and self.marked_kind() == self.kind

    def claim(self, *, replace=False, hint="", clear=True):
        """Make the folder ready for a new output of this kind.

        A new or empty folder is created and marked. A marked folder of this
        kind that holds klseg entries is refused unless ``replace``, in
        which case those entries (only) are removed first (or, with
        ``clear=False``, later by :meth:`install`).

        Raises:
            klseg.errors.RunError: the folder cannot be used (see the module
                docstring); nothing has been changed then.
        """
        kind = self._check_usable()
        owned = self.owned_entries() if kind else []
        if owned and not replace:
            raise errors.RunError(
                f"{self.option} {self.path} already holds a klseg "
                f"{_WHAT[self.kind]} ({_listing(owned)}). {hint or ''}"
                "Pass --overwrite to replace it, or choose another folder."
            )
        self.created = not self.path.exists()
        self._mkdir()
        if owned and clear:
            self.remove_owned()
        self.write_marker()
        return self

    def install(self, staging):
        """Replace klseg's entries by the entries of the folder ``staging``
        (complete outputs written elsewhere in the same file system), then
        remove ``staging``. Foreign entries stay."""
        staging = Path(staging)
        self.remove_owned()
        for entry in sorted(staging.iterdir()):
            os.replace(entry, self.path / entry.name)
        shutil.rmtree(staging, ignore_errors=True)

    def discard(self):
        """After a failed output: remove the folder if :meth:`claim` created
        it and it holds nothing but the marker."""
        if self.created and self.entries() == [MARKER]:
            shutil.rmtree(self.path, ignore_errors=True)

    def adopt(self):
        """Continue in a marked folder (resume): checks the marker only."""
        self._check_usable()
        self._mkdir()
        self.write_marker()
        return self

    def _mkdir(self):
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise errors.RunError(
                f"cannot write to output folder {self.path} ({self.option}): "
                f"{e.strerror or e}"
            ) from None

    def write_marker(self):
        atomic_write_text(
            self.marker,
            json.dumps(
                {
                    "kind": self.kind,
                    "klseg": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
                indent=2,
            )
            + "\n",
        )

    def remove_owned(self):
        """Remove klseg's entries; nested klseg folders keep foreign files."""
        for name in self.owned_entries():
            _remove_klseg_entry(self.path / name)


def _remove_klseg_entry(path):
    """Remove ``path``; a marked folder inside is cleared by its own policy."""
    if path.is_dir() and not path.is_symlink():
        nested = OutputFolder(path, "run")
        try:
            kind = nested.marked_kind()
        except errors.RunError:
            kind = None
        if kind in OWNED:
            inner = OutputFolder(path, kind)
            inner.remove_owned()
            # With foreign files left the folder keeps its marker: it stays
            # a klseg folder that the job now writing here can use again.
            if not inner.foreign_entries():
                inner.marker.unlink()
                path.rmdir()
            return
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _resolved(path):
    """``path`` as written (absolute) and with every symbolic link resolved:
    a link can make an output and an input the same folder."""
    path = os.path.expanduser(str(path))
    return Path(os.path.abspath(path)), Path(os.path.realpath(path))


def _relation(out, source):
    if out == source:
        return "is"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def check_inputs_not_outputs(outputs, inputs):
    """Refuse an output that is, contains or lies inside an input, also when
    a symbolic link on either path leads there.

    Args:
        outputs: ``{option: path}`` of what a job writes.
        inputs: ``{option: path}`` of what it reads (``None`` values and
            ``tfds:`` specs are skipped; a data set spec such as
            ``cityscapes:PATH:val`` counts as its folder ``PATH``).

    Raises:
        klseg.errors.RunError: naming both options and paths.
    """
    for out_name, out_path in outputs.items():
        if out_path is None:
            continue
        out = _resolved(out_path)
        for in_name, in_path in inputs.items():
            if in_path is None or not isinstance(in_path, (str, os.PathLike)):
                continue
            if str(in_path).startswith("tfds:"):
                continue
            source = _resolved(layout_spec_path(in_path) or in_path)
            relation = _relation(out[0], source[0]) or _relation(out[1], source[1])
            if relation is None:
                continue
            raise errors.RunError(
                f"{out_name} {out_path} {relation} the input {in_name} {in_path}: "
                "klseg never writes over its inputs. Choose an output outside "
                "every input folder."
            )


class RunFolder(OutputFolder):
    """The files of one training run::

    OUTPUT/
      .klseg.json        marker: a klseg run folder
      config.yaml        the resolved options (reusable with --config)
      model.keras        the best epoch's model by the monitored metric
      metrics.json       final metrics per validation domain
      history.csv        one row per completed epoch
      logs/              TensorBoard event files (train/, validation/)
      checkpoints/       last completed epochs (for resume)
      report.md          the run report, with plots/*.png
    """

    def __init__(self, path, kind="run", option="--output"):
        super().__init__(path, kind, option)

    config = property(lambda self: self.path / "config.yaml")
    model = property(lambda self: self.path / "model.keras")
    metrics = property(lambda self: self.path / "metrics.json")
    history = property(lambda self: self.path / "history.csv")
    logs = property(lambda self: self.path / "logs")
    checkpoints = property(lambda self: self.path / "checkpoints")
    plots = property(lambda self: self.path / "plots")
    report = property(lambda self: self.path / "report.md")

    def latest_checkpoint(self, say=None):
        """``(folder, state)`` of the newest usable checkpoint, or ``None``.

        A checkpoint whose files do not match their record (see
        :func:`klseg.runs.checkpoint.usable_checkpoints`) is passed over for
        the one before it, and ``say`` is told which and why.

        Raises:
            klseg.errors.RunError: there are checkpoints, and none is usable.
        """
        from klseg.runs.checkpoint import usable_checkpoints

        if not self.checkpoints.is_dir():
            return None
        usable, damaged = usable_checkpoints(self.checkpoints)
        if not usable:
            if not damaged and not self.has_checkpoint():
                return None
            raise errors.RunError(
                f"no usable checkpoint in {self.checkpoints} ("
                + ("; ".join(damaged) or "latest.json names none")
                + "); start the run again with --overwrite."
            )
        chosen = usable[0]
        newer = [d for d in damaged if d.split(":")[0] > chosen[0].name]
        if newer and say is not None:
            say(
                f"Checkpoint {'; '.join(newer)}. Resuming from {chosen[0].name} "
                f"(epoch {chosen[1]['epoch']}) instead."
            )
        return chosen

    def has_checkpoint(self):
        return (self.checkpoints / "latest.json").is_file()

    def abandoned(self):
        """A marked run that stopped before completing its first epoch."""
        return (
            self.is_marked()
            and not self.has_checkpoint()
            and not self.metrics.exists()
            and not self.model.exists()
        )

    def saved_config(self):
        try:
            return read_yaml(self.config)
        except Exception as e:  # YAML errors differ per cause
            raise errors.RunError(
                f"cannot read the saved settings {self.config}: {e}"
            ) from None

    def write_config(self, values):
        write_yaml(self.config, values)


def config_differences(saved, current, ignore):
    """``["key: saved X, now Y", ...]`` for the keys not in ``ignore``."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            diffs.append(f"{key}: saved {a!r}, now {b!r}")
    return diffs


def _with_defaults(saved, cfg, current):
    """A saved config with the fields added to klseg after it was saved: a
    run that predates a field ran with that field's default."""
    import dataclasses

    if not isinstance(saved, dict) or not dataclasses.is_dataclass(cfg):
        return saved
    saved = dict(saved)
    for field in dataclasses.fields(cfg):
        name = field.name
        if name in current and name not in saved:
            if field.default is not dataclasses.MISSING:
                saved[name] = field.default
    return saved


def open_run(cfg, *, kind="run", ignore=frozenset(), say=print, abandoned=None):
    """Prepare ``cfg.output`` for a new run or a resumed one.

    ``abandoned(folder)`` says whether an earlier output there stopped
    before completing anything (then it is replaced without --overwrite);
    defaults to :meth:`RunFolder.abandoned`.

    Returns:
        ``(RunFolder, (checkpoint folder, state) or None)``.

    Raises:
        klseg.errors.RunError: the folder cannot be used or resumed.
    """
    run = RunFolder(cfg.output, kind)
    current = cfg.to_dict()
    if cfg.resume:
        if not run.is_marked() or not run.config.is_file():
            raise errors.RunError(
                f"nothing to resume in {run.path}: it holds no klseg "
                f"{_WHAT[kind]}. Start it without --resume."
            )
        diffs = config_differences(
            _with_defaults(run.saved_config(), cfg, current), current, ignore
        )
        if diffs:
            raise errors.RunError(
                f"cannot resume {run.path} with different settings: "
                + "; ".join(diffs)
                + ". Resume with the saved settings (only --epochs may change), "
                "or start a new run."
            )
        run.adopt()
        checkpoint = run.latest_checkpoint(say) if kind == "run" else None
        run.write_config(current)
        return run, checkpoint
    abandoned = abandoned or RunFolder.abandoned
    reuse = run.path.is_dir() and run.is_marked() and abandoned(run)
    if reuse:
        say(f"Reusing {run.path}: its earlier run stopped before finishing an epoch.")
    run.claim(
        replace=cfg.overwrite or reuse,
        hint=f"Pass --resume to continue the {_WHAT[kind]} in it. ",
    )
    run.write_config(current)
    return run, None
