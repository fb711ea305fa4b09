"""The one checkpoint format: ``checkpoints/epoch_NNNN/`` and ``latest.json``.

Each completed epoch writes a folder with the model weights
(``model.weights.h5``), the optimizer variables (``optimizer.npz``) and
``state.json`` (epoch, best score so far, its epoch, the monitored column,
the seed, the optimizer step). The folder is written under a temporary name
and renamed into place, then ``latest.json`` is pointed at it; the two
newest are kept. An interruption at any moment leaves the previous
checkpoint intact.
"""

import csv
import io
import json
import os
import shutil
from pathlib import Path

from klseg import errors
from klseg.files import atomic_write_text, clean_json, make_temp_dir, write_json

__all__ = ["restore_checkpoint", "save_checkpoint", "truncate_history"]


def to_numpy(variable):
    import keras

    return keras.ops.convert_to_numpy(variable.value)


def save_checkpoint(run, model, optimizer, state, keep=2):
    """Write ``checkpoints/epoch_NNNN`` then point ``latest.json`` at it."""
    import numpy as np

    run.checkpoints.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{state['epoch']:04d}"
    final = run.checkpoints / name
    tmp = make_temp_dir(run.checkpoints, f".{name}.")
    try:
        model.save_weights(tmp / "model.weights.h5")
        arrays = {
            f"v{i:05d}": np.asarray(to_numpy(v))
            for i, v in enumerate(optimizer.variables)
        }
        np.savez(tmp / "optimizer.npz", **arrays)
        atomic_write_text(
            tmp / "state.json", json.dumps(clean_json(state), indent=2) + "\n"
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(run.checkpoints / "latest.json", {"checkpoint": name})
    kept = sorted(p for p in run.checkpoints.glob("epoch_*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(folder, model, optimizer):
    """Load the weights and optimizer variables saved in ``folder``."""
    import numpy as np

    # Build the optimizer first: the weights file holds its variables too.
    optimizer.build(model.trainable_variables)
    try:
        model.load_weights(folder / "model.weights.h5")
    except Exception as e:
        raise errors.RunError(
            f"cannot restore the model weights from {folder}: {e}"
        ) from None
    try:
        with np.load(folder / "optimizer.npz") as saved:
            values = [saved[k] for k in sorted(saved.files)]
    except (OSError, ValueError) as e:
        raise errors.RunError(
            f"cannot read the optimizer state in {folder}: {e}"
        ) from None
    variables = list(optimizer.variables)
    if len(values) != len(variables) or any(
        tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values)
    ):
        raise errors.RunError(
            f"the optimizer state in {folder} does not match this model "
            f"({len(values)} saved variables, {len(variables)} expected)."
        )
    for variable, value in zip(variables, values):
        variable.assign(value)


def truncate_history(path, epochs_done):
    """Drop history rows of epochs that were not checkpointed."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    keep = [r for r in body if r and r[0].isdigit() and int(r[0]) < epochs_done]
    text = io.StringIO()
    csv.writer(text).writerows([header, *keep])
    atomic_write_text(path, text.getvalue())
