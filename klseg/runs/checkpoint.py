"""The one checkpoint format: ``checkpoints/epoch_NNNN/`` and ``latest.json``.

Each completed epoch writes a folder with the model weights
(``model.weights.h5``), the optimizer variables (``optimizer.npz``), the
random-number state of the model's layers (``random.npz``: the seed
generators of dropout layers, which Keras leaves out of the weights file)
and ``state.json`` (epoch, best score so far, its epoch, the monitored
column, the seed, the optimizer step, the steps per epoch, the rows of
``history.csv`` up to that epoch, and the size and SHA-256 of each file).
The folder is written under a temporary name and renamed into place, then
``latest.json`` is pointed at it; the two newest are kept (pruning removes
klseg's files only: anything else kept in a checkpoint folder stays). An
interruption at any moment leaves the previous checkpoint intact, and a
checkpoint damaged afterwards (a truncated or edited file, a missing
``state.json``) is detected by :func:`usable_checkpoints` before anything is
loaded from it.

With the data streams started where the checkpoint left them
(``klseg.data.make_dataset(skip=...)``), a resumed run is the run that was
interrupted: same batches, same augmentation, same dropout masks.
"""

import csv
import io
import json
import os
import shutil
from pathlib import Path

from klseg import errors
from klseg.files import (
    atomic_write_text,
    clean_json,
    make_temp_dir,
    remove_written,
    write_json,
)

__all__ = [
    "check_history",
    "history_record",
    "read_history",
    "restore_checkpoint",
    "save_checkpoint",
    "settle_history",
    "usable_checkpoints",
]

FILES = ("model.weights.h5", "optimizer.npz", "random.npz")


def to_numpy(variable):
    import keras

    return keras.ops.convert_to_numpy(variable.value)


def random_state_variables(model):
    """The model's variables that its weights file leaves out: the states of
    the seed generators (dropout), in a fixed order."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _digest(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_arrays(path, variables):
    import numpy as np

    arrays = {f"v{i:05d}": np.asarray(to_numpy(v)) for i, v in enumerate(variables)}
    np.savez(path, **arrays)


def _load_arrays(path, variables, what, folder):
    import numpy as np

    try:
        with np.load(path) as saved:
            values = [saved[k] for k in sorted(saved.files)]
    except (OSError, ValueError, KeyError) as e:
        raise errors.RunError(f"cannot read the {what} in {folder}: {e}") from None
    if len(values) != len(variables) or any(
        tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values)
    ):
        raise errors.RunError(
            f"the {what} in {folder} does not match this model "
            f"({len(values)} saved variables, {len(variables)} expected)."
        )
    for variable, value in zip(variables, values):
        variable.assign(value)


def save_checkpoint(run, model, optimizer, state, keep=2):
    """Write ``checkpoints/epoch_NNNN`` then point ``latest.json`` at it."""

    run.checkpoints.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{state['epoch']:04d}"
    final = run.checkpoints / name
    tmp = make_temp_dir(run.checkpoints, f".{name}.")
    try:
        model.save_weights(tmp / "model.weights.h5")
        _save_arrays(tmp / "optimizer.npz", optimizer.variables)
        _save_arrays(tmp / "random.npz", random_state_variables(model))
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _digest(tmp / name)}
            for name in FILES
        }
        atomic_write_text(
            tmp / "state.json",
            json.dumps(clean_json({**state, "files": files}), indent=2) + "\n",
        )
        _replace_checkpoint(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(run.checkpoints / "latest.json", {"checkpoint": name})
    kept = sorted(p for p in run.checkpoints.glob("epoch_*") if p.is_dir())
    for old in kept[:-keep]:
        remove_written(old)


def _replace_checkpoint(tmp, final):
    """Move the complete checkpoint ``tmp`` to ``final``. An earlier one
    there loses klseg's files only: a folder that stays (someone else's
    files in it) gets the new files one by one."""
    if final.exists():
        remove_written(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    for entry in sorted(tmp.iterdir()):
        os.replace(entry, final / entry.name)


def _check_files(folder, state):
    """Why the files of a checkpoint do not match its record, or None."""
    for name, record in (state.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record.get("bytes"):
            return (
                f"{name} has {path.stat().st_size} bytes, {record.get('bytes')} written"
            )
        if _digest(path) != record.get("sha256"):
            return f"{name} was changed after it was written"
    if not state.get("files") and not (folder / "model.weights.h5").is_file():
        return "model.weights.h5 is missing"
    return None


def _read_state(folder):
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "state.json is missing"
    except (OSError, ValueError) as e:
        return None, f"state.json is unreadable ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        return None, "state.json has no epoch"
    return state, None


def usable_checkpoints(checkpoints):
    """The checkpoints in the folder ``checkpoints``, newest first.

    Returns:
        ``(usable, damaged)``: ``usable`` is a list of ``(folder, state)``
        whose files match their record (sizes and SHA-256); ``damaged`` is
        a list of ``"epoch_NNNN: why"`` for the others. ``latest.json``
        names the newest for a reader; the folders themselves are the record
        (each is renamed into place only once complete).
    """
    folders = sorted(
        (p for p in Path(checkpoints).glob("epoch_*") if p.is_dir()), reverse=True
    )
    usable, damaged = [], []
    for folder in folders:
        state, why = _read_state(folder)
        if state is not None:
            why = _check_files(folder, state)
        if why is None:
            usable.append((folder, state))
        else:
            damaged.append(f"{folder.name}: {why}")
    return usable, damaged


def restore_checkpoint(folder, model, optimizer):
    """Load the weights, optimizer variables and random state saved in ``folder``."""
    # Build the optimizer first: the weights file holds its variables too.
    optimizer.build(model.trainable_variables)
    try:
        model.load_weights(folder / "model.weights.h5")
    except Exception as e:
        raise errors.RunError(
            f"cannot restore the model weights from {folder}: {e}"
        ) from None
    _load_arrays(
        folder / "optimizer.npz", list(optimizer.variables), "optimizer state", folder
    )
    if (folder / "random.npz").is_file():  # absent in older checkpoints
        _load_arrays(
            folder / "random.npz",
            random_state_variables(model),
            "random state",
            folder,
        )


def read_history(path):
    """``(columns, rows)`` of a ``history.csv`` (lists of strings), or None
    when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = [r for r in csv.reader(f) if r]
    return (rows[0], rows[1:]) if rows else ([], [])


def history_record(path):
    """What a checkpoint keeps of ``history.csv`` to rebuild it from:
    ``{"columns": [...], "rows": [[...], ...]}``, or None without a file."""
    read = read_history(path)
    return None if read is None else {"columns": read[0], "rows": read[1]}


def _history_damage(read, epochs_done, columns):
    """Why the rows of the epochs ``0..epochs_done - 1`` are not all there
    once each, complete, under ``columns`` (None: not recorded), or None."""
    if read is None:
        return "it is missing"
    header, rows = read
    if not header or header[0] != "epoch" or (columns and header != columns):
        return "its header is not the run's columns"
    epochs = []
    for row in rows:
        if len(row) != len(header):
            return f"a row has {len(row)} of {len(header)} fields"
        if not row[0].isdigit():
            return f"a row has the epoch {row[0]!r}"
        if int(row[0]) < epochs_done:
            epochs.append(int(row[0]))
    if epochs != list(range(epochs_done)):
        return f"its epochs are {epochs}, not 0..{epochs_done - 1} once each"
    return None


def _write_history(path, columns, rows):
    text = io.StringIO()
    csv.writer(text).writerows([columns, *rows])
    atomic_write_text(path, text.getvalue())


def check_history(path, state, checkpoint_name="the checkpoint"):
    """Why ``history.csv`` is not the history of the checkpoint whose state
    is ``state`` (it lacks a row of the epochs ``0..N-1``, holds one twice
    or incomplete, or has other columns), or None when it is.

    Raises:
        klseg.errors.RunError: it is not, and the checkpoint (written by an
            older klseg) holds no copy of the history to rebuild it from.
    """
    path = Path(path)
    record = state.get("history") or None
    columns = record["columns"] if record else None
    why = _history_damage(read_history(path), int(state["epoch"]), columns)
    if why is not None and record is None:
        raise errors.RunError(
            f"cannot resume: {path} does not match {checkpoint_name} ({why}), "
            "and the checkpoint (written by an older klseg) holds no copy of "
            "the history to rebuild it from. Nothing was changed. Put the "
            "history back, or start the run over with --overwrite."
        )
    return why


def settle_history(path, state, checkpoint_name="the checkpoint"):
    """Make ``history.csv`` the history of the checkpoint resumed from.

    Rows of epochs past the checkpoint (written before an interruption
    stopped the checkpoint) are dropped. A history that :func:`check_history`
    finds damaged is rebuilt from the rows the checkpoint recorded
    (``state["history"]``).

    Returns:
        A line saying what was rebuilt, or None when the file was sound.

    Raises:
        klseg.errors.RunError: see :func:`check_history`.
    """
    path = Path(path)
    epochs_done = int(state["epoch"])
    why = check_history(path, state, checkpoint_name)
    if why is None:
        header, rows = read_history(path)
        keep = [r for r in rows if int(r[0]) < epochs_done]
        if len(keep) != len(rows):
            _write_history(path, header, keep)
        return None
    record = state["history"]
    rows = [r for r in record["rows"] if int(r[0]) < epochs_done]
    _write_history(path, record["columns"], rows)
    return f"Rebuilt {path.name} from {checkpoint_name} ({why}): {len(rows)} epochs."
