"""A folder has one writer at a time, and klseg removes only the files it
wrote (:mod:`klseg.runs.ownership`, :mod:`klseg.runs.folder`).

Each test is a reproduction: a user's files at several depths inside klseg's
own sub-folders survive ``--overwrite`` of a run, a data set, predictions
and an export; a second process on a folder in use is refused at once,
naming the first, and the folder is usable again the moment the first is
killed; a file klseg recorded and never finished (a killed process) is
still klseg's.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import helpers
import pytest
from helpers import SIZE, ok, predict_args, refused

from klseg.runs.folder import LOCK, MARKER, OutputFolder, RunFolder

BENCH = {"num_train": 4, "num_val": 2, "num_unlabeled": 2}
TINY = ["--base-filters", "4", "--depth", "2", "--image-size", str(SIZE)]
TINY += ["--batch-size", "2", "--epochs", "1"]
SYNTH = ["--image-size", "16", "--num-train", "2", "--num-val", "1"]
SYNTH += ["--num-unlabeled", "1"]


def train_args(bench, out, *more):
    return [*helpers.train_args(bench, out), *TINY, *more]


def plant(root, files):
    """Write the user's ``files`` (relative paths; one ending in ``/`` is an
    empty folder) under ``root``; returns ``{path: bytes}`` to check later."""
    written = {}
    for rel in files:
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"mine: {rel}\n".encode())
        written[rel] = path.read_bytes()
    return written


def assert_kept(root, files, planted):
    for rel in files:
        assert (root / rel).exists(), f"lost {rel}"
    for rel, content in planted.items():
        assert (root / rel).read_bytes() == content, f"changed {rel}"


def kept_line(output):
    lines = [line for line in output.splitlines() if line.startswith("Kept ")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def model(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "source"
    ok(*train_args(bench, out), "--quiet")
    return out / "model.keras"


# --------------------------------------------------------------------------
# --overwrite removes klseg's files only, at every depth
# --------------------------------------------------------------------------

RUN_USER_FILES = [
    "notes.txt",
    "plots/notes.txt",
    "logs/mine/",
    "logs/mine/a.txt",
    "logs/train/mine.txt",
    "checkpoints/mine.txt",
    "checkpoints/epoch_0001/notes.txt",
]


def test_overwrite_of_a_run_keeps_the_users_files_at_every_depth(bench, tmp_path):
    out = tmp_path / "run"
    ok(*train_args(bench, out), "--quiet")
    old_events = sorted((out / "logs" / "train").glob("events.out.tfevents.*"))
    old_plots = sorted((out / "plots").glob("*.png"))
    assert old_events and old_plots
    planted = plant(out, RUN_USER_FILES)
    result = ok(*train_args(bench, out), "--overwrite")
    assert_kept(out, RUN_USER_FILES, planted)
    line = kept_line(result.output)
    assert line.startswith("Kept 6 files klseg did not write: ")
    for name in ("notes.txt", "plots/notes.txt", "logs/mine/", "logs/train/mine.txt"):
        assert name in line
    assert "logs/mine/a.txt" not in line  # the folder is named, not its files
    # klseg's own earlier files are gone: the new run's are all there is.
    assert not any(p.exists() for p in old_events)
    new_events = sorted((out / "logs" / "train").glob("events.out.tfevents.*"))
    assert len(new_events) == 1
    state = json.loads((out / "checkpoints" / "epoch_0001" / "state.json").read_text())
    assert state["epoch"] == 1
    assert (out / "model.keras").is_file() and (out / "metrics.json").is_file()
    assert not (out / LOCK).exists()  # released when the run ended


def test_overwrite_of_a_data_set_keeps_the_users_files(tmp_path):
    out = tmp_path / "data"
    ok("data", "synth", "-o", out, *SYNTH)
    files = [
        "source/mynote.txt",
        "source/mine/",
        "source/train/images/note.txt",
        "target/val/masks/mine/x.txt",
    ]
    planted = plant(out, files)
    result = ok("data", "synth", "-o", out, *SYNTH, "--overwrite")
    assert_kept(out, files, planted)
    line = kept_line(result.output)
    assert line == (
        "Kept 4 files klseg did not write: source/mine/, source/mynote.txt, "
        "source/train/images/note.txt, target/val/masks/mine/"
    )
    images = sorted(p.name for p in (out / "source" / "train" / "images").iterdir())
    assert images == ["000000.png", "000001.png", "note.txt"]


def test_overwrite_of_predictions_keeps_the_users_files(bench, model, tmp_path):
    out = tmp_path / "pred"
    ok(*predict_args(model, bench / "target" / "val", out), "--overlay")
    files = ["masks/notes.txt", "overlays/mine/x.png", "notes.txt"]
    planted = plant(out, files)
    args = predict_args(model, bench / "target" / "val", out)
    result = ok(*args, "--no-overlay", "--overwrite")
    assert_kept(out, files, planted)
    assert "masks/notes.txt" in kept_line(result.output)
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks == ["000000.png", "000001.png", "notes.txt"]
    # The earlier overlays are klseg's and go; the user's folder stays.
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["mine"]


def test_predictions_never_replace_a_users_file(bench, model, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(bench / "target" / "val" / "images" / "000000.png", one)
    out = tmp_path / "pred"
    ok(*predict_args(model, one, out))
    planted = plant(out, ["masks/000001.png"])  # a name klseg never wrote here
    result = refused(*predict_args(model, bench / "target" / "val", out), "--overwrite")
    assert "masks/000001.png" in result.output and "did not write" in result.output
    assert_kept(out, ["masks/000001.png", "masks/000000.png"], planted)


def test_overwrite_of_an_export_keeps_the_users_files(model, tmp_path):
    out = tmp_path / "export"
    ok("export", "--model", model, "--output", out)
    files = ["variables/notes.txt", "assets/mine.txt", "NOTES.txt"]
    planted = plant(out, files)
    result = ok("export", "--model", model, "--output", out, "--overwrite")
    assert_kept(out, files, planted)
    assert "variables/notes.txt" in kept_line(result.output)
    assert (out / "saved_model.pb").is_file()
    assert json.loads((out / "export.json").read_text())["format"] == "saved_model"


def test_nested_klseg_folders_keep_the_users_files(tmp_path):
    """The demo's parts and a sweep's runs are klseg folders of their own:
    the outer overwrite clears them by their own record."""
    from klseg.files import write_json
    from klseg.runs.ownership import holds_folders

    demo = tmp_path / "demo"

    @holds_folders
    def write_demo(replace):
        OutputFolder(demo, "demo").claim(replace=replace)
        write_json(demo / "demo.json", {})
        write_json(demo / "plots" / "extra.png", {})  # a name only the record has
        run = RunFolder(demo / "source").claim()
        write_json(run.metrics, {})
        write_json(run.plots / "training_curves.png", {})

    write_demo(False)
    files = ["source/plots/mine.txt", "plots/mine.txt", "source/mynote.txt"]
    planted = plant(demo, files)
    said = []
    folder = OutputFolder(demo, "demo", say=said.append).claim(replace=True)
    folder.release()
    assert_kept(demo, files, planted)
    assert said == [
        "Kept 3 files klseg did not write: plots/mine.txt, source/mynote.txt, "
        "source/plots/mine.txt"
    ]
    assert not (demo / "plots" / "extra.png").exists()
    assert not (demo / "source" / "metrics.json").exists()
    assert not (demo / "source" / "plots" / "training_curves.png").exists()
    assert (demo / "source" / MARKER).is_file()  # still a klseg run folder
    write_demo(False)  # the demo writes into it again


def test_a_folder_from_an_older_klseg_is_recognised_by_names(tmp_path):
    out = tmp_path / "run"
    plant(out, ["plots/training_curves.png", "config.yaml", "logs/train/x/"])
    (out / "logs" / "train" / "events.out.tfevents.1.host.2.v2").write_bytes(b"")
    (out / MARKER).write_text(json.dumps({"kind": "run", "klseg": "0.0.9"}))
    planted = plant(out, ["plots/notes.txt"])
    said = []
    OutputFolder(out, "run", say=said.append).claim(replace=True).release()
    assert_kept(out, ["plots/notes.txt"], planted)
    assert said == ["Kept 2 files klseg did not write: logs/train/x/, plots/notes.txt"]
    assert not (out / "plots" / "training_curves.png").exists()
    assert not (out / "config.yaml").exists()
    assert "files" in json.loads((out / MARKER).read_text())


# --------------------------------------------------------------------------
# a killed writer: what it recorded and never finished is still klseg's
# --------------------------------------------------------------------------

KILLED_WRITER = """
import sys, time
from pathlib import Path
from klseg.files import make_temp_dir, record_written
from klseg.runs.folder import RunFolder

run = RunFolder(sys.argv[1]).claim()
half = run.plots / "confusion_half.png"
record_written(half)            # recorded before writing, as klseg's writers do
half.parent.mkdir(parents=True, exist_ok=True)
half.write_bytes(b"\\x89PNG half")
tmp = make_temp_dir(run.checkpoints, ".epoch_0002.")
(tmp / "model.weights.h5").write_bytes(b"half")
done = run.checkpoints / "epoch_0002" / "model.weights.h5"
done.parent.mkdir(parents=True)
done.write_bytes(b"half")  # Keras' own file: klseg's by its name
print("writing", flush=True)
time.sleep(120)
"""


def start(code, *args):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() in ("writing", "locked")
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_file_being_written_when_killed_is_still_klsegs(tmp_path):
    out = tmp_path / "run"
    proc = start(KILLED_WRITER, out)
    kill(proc)
    planted = plant(out, ["plots/notes.txt", "checkpoints/epoch_0002/mine.txt"])
    said = []
    OutputFolder(out, "run", say=said.append).claim(replace=True).release()
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == [
        MARKER,
        "checkpoints",
        "checkpoints/epoch_0002",
        "checkpoints/epoch_0002/mine.txt",
        "plots",
        "plots/notes.txt",
    ]
    assert_kept(out, planted, planted)
    assert said == [
        "Kept 2 files klseg did not write: checkpoints/epoch_0002/mine.txt, "
        "plots/notes.txt"
    ]


# --------------------------------------------------------------------------
# one writer per folder
# --------------------------------------------------------------------------

HOLDER = """
import sys, time
from klseg.runs.folder import OutputFolder

OutputFolder(sys.argv[1], sys.argv[2]).lock()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("command", ["train", "synth", "predict"])
def test_a_second_process_is_refused_at_once_and_free_after_a_kill(
    bench, model, tmp_path, command
):
    out = tmp_path / "out"
    args, kind = {
        "train": (train_args(bench, out, "--quiet"), "run"),
        "synth": (["data", "synth", "-o", out, *SYNTH], "data"),
        "predict": (predict_args(model, bench / "target" / "val", out), "predictions"),
    }[command]
    proc = start(HOLDER, out, kind)
    try:
        started = time.monotonic()
        result = refused(*args)
        assert time.monotonic() - started < 60  # no waiting for the holder
        assert (
            f"--output {out} is in use by klseg process {proc.pid} (python -c "
            in result.output
        )
        assert "wait for it to finish or choose another folder" in result.output
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written
    finally:
        kill(proc)
    ok(*args)  # the lock died with its process
    assert (out / MARKER).is_file() and not (out / LOCK).exists()


def test_resume_and_overwrite_are_refused_while_a_run_writes(bench, tmp_path):
    out = tmp_path / "run"
    ok(*train_args(bench, out), "--quiet")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    proc = start(HOLDER, out, "run")
    try:
        for more in (["--overwrite"], ["--resume", "--epochs", "2"]):
            result = refused(*train_args(bench, out, "--quiet"), *more)
            assert f"in use by klseg process {proc.pid}" in result.output
        after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        assert after == sorted([*before, LOCK])  # nothing removed
    finally:
        kill(proc)


def test_one_process_may_take_its_own_lock_again(bench, tmp_path):
    from klseg import runs

    out = tmp_path / "run"
    first = OutputFolder(out, "run").lock()
    second = RunFolder(out).lock()  # the same process: counted, not refused
    cfg = helpers.train_config(bench, out)
    runs.train(cfg)  # a job in this process while it holds the folder
    runs.train(helpers.train_config(bench, out, overwrite=True))
    assert (out / LOCK).is_file()
    second.release()
    assert (out / LOCK).is_file()
    first.release()
    assert not (out / LOCK).exists()
    assert (out / "model.keras").is_file()
