"""Every input has a bound: numbers, images, config files, sweep folders.

Each case was found by feeding the command line what a careless or hostile
user might: a negative or huge seed, a batch size of 10**20, an image of
20000 x 20000 pixels, a config file that is /dev/zero or a YAML "billion
laughs", weights whose sweep folders share a name. Each must stop before any
work with exit 2 (a bad option) or 1 (bad data), a message naming the
option, file or value, and no traceback; the data cases write nothing.
"""

import os
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from klseg import errors
from klseg.cli.main import cli
from klseg.data import classes, images
from klseg.registry import IMAGE_PIXELS_VARIABLE, LIMITS, MAX_IMAGE_PIXELS
from klseg.runs import configs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

# --------------------------------------------------------------------------
# Files a test writes
# --------------------------------------------------------------------------


def _chunk(kind, data):
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_png(path, width, height, *, bits=8, colour=2, rows=None):
    """A PNG written by hand: any size in its header (the pixel data may be
    missing: a reader that trusts the header refuses it before decoding),
    or 16 bits per channel, which Pillow cannot write."""
    header = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    data = b"" if rows is None else b"".join(b"\0" + row for row in rows)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(data))
        + _chunk(b"IEND", b"")
    )
    return Path(path)


def write_rgb16(path, size=4):
    """A 16-bit RGB PNG whose values use the high and low bytes."""
    values = (np.arange(size * size * 3).reshape(size, size, 3) * 1000).astype(">u2")
    return write_png(path, size, size, bits=16, rows=[r.tobytes() for r in values])


def labelled(folder, n=2, size=16):
    """A labelled folder of ``n`` black images and zero masks."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(
            folder / "images" / f"{i}.png"
        )
        Image.fromarray(np.zeros((size, size), np.uint8)).save(
            folder / "masks" / f"{i}.png"
        )
    return folder


@pytest.fixture
def data(tmp_path):
    """``(train, val)`` labelled folders of two 16x16 images."""
    return labelled(tmp_path / "train"), labelled(tmp_path / "val")


def train(runner, data, out, *args):
    return runner.invoke(
        cli,
        ["train", "--data", data[0], "--val-data", data[1], "-o", out, *map(str, args)],
    )


def finetune(runner, data, out, *args):
    return runner.invoke(
        cli,
        [
            "finetune",
            "--source",
            "model.keras",
            "--data",
            data[0],
            "--val-data",
            data[1],
            "-o",
            out,
            *map(str, args),
        ],
    )


def refused(result, code, *words):
    """The command exited ``code`` with every word in its message, and no
    traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, (MemoryError, RecursionError))
    for word in words:
        assert word in result.output, (word, result.output)


# --------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--seed", "-1"),
        ("--seed", "4294967296"),
        ("--batch-size", "99999999999999999999"),
        ("--epochs", "1000001"),
        ("--steps-per-epoch", "100000001"),
        ("--val-every", "1000001"),
        ("--image-size", "16385"),
        ("--crop-size", "8x16385"),
        ("--num-classes", "65537"),
        ("--base-filters", "4097"),
    ],
)
def test_a_number_out_of_bounds_is_exit_2_naming_the_option(
    runner, data, tmp_path, option, value
):
    out = tmp_path / "out"
    refused(train(runner, data, out, option, value), 2, option, value)
    assert not out.exists()


@pytest.mark.parametrize(
    "command, option",
    [
        (["data", "synth"], "--seed"),
        (["data", "synth"], "--num-train"),
        (["data", "synth"], "--image-size"),
        (["demo"], "--seed"),
        (["demo"], "--finetune-epochs"),
    ],
)
def test_the_tools_bound_their_numbers(runner, tmp_path, command, option):
    out = tmp_path / "out"
    result = runner.invoke(cli, [*command, "-o", str(out), option, "99999999999"])
    refused(result, 2, option, "99999999999")
    assert not out.exists()


@pytest.mark.parametrize(
    "name, text, key",
    [
        ("c.toml", "seed = 4294967296\n", "seed"),
        ("c.toml", "seed = 99999999999999999999999999\n", "seed"),
        ("c.toml", "batch_size = 99999999999999999999\n", "batch_size"),
        ("c.yaml", "batch-size: 99999999999999999999\n", "batch-size"),
        ("c.json", '{"seed": -1}', "seed"),
        ("c.toml", "epochs = 99999999999999999999999999999999999999\n", "epochs"),
    ],
)
def test_config_file_integers_meet_the_same_bounds(
    runner, data, tmp_path, name, text, key
):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    result = train(runner, data, out, "--config", path)
    refused(result, 2, str(path), f"key {key!r}", "is not in the range")
    assert not out.exists()


def test_the_configs_check_every_bound():
    # Python calls meet the bounds the command line shows: each limit is
    # refused one past its end and accepted at it.
    base = {"data": "d", "val_data": "v", "output": "o"}
    for name in ("seed", "epochs", "steps_per_epoch", "val_every", "batch_size"):
        low, high = LIMITS[name]
        configs.TrainConfig(**base, **{name: high})
        for value in (low - 1, high + 1):
            with pytest.raises(errors.InvalidArgumentError, match=f"{name}=") as info:
                configs.TrainConfig(**base, **{name: value})
            assert str(value) in str(info.value)
    side = LIMITS["image_side"][1]
    configs.TrainConfig(**base, image_size=(8, side))
    with pytest.raises(errors.InvalidArgumentError, match="image_size"):
        configs.TrainConfig(**base, image_size=(8, side + 1))
    with pytest.raises(errors.InvalidArgumentError, match="tile_size"):
        configs.PredictConfig(model="m", images="i", output="o", tile_size=side + 1)
    with pytest.raises(errors.InvalidArgumentError, match="num_unlabeled"):
        configs.SynthConfig(output="o", num_unlabeled=LIMITS["num_unlabeled"][1] + 1)
    with pytest.raises(errors.InvalidArgumentError, match="kl_weight"):
        configs.DistillConfig(teacher="t", **base, kl_weight=1e7)


def test_docs_show_the_bounds_table():
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("### Bounds") :]
    section = section[: section.index("\n## ")]
    for name, (low, high) in LIMITS.items():
        row = next((line for line in section.splitlines() if f"`{name}`" in line), None)
        assert row is not None, f"docs/cli.md, Bounds: no row for {name}"
        assert f"{low:,}" in row and f"{high:,}" in row, row
    assert f"{MAX_IMAGE_PIXELS:,}" in section
    assert IMAGE_PIXELS_VARIABLE in section


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------


def test_a_huge_image_in_train_data_is_refused_before_any_work(runner, data, tmp_path):
    huge = write_png(data[0] / "images" / "1.png", 20000, 20000)
    out = tmp_path / "out"
    result = train(runner, data, out, "--epochs", "1")
    refused(result, 1, str(huge), "400,000,000 pixels", IMAGE_PIXELS_VARIABLE)
    assert not out.exists()


def test_a_huge_image_in_predict_is_refused_naming_it(runner, tmp_path):
    from helpers import tiny_unet

    model = tmp_path / "model.keras"
    tiny_unet().save(model)
    folder = tmp_path / "images"
    folder.mkdir()
    huge = write_png(folder / "big.png", 20000, 20000)
    out = tmp_path / "out"
    result = runner.invoke(
        cli, ["predict", "--model", str(model), "--images", str(folder), "-o", str(out)]
    )
    refused(result, 1, str(huge), "400,000,000 pixels")
    assert not out.exists()


def test_every_reader_refuses_an_image_over_the_limit_from_its_header(tmp_path):
    # The pixel data is missing: a reader that decoded it would fail
    # otherwise ("cannot decode"), so the message shows the header was enough.
    huge = write_png(tmp_path / "huge.png", 20000, 20000)
    for read in (
        images.read_image,
        images.read_mask,
        lambda p: images.image_size(p, full=False),
    ):
        with pytest.raises(errors.DataError, match="400,000,000 pixels") as info:
            read(huge)
        assert str(huge) in str(info.value)


def test_the_pixel_limit_comes_from_the_environment(tmp_path, monkeypatch):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small)
    monkeypatch.setenv(IMAGE_PIXELS_VARIABLE, "255")
    with pytest.raises(errors.DataError, match="16x16 = 256 pixels.*limit of 255"):
        images.read_image(small)
    monkeypatch.setenv(IMAGE_PIXELS_VARIABLE, "256")
    assert images.read_image(small).shape == (16, 16, 3)
    monkeypatch.setenv(IMAGE_PIXELS_VARIABLE, "lots")
    with pytest.raises(errors.InvalidArgumentError, match=IMAGE_PIXELS_VARIABLE):
        images.read_image(small)
    monkeypatch.delenv(IMAGE_PIXELS_VARIABLE)
    assert images.max_image_pixels() == MAX_IMAGE_PIXELS


def test_a_16_bit_rgb_image_is_refused_naming_it(runner, data, tmp_path):
    wide = write_rgb16(tmp_path / "wide.png")
    with pytest.raises(errors.DataError, match="more than 8 bits") as info:
        images.read_image(wide)
    assert str(wide) in str(info.value)
    with pytest.raises(errors.DataError, match="16 bits"):
        images.read_mask(wide)
    with pytest.raises(errors.DataError, match="more than 8 bits"):
        images.image_size(wide, full=False)
    in_data = write_rgb16(data[0] / "images" / "1.png", size=16)
    out = tmp_path / "out"
    refused(train(runner, data, out, "--epochs", "1"), 1, str(in_data), "8 bits")
    assert not out.exists()


# --------------------------------------------------------------------------
# Config files and class maps
# --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_a_device_as_config_file_is_refused_at_once(runner, data, tmp_path, suffix):
    link = tmp_path / f"zero{suffix}"
    link.symlink_to("/dev/zero")
    started = time.monotonic()
    result = train(runner, data, tmp_path / "out", "--config", link)
    assert time.monotonic() - started < 5
    refused(result, 2, "--config", str(link), "not a regular file")


def test_a_pipe_as_config_file_is_refused_without_waiting(runner, data, tmp_path):
    pipe = tmp_path / "pipe.yaml"
    os.mkfifo(pipe)
    started = time.monotonic()
    result = train(runner, data, tmp_path / "out", "--config", pipe)
    assert time.monotonic() - started < 5
    refused(result, 2, str(pipe), "not a regular file")


def test_a_config_file_over_1_mib_is_refused_unread(runner, data, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 110_000)
    refused(train(runner, data, tmp_path / "out", "--config", big), 2, str(big), "MiB")


def _laughs(levels=9, width=9):
    lines = ["class_names:", "  - &a [" + ",".join(["x"] * width) + "]"]
    previous = "a"
    for name in "bcdefghijklmnop"[: levels - 1]:
        lines.append(f"  - &{name} [" + ",".join([f"*{previous}"] * width) + "]")
        previous = name
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_inside_a_valid_key_is_refused_at_once(runner, data, tmp_path):
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(_laughs())
    started = time.monotonic()
    result = train(runner, data, tmp_path / "out", "--config", laughs)
    assert time.monotonic() - started < 5
    refused(result, 2, str(laughs), "aliases expand to more than 100,000 nodes")


def test_yaml_aliases_within_the_limit_still_work(tmp_path):
    from klseg.cli.config_files import read_config_file

    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {epochs: 3}\ntrain: *b\nfinetune:\n  <<: *b\n")
    assert read_config_file(path)["finetune"] == {"epochs": 3}
    path.write_text("a: &a [*a]\n")
    with pytest.raises(Exception, match="recursion"):
        read_config_file(path)


def test_class_map_that_is_a_device_says_not_a_regular_file(runner, data, tmp_path):
    refused(
        train(runner, data, tmp_path / "out", "--class-map", "/dev/zero"),
        2,
        "--class-map",
        "/dev/zero",
        "not a regular file",
    )
    with pytest.raises(errors.DataError, match="not a regular file"):
        classes.load_class_map("/dev/zero")
    with pytest.raises(errors.DataError, match="not a regular file"):
        classes.load_class_map(tmp_path)
    with pytest.raises(errors.DataError, match="not found"):
        classes.load_class_map(tmp_path / "missing.json")


# --------------------------------------------------------------------------
# Sweep folders
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, values, words",
    [
        ("--kl-weight", "0.3,0.30000000000000004", ["0.3 and 0.30000000000000004"]),
        ("--kl-weight", "0.1,0.10000001", ["kl_0.1/"]),
        ("--kl-weight", "0,0", ["gives 0 twice"]),
        ("--kl-weight", "1,1.0", ["gives 1 twice"]),
        ("--consistency-weight", "1,1.0000001", ["cons_1/"]),
    ],
)
def test_weights_that_would_share_a_sweep_folder_are_refused(
    runner, data, tmp_path, option, values, words
):
    out = tmp_path / "out"
    args = [option, values, "--unlabeled-data", data[1]]
    refused(finetune(runner, data, out, *args), 2, option[2:].replace("-", "_"), *words)
    assert not out.exists()


def test_a_grid_checks_both_lists_and_keeps_distinct_weights():
    base = {
        "source": "s.keras",
        "data": "d",
        "val_data": "v",
        "unlabeled_data": "u",
        "output": "o",
    }
    cfg = configs.FinetuneConfig(
        **base, kl_weight=[0, 0.1, 0.3], consistency_weight=[0.5, 1]
    )
    assert cfg.kl_weight == (0.0, 0.1, 0.3)
    with pytest.raises(errors.InvalidArgumentError, match=re.escape("cons_0.5/")):
        configs.FinetuneConfig(
            **base, kl_weight=[0, 0.1], consistency_weight=[0.5, 0.5000000001]
        )
