"""The one output-folder policy: klseg removes only the files it wrote.

Every folder a job creates (a run, a sweep, the demo, synthetic data, an
export, predictions) gets a marker file, ``.klseg.json``, written before
anything else. It names the kind of output and lists every file and folder
klseg writes there, each recorded before it is written
(:mod:`klseg.runs.ownership`). The rules:

- A job writes into a folder that does not exist, an empty folder, or a
  folder whose marker names the same kind of output.
- A non-empty folder without a marker holds someone else's files: it is
  refused (the message names the folder and some of its entries) and never
  emptied.
- One process writes a folder at a time: a job holds the folder's lock
  (``.klseg.lock``) from before it decides anything until it ends, and a
  second process is refused at once, naming the first.
- Resuming, reusing an abandoned run (one that stopped before completing an
  epoch), ``--overwrite`` and the installation of a complete output remove
  or replace exactly klseg's files and folders (a folder once it is empty),
  at every depth; anything else inside a klseg folder stays where it is, and
  the job says so in one line ("Kept 2 files klseg did not write: ...").
  A klseg folder inside (a sweep's runs, the demo's parts) is cleared by
  its own record.
- Inputs are never outputs: an output that is, contains or lies inside an
  input file or folder is refused before anything is written.
- A run that fails or is interrupted before it completes an epoch leaves a
  marked folder that the next run may reuse without ``--overwrite``.

Standard library only.
"""

import os
import shutil
from pathlib import Path

from klseg import errors
from klseg.data.layout_specs import layout_spec_path
from klseg.files import read_yaml, record_written, write_yaml
from klseg.runs import ownership
from klseg.runs.ownership import LOCK, MARKER, NESTED, OWNED, holds_folders

__all__ = [
    "LOCK",
    "MARKER",
    "NESTED",
    "OWNED",
    "OutputFolder",
    "RunFolder",
    "check_inputs_not_outputs",
    "holds_folders",
]

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


def kept_note(kept):
    """The one line that names the files klseg kept, or None."""
    if not kept:
        return None
    files = "file" if len(kept) == 1 else "files"
    return f"Kept {len(kept)} {files} klseg did not write: {_listing(kept, 6)}"


class OutputFolder:
    """One output folder of a given ``kind`` and the policy above.

    Args:
        path: the folder.
        kind: a key of ``OWNED``.
        option: the option that named the folder, for messages.
        say: where the note about kept files goes. Defaults to ``print``.
    """

    def __init__(self, path, kind, option="--output", say=print):
        if kind not in OWNED:
            raise ValueError(f"unknown output kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.option = option
        self.say = say
        self.created = False  # whether claim() made the folder

    @property
    def marker(self):
        return self.path / MARKER

    def marked_kind(self):
        """The kind named by the folder's marker, or None without one."""
        if not self.marker.is_file():
            return None
        kind = ownership.marker_kind(self.path)
        if kind is None:
            raise errors.RunError(
                f"the marker {self.marker} is unreadable; klseg cannot tell "
                "what it wrote there. Choose another folder."
            )
        return kind

    def record(self):
        """What klseg wrote here (:class:`klseg.runs.ownership.Record`)."""
        held = ownership.held_record(self.path)
        if held is not None:
            return held
        record = ownership.Record.load(self.path, self.kind)
        record.take_over_legacy()
        return record

    def entries(self):
        """The folder's entries, but its lock file."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def foreign_entries(self):
        """What klseg did not write here (relative paths, folders with /)."""
        return self.record().clear(dry=True)[1]

    def owned_entries(self):
        """The top-level entries holding anything klseg wrote."""
        removed, _ = self.record().clear(dry=True)
        return sorted({r.split("/")[0] for r in removed})

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

    def lock(self):
        """Take the folder's lock (made if new; checked first): one
        process writes it at a time. Within one process it may be taken
        again; each :meth:`lock` needs one :meth:`release`, or a job
        decorated with :func:`holds_folders`.

        Raises:
            klseg.errors.RunError: another process holds it (naming it), or
                the folder cannot be used.
        """
        self._check_usable()
        self.created = self.created or not self.path.exists()
        self._mkdir()
        ownership.acquire(self.path, self.option)
        if ownership.held_record(self.path) is None:
            ownership.attach_record(self.path, self.record())
        return self

    def release(self):
        ownership.release(self.path)

    def locked(self):
        """The lock for a ``with`` block (:meth:`lock`, then :meth:`release`)."""
        return _Locked(self)

    def claim(self, *, replace=False, hint="", clear=True):
        """Make the folder ready for a new output of this kind, and lock it.

        A new or empty folder is created and marked. A marked folder of this
        kind that holds klseg entries is refused unless ``replace``, in
        which case those entries (only) are removed first (or, with
        ``clear=False``, later by :meth:`install`).

        Raises:
            klseg.errors.RunError: the folder cannot be used (see the module
                docstring); nothing has been changed then.
        """
        self.lock()
        try:
            kind = self._check_usable()  # again, now that no one else writes
            owned = self.owned_entries() if kind else []
            if owned and not replace:
                raise errors.RunError(
                    f"{self.option} {self.path} already holds a klseg "
                    f"{_WHAT[self.kind]} ({_listing(owned)}). {hint or ''}"
                    "Pass --overwrite to replace it, or choose another folder."
                )
            if owned and clear:
                self.remove_owned()
            record = self.record()
            record.prune()
            record.save()
        except BaseException:
            self.release()
            raise
        return self

    def install(self, staging):
        """Replace klseg's files by the complete output in the folder
        ``staging`` (in the same file system), then remove ``staging``.
        Anything else stays, also inside klseg's folders.

        Raises:
            klseg.errors.RunError: a file of someone else's has the name of
                a new file (nothing is changed then).
        """
        staging = Path(staging)
        record = self.record()
        names = _tree(staging)
        clash = [
            n
            for n in names
            if _lexists(self.path / n)
            and not (n.endswith("/") and _real_dir(self.path / n))
            and not record.owns_entry(n.rstrip("/"))
        ]
        if clash:
            raise errors.RunError(
                f"{self.option} {self.path} holds {_listing(clash)}, which klseg "
                "did not write and would now replace. Move them away, or "
                "choose another folder."
            )
        inside = self.path in staging.parents
        skip = {staging.relative_to(self.path).parts[0]} if inside else set()
        _, kept = record.clear(skip=skip)
        record.record(names)
        _merge(staging, self.path)
        shutil.rmtree(staging, ignore_errors=True)
        self._note(kept)

    def discard(self):
        """After a failed output: remove the folder if :meth:`claim` created
        it and it holds nothing but the marker."""
        if self.created and self.entries() == [MARKER]:
            shutil.rmtree(self.path, ignore_errors=True)

    def adopt(self):
        """Continue in a marked folder (resume): lock it, and remove what a
        killed process left half-written (klseg's temporary folders)."""
        self.lock()
        try:
            record = self.record()
            for rel in sorted(record.temporary):
                shutil.rmtree(self.path / rel, ignore_errors=True)
            record.prune()
            record.save()
        except BaseException:
            self.release()
            raise
        return self

    def _mkdir(self):
        try:
            if not self.path.exists():
                record_written(self.path, folder=True)
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
        self.record().save()

    def remove_owned(self):
        """Remove klseg's files and folders (klseg folders inside by their
        own record); say which files of someone else's stay."""
        _, kept = self.record().clear()
        self._note(kept)
        return kept

    def _note(self, kept):
        note = kept_note(kept)
        if note and self.say is not None:
            self.say(note)


class _Locked:
    def __init__(self, folder):
        self.folder = folder

    def __enter__(self):
        return self.folder.lock()

    def __exit__(self, *exc):
        self.folder.release()


def _lexists(path):
    return os.path.lexists(path)


def _real_dir(path):
    return path.is_dir() and not path.is_symlink()


def _tree(folder):
    """Every entry under ``folder``, relative, folders ending in ``/``."""
    folder = Path(folder)
    return [
        p.relative_to(folder).as_posix()
        + ("/" if p.is_dir() and not p.is_symlink() else "")
        for p in sorted(folder.rglob("*"))
    ]


def _merge(source, dest):
    """Move everything in ``source`` into ``dest``: an entry whose folder
    stays there (holding someone else's files) is merged into it."""
    for entry in sorted(Path(source).iterdir()):
        target = Path(dest) / entry.name
        if _real_dir(entry) and _real_dir(target):
            _merge(entry, target)
        else:
            os.replace(entry, target)


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
      .klseg.json        marker: a klseg run folder, and what klseg wrote
      .klseg.lock        while a process writes the run: its PID, command
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

    def finished(self, checkpoint, epochs):
        """Whether the run completed ``epochs``: its ``checkpoint``
        (``(folder, state)``) is of epoch ``epochs`` or later, and its
        ``metrics.json`` (of a run of ``epochs``) and ``model.keras`` are
        written."""
        import json

        if checkpoint is None or int(checkpoint[1].get("epoch", 0)) < epochs:
            return False
        if not self.metrics.is_file() or not self.model.is_file():
            return False
        try:
            metrics = json.loads(self.metrics.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(metrics, dict) and metrics.get("epochs") == epochs

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
    run that predates a field ran with that field's default (or with the
    value its ``metadata["predating"]`` names, for a field whose default
    changes what a run does)."""
    import dataclasses

    if not isinstance(saved, dict) or not dataclasses.is_dataclass(cfg):
        return saved
    saved = dict(saved)
    for field in dataclasses.fields(cfg):
        name = field.name
        if name in current and name not in saved:
            if "predating" in field.metadata:
                saved[name] = field.metadata["predating"]
            elif field.default is not dataclasses.MISSING:
                saved[name] = field.default
    return saved


def open_run(cfg, *, kind="run", ignore=frozenset(), say=print, abandoned=None):
    """Prepare ``cfg.output`` for a new run or a resumed one.

    ``abandoned(folder)`` says whether an earlier output there stopped
    before completing anything (then it is replaced without --overwrite);
    defaults to :meth:`RunFolder.abandoned`.

    The folder is locked before anything is decided and stays locked
    (:meth:`OutputFolder.lock`): call it inside a job decorated with
    :func:`holds_folders`, or release the folder when done.

    Returns:
        ``(RunFolder, (checkpoint folder, state) or None)``.

    Raises:
        klseg.errors.RunError: the folder cannot be used or resumed, or
            another process writes it.
    """
    run = RunFolder(cfg.output, kind)
    run.say = say
    if cfg.resume:
        if not run.is_marked() or not run.config.is_file():
            raise errors.RunError(
                f"nothing to resume in {run.path}: it holds no klseg "
                f"{_WHAT[kind]}. Start it without --resume."
            )
        # Locked before anything is read for the decision, so that no other
        # process changes the folder in between.
        with run.locked():
            return _resume(run, cfg, ignore, say)
    abandoned = abandoned or RunFolder.abandoned
    with run.locked():
        reuse = run.is_marked() and abandoned(run)
        if reuse:
            say(
                f"Reusing {run.path}: its earlier run stopped before finishing "
                "an epoch."
            )
        run.claim(
            replace=cfg.overwrite or reuse,
            hint=f"Pass --resume to continue the {_WHAT[kind]} in it. ",
        )
    try:
        run.write_config(cfg.to_dict())
    except BaseException:
        run.release()
        raise
    return run, None


def _resume(run, cfg, ignore, say):
    """Check the saved settings and what there is to continue from, then
    continue in ``run`` (locked). Nothing is changed before the checks."""
    current = cfg.to_dict()
    saved = run.saved_config()
    _check_command(run, saved, cfg)
    diffs = config_differences(_with_defaults(saved, cfg, current), current, ignore)
    if diffs:
        raise errors.RunError(
            f"cannot resume {run.path} with different settings: "
            + "; ".join(diffs)
            + ". Resume with the saved settings (only --epochs may change), "
            "or start a new run."
        )
    checkpoint = run.latest_checkpoint(say) if run.kind == "run" else None
    if run.kind == "run" and checkpoint is None:
        _check_nothing_completed(run)
    if checkpoint is not None:
        from klseg.runs.checkpoint import check_history

        check_history(run.history, checkpoint[1], checkpoint[0].name)
    if run.kind == "run" and run.finished(checkpoint, cfg.epochs):
        run.lock()  # held for the job, as adopt() does; nothing is written
        return run, checkpoint
    run.adopt()
    try:
        run.write_config(current)
    except BaseException:
        run.release()
        raise
    return run, checkpoint


def _command(config_class):
    """The command of a run config (``TrainConfig`` -> ``train``)."""
    return config_class.__name__.removesuffix("Config").lower()


def _written_by(saved, cfg):
    """The command that wrote the saved config ``saved`` when it is not the
    one of ``cfg``, else None: the run config whose fields hold the most of
    the saved keys (a key klseg dropped since counts against every one)."""
    import dataclasses

    from klseg.runs import configs

    classes = (
        configs.TrainConfig,
        configs.FinetuneConfig,
        configs.DistillConfig,
        configs.AdaptConfig,
    )
    if not isinstance(saved, dict) or type(cfg) not in classes:
        return None
    keys = set(saved)

    def fit(config_class):
        fields = {f.name for f in dataclasses.fields(config_class)}
        return len(keys & fields) - len(keys - fields)

    best = max(classes, key=fit)
    if fit(best) == fit(type(cfg)):
        return None
    return _command(best)


def _check_command(run, saved, cfg):
    """Refuse to resume a run that another command wrote."""
    written = _written_by(saved, cfg)
    if written is not None:
        raise errors.RunError(
            f"{run.option} {run.path} holds a klseg {written} run, not a "
            f"{_command(type(cfg))} run (its {run.config.name} has the "
            f"settings of klseg {written}). Resume it with klseg {written} "
            "--resume, or choose another folder."
        )


def _completed_epochs(run):
    """What in ``run`` shows that epochs were completed (file names)."""
    shown = [p.name for p in (run.metrics, run.model) if p.is_file()]
    if run.history.is_file():
        with open(run.history, encoding="utf-8", errors="replace") as f:
            if sum(1 for line in f if line.strip()) > 1:
                shown.append(run.history.name)
    return shown


def _check_nothing_completed(run):
    """Refuse to resume a run that completed epochs but kept no checkpoint:
    continuing would train from scratch and replace its results."""
    shown = _completed_epochs(run)
    if shown:
        raise errors.RunError(
            f"cannot resume {run.path}: its {', '.join(shown)} show completed "
            f"epochs, but {run.checkpoints} holds no checkpoint to continue "
            "from. Nothing was changed. Pass --overwrite to start the run "
            "over (replacing its results), or choose another folder."
        )
