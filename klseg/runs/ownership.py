"""What klseg wrote in an output folder, and which process writes it now.

The two mechanisms behind :mod:`klseg.runs.folder`:

**The record.** The marker ``.klseg.json`` of an output folder lists every
file and folder klseg writes there (``"files"``: relative paths, a folder
with a trailing ``/``) and the temporary folders it owns with everything in
them (``"temporary"``: staging folders, checkpoints being written). Each
name is recorded *before* it is written (:func:`klseg.files.record_written`,
called by every atomic writer), and the marker is replaced atomically, so a
process killed at any moment leaves no klseg file unrecorded. Files that
Keras or TensorFlow write under names klseg does not choose at the moment of
writing are klseg's by their exact names instead (:data:`OWNED`: TensorBoard
event files in ``logs/train/`` and ``logs/validation/``, ``model.keras``,
the checkpoint files), and so is the temporary file of any klseg file
(``.NAME.XXXXXXXX.tmp``, ``.STEM.tmp.SUFFIX``). Everything else, at any
depth, is someone else's: removing klseg's output removes exactly klseg's
files and folders (a folder only once it is empty) and keeps the others.

A marker without ``"files"`` was written by an older klseg: its folder's
entries are klseg's when they match :data:`LEGACY` (the names that version
wrote), and the list is filled from them the next time klseg writes there.

**The lock.** A process writing an output folder holds ``fcntl.flock`` on
``.klseg.lock`` inside it, which holds its PID and command line. The lock
dies with the process (a SIGKILL leaves no stale lock); a second process is
refused at once with a message naming the first. Within one process the lock
is counted per folder, so a job may take it again (a sweep's runs, the
demo's parts, two jobs one after the other); :func:`holds_folders` releases
what a job took when it returns or raises. The lock file is removed when the
last hold ends. Without ``fcntl`` (Windows) there is no lock.

Standard library only.
"""

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from fnmatch import fnmatchcase
from pathlib import Path

from klseg import errors
from klseg._version import __version__
from klseg.files import atomic_write_text, register_owner, unregister_owner

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "LEGACY",
    "LOCK",
    "MARKER",
    "NESTED",
    "OWNED",
    "Record",
    "acquire",
    "attach_record",
    "clear_folder",
    "held_record",
    "holder",
    "holds_folders",
    "locked",
    "marker_kind",
    "release",
]

MARKER = ".klseg.json"
LOCK = ".klseg.lock"

_CHECKPOINT_FILES = ("model.weights.h5", "optimizer.npz", "random.npz", "state.json")

#: Names klseg's files have in each kind of folder, whoever writes them (a
#: relative path; ``*`` and ``[0-9]`` within one name; a trailing ``/`` for
#: a folder, removed once empty; ``/**`` for a folder and all below it).
OWNED = {
    "run": (
        "config.yaml",
        "model.keras",
        "metrics.json",
        "history.csv",
        "report.md",
        "plots/",
        "checkpoints/",
        "checkpoints/latest.json",
        "checkpoints/epoch_[0-9]*/",
        *(f"checkpoints/epoch_[0-9]*/{name}" for name in _CHECKPOINT_FILES),
        "logs/",
        "logs/train/",
        "logs/validation/",
        "logs/train/events.out.tfevents.*",
        "logs/validation/events.out.tfevents.*",
    ),
    "sweep": ("config.yaml", "metrics.json", "report.md", "tradeoff.png"),
    "demo": (
        "demo.json",
        "metrics.json",
        "report.md",
        "plots/",
        "plots/overlays.png",
        "plots/domains.png",
    ),
    "data": ("classes.json",),
    "predictions": ("classes.json",),
    "export": ("export.json",),
}

#: Entries that are klseg output folders of their own (a sweep's runs, the
#: demo's parts): klseg's only when they carry a marker, and cleared by
#: their own record.
NESTED = {
    "sweep": ("kl_*/", "cons_*/"),
    "demo": ("data/", "source/", "finetune-plain/", "finetune-kl/", "export/"),
}


def _data_layout():
    names = ["source/", "target/"]
    for domain in ("source", "target"):
        for split in ("train", "val", "unlabeled"):
            names += [f"{domain}/{split}/"]
            for part in ("images", "masks"):
                names += [f"{domain}/{split}/{part}/"]
                names += [f"{domain}/{split}/{part}/[0-9][0-9][0-9][0-9][0-9][0-9].png"]
    return tuple(names)


#: What an older klseg (its marker lists no files) wrote beyond ``OWNED``.
LEGACY = {
    "run": ("plots/*.png", ".model.tmp.keras", "checkpoints/.epoch_*/**"),
    "sweep": (),
    "demo": ("plots/*.png",),
    "data": _data_layout(),
    "predictions": ("masks/", "overlays/", "masks/*.png", "overlays/*.png"),
    "export": (
        "saved_model.pb",
        "fingerprint.pb",
        "model.tflite",
        "model.onnx",
        "variables/**",
        "assets/**",
        "assets.extra/**",
    ),
}

#: In every kind of folder: the probe of a writable folder.
_ALWAYS = (".write-test-*",)

_MKSTEMP = re.compile(r"^\.(?P<base>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_KERAS_TMP = re.compile(r"^\.(?P<stem>.+)\.tmp(?P<suffix>\.[^./]+)$")


def _temporary_base(name):
    """The file whose temporary ``name`` is, or None."""
    match = _MKSTEMP.match(name)
    if match:
        return match["base"]
    match = _KERAS_TMP.match(name)
    if match:
        return match["stem"] + match["suffix"]
    return None


def _matches(rel, is_dir, patterns):
    parts = rel.split("/")
    for pattern in patterns:
        whole = pattern.endswith("/**")
        if whole:
            names = pattern[:-3].split("/")
            if len(parts) < len(names) or (len(parts) == len(names) and not is_dir):
                continue
        else:
            if pattern.endswith("/") != is_dir:
                continue
            names = pattern.rstrip("/").split("/")
            if len(parts) != len(names):
                continue
        if all(fnmatchcase(p, n) for p, n in zip(parts, names)):
            return True
    return False


def marker_kind(folder):
    """The kind named by the marker in ``folder``, None without a readable one."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
        return data["kind"] if data["kind"] in OWNED else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Record:
    """The record of one output folder: what klseg wrote there.

    Args:
        path: the folder.
        kind: a key of ``OWNED``.
        data: the marker's content (None for a new folder).
    """

    def __init__(self, path, kind, data=None):
        self.path = Path(path)
        self.kind = kind
        data = data if isinstance(data, dict) else {}
        self.legacy = bool(data) and "files" not in data
        self.files = set(data.get("files") or ())
        self.temporary = set(data.get("temporary") or ())
        self.created = data.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S")
        self._guard = threading.RLock()

    @classmethod
    def load(cls, path, kind):
        try:
            data = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        return cls(path, kind, data)

    # -- what is klseg's ----------------------------------------------------

    def _in_temporary(self, rel):
        return any((rel + "/").startswith(t) for t in self.temporary)

    def owns(self, rel, is_dir):
        """Whether the entry ``rel`` (relative path) is klseg's."""
        if rel == MARKER or rel.rpartition("/")[2] == LOCK:
            return True
        if self._in_temporary(rel) or (rel + "/" if is_dir else rel) in self.files:
            return True
        patterns = OWNED[self.kind] + _ALWAYS
        if self.legacy:
            patterns += LEGACY[self.kind]
        if _matches(rel, is_dir, patterns):
            return True
        if is_dir and _matches(rel, True, NESTED.get(self.kind, ())):
            return marker_kind(self.path / rel) is not None
        head, _, name = rel.rpartition("/")
        base = None if is_dir else _temporary_base(name)
        return base is not None and self.owns(f"{head}/{base}".lstrip("/"), False)

    def _whole(self, rel):
        patterns = LEGACY[self.kind] if self.legacy else ()
        return self._in_temporary(rel) or any(
            p.endswith("/**") and _matches(rel, True, (p,)) for p in patterns
        )

    # -- recording ----------------------------------------------------------

    def record(self, rels, *, whole=False):
        """Add ``rels`` (relative paths, folders ending in ``/``) and the
        folders above them that do not exist yet; ``whole``: temporary
        folders klseg owns with everything in them. Saves the marker when
        anything was new."""
        with self._guard:
            new = False
            for rel in rels:
                rel = rel.strip("/") + ("/" if rel.endswith("/") or whole else "")
                if rel.rstrip("/") in (MARKER, LOCK) or self._in_temporary(rel):
                    continue
                parts = rel.rstrip("/").split("/")
                for i in range(1, len(parts)):
                    above = "/".join(parts[:i]) + "/"
                    if above not in self.files and not (self.path / above).exists():
                        self.files.add(above)
                        new = True
                target = self.temporary if whole else self.files
                if rel not in target and not (
                    rel.endswith("/") and not whole and (self.path / rel).exists()
                ):
                    target.add(rel)
                    new = True
            if new:
                self.save()

    def prune(self):
        """Forget recorded paths that no longer exist."""
        with self._guard:
            self.files = {p for p in self.files if _exists(self.path / p)}
            self.temporary = {p for p in self.temporary if _exists(self.path / p)}

    def save(self):
        with self._guard:
            self.legacy = False
            data = {
                "kind": self.kind,
                "klseg": __version__,
                "created": self.created,
                "files": sorted(self.files),
                "temporary": sorted(self.temporary),
            }
            atomic_write_text(self.path / MARKER, json.dumps(data, indent=2) + "\n")

    def take_over_legacy(self):
        """Record what an older klseg wrote (by :data:`LEGACY`) in the list,
        in memory: the marker is saved when klseg next writes here."""
        if not self.legacy:
            return
        removed, _ = self.clear(dry=True, nested=False)
        self.files.update(r for r in removed if not self._in_temporary(r))
        self.legacy = False

    # -- removing -----------------------------------------------------------

    def clear(self, *, dry=False, skip=(), nested=True):
        """Remove klseg's entries (not the marker); keep everyone else's.

        Args:
            dry: only say what would be removed.
            skip: top-level names left alone (a staging folder in use).
            nested: clear the klseg folders inside by their own records
                (else they count as removed whole, for the listing).

        Returns:
            ``(removed, kept)``: relative paths, folders ending in ``/``;
            ``kept`` names the top-most entries of someone else's.
        """
        removed, kept = [], []
        for entry in _listdir(self.path):
            if entry.name in (MARKER, LOCK) or entry.name in skip:
                continue
            self._clear_entry(entry.name, entry, removed, kept, dry, nested)
        if not dry:
            self.prune()
        return removed, kept

    def remove(self, rel):
        """Remove klseg's files at and below ``rel``; returns what was kept."""
        path = self.path / rel
        removed, kept = [], []
        if _exists(path):
            self._clear_entry(rel, path, removed, kept, False, True)
        return kept

    def owns_entry(self, rel):
        """Whether the existing entry ``rel`` is klseg's; a symbolic link
        at a name klseg writes (a file or a folder) is, and is never
        followed."""
        path = self.path / rel
        if path.is_symlink():
            return self.owns(rel, False) or self.owns(rel, True)
        return self.owns(rel, path.is_dir())

    def _clear_entry(self, rel, path, removed, kept, dry, nested):
        is_dir = path.is_dir() and not path.is_symlink()
        owned = self.owns_entry(rel)
        if not is_dir:
            (removed if owned else kept).append(rel)
            if owned and not dry:
                path.unlink(missing_ok=True)
            return
        if owned and self._whole(rel):
            removed.append(rel + "/")
            if dry:
                removed += [
                    p.relative_to(self.path).as_posix() + ("/" if p.is_dir() else "")
                    for p in sorted(path.rglob("*"))
                ]
            else:
                shutil.rmtree(path, ignore_errors=True)
            return
        kind = marker_kind(path) if (path / MARKER).is_file() else None
        if kind is not None:
            if not owned:
                kept.append(rel + "/")
            elif not nested:
                removed.append(rel + "/")
            else:
                self._clear_nested(rel, path, kind, removed, kept, dry)
            return
        inner_removed, inner_kept = [], []
        for entry in _listdir(path):
            self._clear_entry(
                f"{rel}/{entry.name}", entry, inner_removed, inner_kept, dry, nested
            )
        removed += inner_removed
        if not owned:
            kept.append(rel + "/")
        elif inner_kept:
            kept += inner_kept
        else:
            removed.append(rel + "/")
            if not dry:
                with contextlib.suppress(OSError):
                    path.rmdir()

    def _clear_nested(self, rel, path, kind, removed, kept, dry):
        inner_removed, inner_kept = clear_folder(path, kind, dry=dry)
        removed += [f"{rel}/{r}" for r in inner_removed]
        kept += [f"{rel}/{k}" for k in inner_kept]
        if not inner_kept:
            removed.append(rel + "/")


def clear_folder(path, kind, *, dry=False):
    """Clear the klseg folder ``path`` of ``kind`` by its own record, under
    its lock; remove the folder when nothing of anyone else's stays in it
    (it keeps its marker otherwise). Returns ``(removed, kept)``."""
    if dry:
        record = held_record(path) or Record.load(path, kind)
        return record.clear(dry=True)
    with locked(path, "folder"):
        record = held_record(path) or Record.load(path, kind)
        removed, kept = record.clear()
        if not kept:
            (Path(path) / MARKER).unlink(missing_ok=True)
    if not kept:
        with contextlib.suppress(OSError):
            Path(path).rmdir()
    return removed, kept


def _listdir(path):
    try:
        return sorted(Path(path).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _exists(path):
    return os.path.lexists(str(path).rstrip("/") or "/")


# --------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------


class _Hold:
    def __init__(self, fd, path):
        self.fd = fd
        self.path = path
        self.count = 0
        self.record = None


_HELD = {}
_SCOPES = []
_GUARD = threading.RLock()


def _key(path):
    return os.path.abspath(os.path.expanduser(str(path)))


def _command():
    argv = list(sys.argv) or ["python"]
    name = os.path.basename(argv[0]) or "python"
    if name in ("-c", "-m"):
        name = f"python {name}"
    return " ".join([name, *map(shlex.quote, argv[1:])])[:300]


def holder(path):
    """``(pid, command)`` written in the lock file of ``path``, or None."""
    try:
        text = (Path(path) / LOCK).read_text(encoding="utf-8")
        pid, _, command = text.partition("\n")
        return int(pid), command.strip()
    except (OSError, ValueError):
        return None


def _busy(path, option):
    who = holder(path)
    by = (
        f"klseg process {who[0]} ({who[1]})"
        if who and who[0] != os.getpid()
        else "another klseg process"
    )
    return errors.RunError(
        f"{option} {path} is in use by {by}; wait for it to finish or choose "
        "another folder."
    )


def _lock_file(path, option, shown):
    """An open descriptor holding the lock of the folder ``path``."""
    lock = Path(path) / LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(shown, option) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its holder removed it as we opened it: again
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{_command()}\n".encode(), 0)
    return fd


def acquire(path, option="--output"):
    """Take the lock of the existing folder ``path`` (again, within one
    process). Raises :class:`klseg.errors.RunError` naming the process that
    holds it."""
    key = _key(path)
    with _GUARD:
        hold = _HELD.get(key)
        if hold is None:
            fd = _lock_file(key, option, path) if fcntl is not None else None
            hold = _HELD[key] = _Hold(fd, Path(key))
        hold.count += 1
        if _SCOPES:
            _SCOPES[-1].append(key)


def release(path):
    """Give back one :func:`acquire` of ``path``; the last one frees the
    folder (and removes its lock file)."""
    key = _key(path)
    with _GUARD:
        for scope in reversed(_SCOPES):
            if key in scope:
                scope.reverse()
                scope.remove(key)
                scope.reverse()
                break
        _release(key)


def _release(key):
    hold = _HELD.get(key)
    if hold is None:
        return
    hold.count -= 1
    if hold.count > 0:
        return
    del _HELD[key]
    unregister_owner(key)
    if hold.fd is not None:
        lock = hold.path / LOCK
        with contextlib.suppress(OSError):
            if os.stat(lock).st_ino == os.fstat(hold.fd).st_ino:
                lock.unlink()
        os.close(hold.fd)


@contextlib.contextmanager
def locked(path, option="--output"):
    """Hold the lock of ``path`` for a ``with`` block."""
    acquire(path, option)
    try:
        yield
    finally:
        release(path)


def held_record(path):
    hold = _HELD.get(_key(path))
    return hold.record if hold is not None else None


def attach_record(path, record):
    """Make ``record`` the record of the held folder ``path``: klseg's
    writers record what they write under it there from now on."""
    hold = _HELD[_key(path)]
    hold.record = record
    register_owner(hold.path, record)
    return record


def holds_folders(job):
    """Decorator for a job: the output folders it claims stay locked while
    it runs and are released when it returns or raises."""

    @functools.wraps(job)
    def run(*args, **kwargs):
        with _GUARD:
            _SCOPES.append([])
        try:
            return job(*args, **kwargs)
        finally:
            with _GUARD:
                for key in reversed(_SCOPES.pop()):
                    _release(key)

    return run
