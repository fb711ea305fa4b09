"""klseg never loses a user's files: the data-safety reproductions of the
output-folder policy (:mod:`klseg.runs.folder`), run through the command line.

Every test that points klseg at a folder holding someone else's files takes a
snapshot of the folder first (every file's bytes) and checks afterwards that
each of those files is still there, byte for byte. Refused commands must also
leave the folder exactly as it was (no marker, no partial output).
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import SIZE, ok, predict_args, refused
from PIL import Image

from klseg.data import synthetic
from klseg.runs.folder import MARKER

TINY_MODEL = ["--base-filters", "4", "--depth", "2"]
TINY_RUN = ["--image-size", str(SIZE), "--batch-size", "2", "--epochs", "1"]


def snapshot(root, only=None):
    """``{relative path: bytes}`` of every file under ``root`` (folders as
    ``None``), so that a later comparison sees any change, loss or addition;
    only under the top-level entries named in ``only`` when given."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if only is None or rel.split("/")[0] in only:
            tree[rel] = None if path.is_dir() else path.read_bytes()
    return tree


def assert_kept(before, root):
    """Every entry of the snapshot ``before`` is still under ``root``, with
    the same bytes (klseg may have added its own entries beside them)."""
    after = snapshot(root)
    missing = sorted(set(before) - set(after))
    assert not missing, f"lost under {root}: {missing}"
    changed = sorted(k for k, v in before.items() if after[k] != v)
    assert not changed, f"changed under {root}: {changed}"


def user_project(root, data):
    """The issue's reproduction: a project folder with a config, a thesis
    and a copy of the training data, none of it written by klseg."""
    root.mkdir()
    (root / "config.yaml").write_text("lr: 0.1\n")
    (root / "thesis.txt").write_text("x\n")
    shutil.copytree(data, root / "mydata")
    return root


def write_mask(path, values):
    Image.fromarray(np.asarray(values, dtype=np.uint8)).save(path)


def copy_with_bad_mask(folder, dest, value):
    """A copy of a labelled folder whose second mask holds ``value`` in one
    pixel; returns the copy and the name of that mask."""
    shutil.copytree(folder, dest)
    name = sorted(p.name for p in (dest / "masks").iterdir())[1]
    mask = np.asarray(Image.open(dest / "masks" / name)).copy()
    mask[3, 5] = value
    write_mask(dest / "masks" / name, mask)
    return dest, name


BENCH = {"num_train": 4, "num_val": 2, "num_unlabeled": 2}


def train_args(bench, output):
    return [*helpers.train_args(bench, output), *TINY_MODEL, *TINY_RUN, "--quiet"]


@pytest.fixture(scope="module")
def source_run(bench, tmp_path_factory):
    """A one-epoch training run (the source model of the other commands),
    trained under umask 022 so that its permissions can be checked."""
    out = tmp_path_factory.mktemp("runs") / "source"
    old = os.umask(0o022)
    try:
        ok(*train_args(bench, out))
    finally:
        os.umask(old)
    return out


@pytest.fixture(scope="module")
def model(source_run):
    return source_run / "model.keras"


def finetune_args(bench, model, output):
    return [*helpers.finetune_args(bench, model, output), *TINY_RUN, "--quiet"]


# --------------------------------------------------------------------------
# a folder klseg did not write is refused and never emptied
# --------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_train_refuses_a_users_project_folder(bench, tmp_path, overwrite):
    proj = user_project(tmp_path / "proj", bench / "source")
    before = snapshot(proj)
    result = refused(*train_args(bench, proj), *overwrite)
    assert f"--output {proj} is not empty and was not written by klseg" in (
        result.output
    )
    assert "thesis.txt" in result.output
    assert snapshot(proj) == before  # nothing lost, nothing added (no marker)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_finetune_refuses_a_users_project_folder(bench, model, tmp_path, overwrite):
    proj = user_project(tmp_path / "proj", bench / "source")
    before = snapshot(proj)
    result = refused(*finetune_args(bench, model, proj), *overwrite)
    assert f"{proj} is not empty and was not written by klseg" in result.output
    assert snapshot(proj) == before


@pytest.mark.parametrize("command", ["sweep", "demo"])
def test_sweep_and_demo_refuse_a_users_project_folder(bench, model, tmp_path, command):
    proj = user_project(tmp_path / "proj", bench / "source")
    before = snapshot(proj)
    if command == "sweep":
        args = [*finetune_args(bench, model, proj), "--kl-weight", "0,0.5"]
    else:
        args = ["demo", "--quick", "--output", proj, "--quiet"]
    for extra in ([], ["--overwrite"]):
        result = refused(*args, *extra)
        assert f"{proj} is not empty and was not written by klseg" in result.output
    assert snapshot(proj) == before


def test_the_installed_command_refuses_and_keeps_everything(bench, tmp_path):
    """The console script itself, in its own process: exit status 1, the
    message on stderr, not a file lost."""
    klseg = Path(sys.executable).with_name("klseg")
    assert klseg.is_file(), "pip install -e . installs the klseg command"
    proj = user_project(tmp_path / "proj", bench / "source")
    before = snapshot(proj)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [klseg, "data", "synth", "--output", proj, "--overwrite"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert f"--output {proj} is not empty and was not written by klseg" in (done.stderr)
    assert "Traceback" not in done.stderr
    assert snapshot(proj) == before


def test_a_folder_holding_only_a_config_is_not_a_run(bench, tmp_path):
    """A config.yaml alone (the name klseg uses) does not make a run folder."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.yaml").write_text("lr: 0.1\n")
    before = snapshot(proj)
    for extra in ([], ["--overwrite"]):
        result = refused(*train_args(bench, proj), *extra)
        assert str(proj) in result.output
    assert snapshot(proj) == before
    result = refused(*train_args(bench, proj), "--resume")
    assert f"nothing to resume in {proj}" in result.output
    assert snapshot(proj) == before


# --------------------------------------------------------------------------
# inputs are never outputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_train_output_containing_its_data_is_refused(bench, tmp_path, overwrite):
    proj = tmp_path / "proj2"
    proj.mkdir()
    shutil.copytree(bench / "source", proj / "mydata")
    before = snapshot(proj)
    result = refused(
        "train",
        "--data",
        proj / "mydata" / "train",
        "--val-data",
        bench / "source" / "val",
        "--output",
        proj,
        *TINY_MODEL,
        *TINY_RUN,
        *overwrite,
    )
    assert f"output {proj} contains the input data {proj / 'mydata' / 'train'}" in (
        result.output
    )
    assert snapshot(proj) == before


def test_train_output_inside_its_data_is_refused(bench, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(bench / "source" / "train", data)
    val = tmp_path / "val"
    shutil.copytree(bench / "source" / "val", val)
    before = snapshot(tmp_path)
    for option, output in (("data", data / "run"), ("val_data", val / "masks")):
        result = refused(
            "train",
            "--data",
            data,
            "--val-data",
            val,
            "--output",
            output,
            *TINY_MODEL,
            *TINY_RUN,
        )
        assert f"output {output} lies inside the input {option}" in result.output
    assert snapshot(tmp_path) == before


def test_finetune_output_inside_an_input_is_refused(bench, model, tmp_path):
    data = tmp_path / "target"
    shutil.copytree(bench / "target", data)
    before = snapshot(data)
    out = data / "val" / "run"
    args = finetune_args(bench, model, out)
    args[args.index("--val-data") + 1] = data / "val"
    result = refused(*args)
    assert f"output {out} lies inside the input val_data {data / 'val'}" in (
        result.output
    )
    assert snapshot(data) == before


def test_predict_output_inside_or_equal_to_its_images_is_refused(
    bench, model, tmp_path
):
    images = tmp_path / "labelled"
    shutil.copytree(bench / "target" / "val", images)
    before = snapshot(images)
    for output, relation in ((images / "pred", "lies inside"), (images, "is")):
        result = refused(
            *predict_args(model, images, output),
            "--overwrite",
        )
        assert f"--output {output} {relation} the input --images {images}" in (
            result.output
        )
    assert snapshot(images) == before


def test_an_input_reached_through_a_link_is_still_an_input(bench, model, tmp_path):
    """A symbolic link must not hide that an output and an input overlap."""
    pred = tmp_path / "pred"
    ok(
        *predict_args(model, bench / "target" / "val", pred),
        "--quiet",
    )
    (tmp_path / "alias").symlink_to(pred)
    before = snapshot(pred)
    result = refused(
        *predict_args(model, tmp_path / "alias" / "overlays", pred),
        "--overwrite",
    )
    assert f"--output {pred} contains the input --images" in result.output
    assert snapshot(pred) == before  # the overlays read as input are intact

    data = tmp_path / "train"
    shutil.copytree(bench / "source" / "train", data)
    (tmp_path / "data-link").symlink_to(data)
    before = snapshot(data)
    out = tmp_path / "data-link" / "run"
    result = refused(
        "train",
        "--data",
        data,
        "--val-data",
        bench / "source" / "val",
        "--output",
        out,
        *TINY_MODEL,
        *TINY_RUN,
    )
    assert f"output {out} lies inside the input data {data}" in result.output
    assert snapshot(data) == before


# --------------------------------------------------------------------------
# --overwrite and reuse replace only klseg's own entries
# --------------------------------------------------------------------------


def test_overwrite_replaces_a_run_and_keeps_the_users_files(
    bench, source_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(source_run, run)
    (run / "notes.txt").write_text("my notes\n")
    (run / "extra").mkdir()
    (run / "extra" / "figure.svg").write_text("<svg/>")
    user = snapshot(run, only=("notes.txt", "extra"))
    # klseg's own entries: a stale file inside one shows the run is replaced;
    # one of them made a link to the user's folder, which must survive.
    stale = run / "checkpoints" / "epoch_0009" / "state.json"  # a klseg name
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("a,b\n1,2\n")
    mine_before = snapshot(mine)
    shutil.rmtree(run / "logs")
    (run / "logs").symlink_to(mine)
    before = snapshot(run)
    old_model = (run / "model.keras").stat().st_mtime_ns  # copytree keeps it

    result = refused(*train_args(bench, run))
    assert f"--output {run} already holds a klseg training run" in result.output
    assert "--overwrite" in result.output
    assert snapshot(run) == before  # the refusal changed nothing
    ok(*train_args(bench, run), "--overwrite")

    assert_kept(user, run)
    assert snapshot(mine) == mine_before
    assert (run / "logs").is_dir() and not (run / "logs").is_symlink()
    assert not stale.parent.exists()
    assert (run / "model.keras").stat().st_mtime_ns > old_model
    assert json.loads((run / MARKER).read_text())["kind"] == "run"


@pytest.mark.slow
def test_sweep_overwrite_keeps_user_files_in_and_beside_its_runs(
    bench, model, tmp_path
):
    out = tmp_path / "sweep"
    args = [*finetune_args(bench, model, out), "--kl-weight", "0,0.5"]
    # A sweep that stopped in its first run (bad masks) leaves klseg folders.
    bad, _ = copy_with_bad_mask(bench / "target" / "val", tmp_path / "bad", 9)
    first = list(args)
    first[first.index("--val-data") + 1] = bad
    refused(*first)
    assert json.loads((out / MARKER).read_text())["kind"] == "sweep"
    assert json.loads((out / "kl_0" / MARKER).read_text())["kind"] == "run"
    # The user keeps notes in its run and a folder of their own beside it
    # (named like klseg's runs, but without a marker).
    (out / "kl_0" / "notes.txt").write_text("lr too high?\n")
    (out / "kl_backup").mkdir()
    shutil.copy(model, out / "kl_backup" / "model.keras")
    user = {
        k: v
        for k, v in snapshot(out).items()
        if k in ("kl_0/notes.txt",) or k.startswith("kl_backup")
    }
    ok(*args, "--overwrite")
    assert_kept(user, out)
    for name in ("kl_0", "kl_0.5"):
        assert (out / name / "model.keras").is_file()
    assert set(json.loads((out / "metrics.json").read_text())["runs"]) == {
        "kl_0",
        "kl_0.5",
    }


def test_a_rejected_run_leaves_a_folder_the_next_run_reuses(bench, tmp_path):
    out = tmp_path / "o"
    args = train_args(bench, out)
    bad = list(args)
    bad[bad.index("--image-size") + 1] = "30"
    result = refused(*bad, code=2)
    assert "nearest valid sizes" in result.output
    assert (out / MARKER).is_file() and (out / "config.yaml").is_file()

    # The user keeps a file in it afterwards; the next run reuses the folder
    # (no --overwrite needed) and leaves the file alone.
    (out / "thesis.txt").write_text("x\n")
    (out / "drafts").mkdir()
    (out / "drafts" / "ch1.md").write_text("# one\n")
    user = snapshot(out, only=("thesis.txt", "drafts"))
    refused(*bad, code=2)  # rejected again: still reusable, still kept
    assert_kept(user, out)
    result = ok(*[a for a in args if a != "--quiet"])
    assert f"Reusing {out}" in result.output
    assert_kept(user, out)
    assert (out / "model.keras").is_file()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_synth_refuses_a_folder_with_unrelated_files(tmp_path, overwrite):
    out = tmp_path / "d"
    (out / "source").mkdir(parents=True)  # a name klseg would write
    (out / "source" / "mine.png").write_bytes(b"\x89PNG not really")
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(out)
    result = refused("data", "synth", "--output", out, *overwrite)
    assert f"--output {out} is not empty and was not written by klseg" in (
        result.output
    )
    assert snapshot(out) == before


def _synth(out, size, *extra):
    return ok(
        "data",
        "synth",
        "--output",
        out,
        "--image-size",
        size,
        "--num-train",
        1,
        "--num-val",
        1,
        "--num-unlabeled",
        1,
        *extra,
    )


def test_synth_overwrite_replaces_its_own_output_and_keeps_the_rest(tmp_path):
    out = tmp_path / "d"
    _synth(out, 16)
    (out / "notes.txt").write_text("keep me\n")
    (out / "mine").mkdir()
    (out / "mine" / "a.bin").write_bytes(bytes(range(256)))
    user = snapshot(out, only=("notes.txt", "mine"))
    again = refused("data", "synth", "--output", out, "--image-size", 24)
    assert "--overwrite" in again.output
    _synth(out, 24, "--overwrite")
    assert_kept(user, out)
    image = next((out / "source" / "train" / "images").iterdir())
    assert Image.open(image).size == (24, 24)  # replaced, not kept
    assert not [p for p in out.iterdir() if p.name.startswith(".synth-")]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_export_refuses_a_folder_with_unrelated_files(model, tmp_path, overwrite):
    out = tmp_path / "e"
    (out / "variables").mkdir(parents=True)
    (out / "variables" / "weights.npz").write_bytes(b"user weights")
    (out / "README").write_text("my export notes\n")
    before = snapshot(out)
    result = refused("export", "--model", model, "--output", out, *overwrite)
    assert f"--output {out} is not empty and was not written by klseg" in (
        result.output
    )
    assert snapshot(out) == before


def test_export_overwrite_replaces_its_own_output_and_keeps_the_rest(model, tmp_path):
    out = tmp_path / "e"
    ok("export", "--model", model, "--output", out)
    (out / "README").write_text("how to serve\n")
    # A file of the user's inside klseg's own sub-folder is theirs too.
    user = {"README": b"how to serve\n", "variables/stale": b"old"}
    (out / "variables" / "stale").write_bytes(b"old")
    result = refused("export", "--model", model, "--output", out)
    assert "--overwrite" in result.output
    assert (out / "variables" / "stale").exists()  # the refusal changed nothing
    result = ok("export", "--model", model, "--output", out, "--overwrite")
    assert_kept(user, out)
    assert (out / "saved_model.pb").is_file()
    assert "Kept 2 files klseg did not write: README, variables/stale" in (
        result.output
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]


# --------------------------------------------------------------------------
# predict: ground truth, name collisions, failures half-way
# --------------------------------------------------------------------------


def test_predict_refuses_to_overwrite_a_labelled_folder(bench, model, tmp_path):
    labelled = tmp_path / "labelled"
    shutil.copytree(bench / "target" / "val", labelled)
    before = snapshot(labelled)
    result = refused(
        *predict_args(model, bench / "source" / "val", labelled),
        "--overwrite",
    )
    assert f"--output {labelled} is not empty and was not written by klseg" in (
        result.output
    )
    assert snapshot(labelled) == before  # the ground-truth masks are intact


def test_predict_refuses_two_images_with_one_stem(bench, model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    picture = np.asarray(
        Image.open(next((bench / "target" / "val" / "images").iterdir()))
    )
    Image.fromarray(picture).save(images / "x.png")
    Image.fromarray(picture).save(images / "x.jpg")
    out = tmp_path / "pred"
    result = refused("predict", "--model", model, "--images", images, "--output", out)
    assert "x.jpg" in result.output and "x.png" in result.output
    assert "Wrote" not in result.output
    assert not out.exists()  # refused before anything was written


def _images_with_a_corrupt_third(bench, folder):
    folder.mkdir()
    sources = sorted((bench / "target" / "val" / "images").iterdir())
    shutil.copy(sources[0], folder / "a.png")
    shutil.copy(sources[1], folder / "b.png")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return folder


def test_predict_failing_on_the_third_image_writes_no_mask(bench, model, tmp_path):
    images = _images_with_a_corrupt_third(bench, tmp_path / "images")
    out = tmp_path / "pred"
    result = refused("predict", "--model", model, "--images", images, "--output", out)
    assert str(images / "c.png") in result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written in ([], [MARKER])  # no masks, no staging folder left


def test_predict_failure_keeps_the_earlier_output(bench, model, tmp_path):
    out = tmp_path / "pred"
    ok(
        *predict_args(model, bench / "target" / "val", out),
        "--quiet",
    )
    (out / "notes.txt").write_text("mine\n")
    earlier = snapshot(out)
    assert len([k for k in earlier if k.startswith("masks/")]) == 2
    images = _images_with_a_corrupt_third(bench, tmp_path / "images")
    result = refused(
        *predict_args(model, images, out),
        "--overwrite",
    )
    assert "c.png" in result.output
    # The earlier masks, overlays and classes.json are intact, no a.png or
    # b.png was added. (The marker is klseg's own; it may be rewritten.)
    after = snapshot(out)
    assert json.loads(after.pop(MARKER))["kind"] == "predictions"
    earlier.pop(MARKER)
    assert after == earlier


# --------------------------------------------------------------------------
# mask values beyond the classes name the file and the value
# --------------------------------------------------------------------------


def test_train_val_data_with_values_above_num_classes(bench, tmp_path):
    val, name = copy_with_bad_mask(bench / "source" / "val", tmp_path / "val", 9)
    before = snapshot(val)
    out = tmp_path / "o"
    args = train_args(bench, out)
    args[args.index("--val-data") + 1] = val
    result = refused(*args, "--num-classes", synthetic.NUM_CLASSES)
    assert "--val-data" in result.output
    assert name in result.output and "[9]" in result.output
    assert snapshot(val) == before
    assert not out.exists()  # checked before the run folder is made


def test_train_data_with_values_above_num_classes(bench, tmp_path):
    data, name = copy_with_bad_mask(bench / "source" / "train", tmp_path / "tr", 7)
    out = tmp_path / "o"
    args = train_args(bench, out)
    args[args.index("--data") + 1] = data
    result = refused(*args, "--num-classes", synthetic.NUM_CLASSES)
    assert "--data" in result.output
    assert name in result.output and "[7]" in result.output
    assert not out.exists()


_FINETUNE_FOLDERS = {
    "--data": ("target", "train"),
    "--val-data": ("target", "val"),
    "--source-val-data": ("source", "val"),
}


@pytest.mark.parametrize("option", list(_FINETUNE_FOLDERS))
def test_finetune_masks_with_values_above_the_models_classes(
    bench, model, tmp_path, option
):
    folder = bench.joinpath(*_FINETUNE_FOLDERS[option])
    bad, name = copy_with_bad_mask(folder, tmp_path / "bad", 11)
    args = finetune_args(bench, model, tmp_path / "o")
    if option in args:
        args[args.index(option) + 1] = bad
    else:
        args += [option, bad]
    result = refused(*args)
    assert option in result.output
    assert name in result.output and "[11]" in result.output
    assert not (tmp_path / "o" / "model.keras").exists()


def test_evaluate_masks_with_values_above_the_models_classes(bench, model, tmp_path):
    bad, name = copy_with_bad_mask(bench / "target" / "val", tmp_path / "bad", 200)
    result = refused("evaluate", "--model", model, "--data", bad)
    assert "--data" in result.output
    assert name in result.output and "[200]" in result.output


# --------------------------------------------------------------------------
# corrupt models, evaluate --output
# --------------------------------------------------------------------------


def _truncated_keras(model, path):
    """A zip archive with the .keras members but a truncated weights file."""
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(
                item, data[: len(data) // 3] if item.filename.endswith(".h5") else data
            )
    return path


@pytest.mark.parametrize("kind", ["not-a-zip", "truncated"])
def test_a_corrupt_keras_file_is_named(bench, model, tmp_path, kind):
    path = tmp_path / "broken.keras"
    if kind == "not-a-zip":
        path.write_bytes(model.read_bytes()[:200])
    else:
        _truncated_keras(model, path)
    commands = [
        ["evaluate", "--model", path, "--data", bench / "target" / "val"],
        [
            *predict_args(path, bench / "target" / "val", tmp_path / "p"),
        ],
        ["export", "--model", path, "--output", tmp_path / "e"],
        finetune_args(bench, path, tmp_path / "f"),
    ]
    for args in commands:
        result = refused(*args)
        assert f"not a valid .keras file: {path}" in result.output, args[0]
        assert "File not found" not in result.output


def test_evaluate_output_under_a_file(bench, model, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    evaluate = ["evaluate", "--model", model, "--data", bench / "target" / "val"]
    result = refused(*evaluate, "--output", afile / "m.json")
    assert f"{afile} is a file, not a folder" in result.output
    assert "File exists" not in result.output
    assert afile.read_text() == "not a folder\n"
    folder = tmp_path / "results"
    (folder / "kept").mkdir(parents=True)
    result = refused(*evaluate, "--output", folder)
    assert f"--output {folder} is a folder" in result.output
    assert [p.name for p in folder.iterdir()] == ["kept"]


def test_evaluate_output_never_overwrites_a_foreign_file(bench, model, tmp_path):
    target = tmp_path / "m.json"
    args = ["evaluate", "--model", model, "--data", bench / "target" / "val"]
    for content in (b'{"mine": 1}\n', b"plain text\n"):
        target.write_bytes(content)
        result = refused(*args, "--output", target)
        assert f"--output {target} exists and is not a klseg evaluation" in (
            result.output
        )
        assert target.read_bytes() == content
    # Its own earlier result is replaced.
    target.unlink()
    ok(*args, "--output", target)
    first = json.loads(target.read_text())
    ok(*args, "--output", target)
    assert json.loads(target.read_text())["mean_iou"] == first["mean_iou"]


# --------------------------------------------------------------------------
# permissions follow the umask
# --------------------------------------------------------------------------


def _modes(root):
    """``{relative path: permission bits}`` of ``root`` and everything in it."""
    modes = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        modes[path.relative_to(root).as_posix()] = stat.S_IMODE(path.stat().st_mode)
    return modes


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_outputs_honour_the_umask(bench, source_run, tmp_path, umask):
    old = os.umask(umask)
    try:
        if umask == 0o022:
            run = source_run  # trained under umask 022
        else:
            run = tmp_path / "run"
            ok(*train_args(bench, run))
        ok(
            *predict_args(
                run / "model.keras", bench / "target" / "val", tmp_path / "pred"
            ),
            "--quiet",
        )
        ok("export", "--model", run / "model.keras", "--output", tmp_path / "exp")
        ok(
            "evaluate",
            "--model",
            run / "model.keras",
            "--data",
            bench / "target" / "val",
            "--output",
            tmp_path / "eval" / "m.json",
        )
        _synth(tmp_path / "synth", 16)
    finally:
        os.umask(old)
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    for name in (
        "model.keras",
        "metrics.json",
        "config.yaml",
        "history.csv",
        "report.md",
        MARKER,
    ):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").rglob("*"))
    assert list((tmp_path / "pred" / "masks").iterdir())
    for root in (run, *(tmp_path / n for n in ("pred", "exp", "eval", "synth"))):
        wrong = {
            rel: oct(mode)
            for rel, mode in _modes(root).items()
            if mode != (folder_mode if (root / rel).is_dir() else file_mode)
        }
        assert not wrong, (
            f"{root}: expected files {oct(file_mode)}, folders "
            f"{oct(folder_mode)}; got {wrong}"
        )


def test_jobs_stay_callable_after_their_modules_are_imported():
    """``klseg.runs.demo`` imports the export, train and finetune modules;
    the package keeps the job functions under those names (a command run
    after the demo in one process, or a Python user's next call, works)."""
    import importlib

    from klseg import runs

    importlib.import_module("klseg.runs.demo")
    for name in ("demo", "evaluate", "export", "finetune", "predict", "train"):
        importlib.import_module(f"klseg.runs.{name}")
        job = getattr(runs, name)
        assert callable(job) and job.__name__ == name, (name, job)
