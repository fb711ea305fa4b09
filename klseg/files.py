"""Atomic writers: every file klseg writes that a later step relies on.

Each writer writes to a temporary name in the destination folder and renames
it into place, so an interruption leaves either the old file or the new one,
never half of one. Files and folders get the permissions an ordinary
``open``/``mkdir`` would give them under the process umask (``tempfile``
alone would make them 0600 / 0700).

Each writer also records the name it is about to write in the output folder
that holds it (:func:`record_written`), before writing: the record of what
klseg wrote there (see :mod:`klseg.runs.ownership`), so that klseg later
removes its own files only, even after a process was killed mid-write.

Standard library only at import; numpy, Pillow and PyYAML load on first use.
"""

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "clean_json",
    "make_temp_dir",
    "read_yaml",
    "record_tree",
    "record_written",
    "register_owner",
    "remove_written",
    "replace_dir",
    "save_model",
    "write_json",
    "write_png",
    "write_yaml",
    "yaml_text",
]


#: ``{absolute folder: record}`` of the output folders open in this process.
_OWNERS = {}


def register_owner(folder, record):
    """Record from now on what the writers here write under ``folder`` in
    ``record``: an object with ``record(relative_paths, whole=False)`` and
    ``remove(relative_path)`` (a :class:`klseg.runs.ownership.Record`)."""
    _OWNERS[os.path.abspath(folder)] = record


def unregister_owner(folder):
    _OWNERS.pop(os.path.abspath(folder), None)


def _owner_of(path):
    """``(record, relative path)`` of the nearest open folder above ``path``."""
    if not _OWNERS:
        return None, None
    path = os.path.abspath(path)
    folder = path
    while True:
        parent = os.path.dirname(folder)
        if parent == folder:
            return None, None
        folder = parent
        if folder in _OWNERS:
            return _OWNERS[folder], Path(os.path.relpath(path, folder)).as_posix()


def record_written(path, *, folder=False, whole=False):
    """Record, before writing it, that klseg writes ``path`` (a file; a
    folder with ``folder``; with ``whole`` a temporary folder that is klseg's
    with everything in it) in the output folder open above it, if any."""
    record, rel = _owner_of(path)
    if record is not None:
        record.record([rel + ("/" if folder else "")], whole=whole)


def record_tree(source, path):
    """Record, before moving it there, that the folder ``source`` becomes
    ``path``: ``path`` and everything in ``source`` under its new name."""
    record, rel = _owner_of(path)
    if record is None:
        return
    source = Path(source)
    names = [rel + "/"] if rel != "." else []
    prefix = "" if rel == "." else rel + "/"
    for item in sorted(source.rglob("*")):
        name = prefix + item.relative_to(source).as_posix()
        names.append(name + ("/" if item.is_dir() and not item.is_symlink() else ""))
    record.record(names)


def remove_written(path):
    """Remove what klseg wrote at and below ``path``, keeping anything else
    when an open output folder holds it (all of it otherwise).

    Returns:
        The paths kept (relative to that output folder).
    """
    path = Path(path)
    record, rel = _owner_of(path)
    if record is not None:
        return record.remove(rel)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return []


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_mode(path, *, folder=False):
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    For writers that take a file name (``fig.savefig(tmp)``, ``np.save``):
    the file appears at ``path`` complete, with umask permissions, or not
    at all.
    """
    path = Path(path)
    record_written(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fix_mode(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def clean_json(value):
    """``value`` with NaN/inf as ``None`` (JSON has no NaN), tuples and paths
    as lists and strings, and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, data):
    """Write ``data`` as indented JSON (atomically); NaN is written as null."""
    return atomic_write_text(path, json.dumps(clean_json(data), indent=2) + "\n")


def yaml_text(data):
    """``data`` as block-style YAML in the given key order."""
    import yaml

    return yaml.safe_dump(clean_json(data), sort_keys=False, default_flow_style=None)


def write_yaml(path, data):
    """Write ``data`` as YAML (atomically)."""
    return atomic_write_text(path, yaml_text(data))


def read_yaml(path):
    """The mapping in a YAML file (``{}`` for an empty file)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def write_png(path, array, palette=None):
    """Write a uint8 array as PNG (atomically); with ``palette`` as an index
    image whose values stay the class indices (colours are for viewers)."""
    from PIL import Image

    image = Image.fromarray(array)
    if palette is not None:
        flat = [int(c) for rgb in palette for c in rgb]
        image.putpalette(flat + [0] * (768 - len(flat)))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_model(model, path):
    """``model.save(path)`` for a ``.keras`` path, atomically."""
    path = Path(path)
    record_written(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(tmp)
        _fix_mode(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def make_temp_dir(parent, prefix):
    """A new hidden folder in ``parent`` with umask permissions (not 0700),
    to be renamed into place when complete; recorded as klseg's (with all
    it will hold) before it is made."""
    parent = Path(parent)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        record_written(path, whole=True)
        parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _fix_mode(path, folder=True)
        return path


def replace_dir(new, path):
    """Move the complete folder ``new`` to ``path``, replacing a folder there.

    The old folder is moved aside first and deleted only once the new one is
    in place, so a failure leaves the old one. ``new`` and ``path`` must be
    on the same file system (create ``new`` with :func:`make_temp_dir` in
    ``path``'s parent).
    """
    new, path = Path(new), Path(path)
    record_tree(new, path)
    if not path.exists():
        os.replace(new, path)
        return path
    aside = make_temp_dir(path.parent, f".{path.name}.old.")
    try:
        os.replace(path, aside / "old")
        try:
            os.replace(new, path)
        except OSError:
            os.replace(aside / "old", path)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return path
