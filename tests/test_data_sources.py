"""Tests for klseg.data's image reader, label checks, sources and layering."""

import os

import numpy as np
import pytest
from PIL import Image

from klseg.errors import DataError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs)


def _labelled(root, values, size=(6, 5)):
    """images/ + masks/, one mask per entry of ``values`` filled with it."""
    for i, value in enumerate(values):
        _save(root / "images" / f"{i:03d}.png", np.full((*size, 3), i, np.uint8))
        _save(root / "masks" / f"{i:03d}.png", np.full(size, value, np.uint8))


# ----------------------------------------------------------------------
# klseg.data.images: one list of suffixes, one reader
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix", [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]
)
def test_every_listed_suffix_is_listed_and_read(tmp_path, suffix):
    from klseg.data.images import IMAGE_SUFFIXES, list_images, read_image

    assert suffix in IMAGE_SUFFIXES
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), np.uint8)
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    _save(tmp_path / f"a{suffix.upper()}", image, **kwargs)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == [f"a{suffix.upper()}"]
    decoded = read_image(paths[0])
    assert decoded.shape == (7, 9, 3) and decoded.dtype == np.uint8
    if suffix not in (".jpg", ".jpeg"):
        np.testing.assert_array_equal(decoded, image)


def test_list_images_prefers_images_subfolder_and_sorts(tmp_path):
    from klseg.data.images import list_images

    for name in ("b.png", "a.jpg", "c.bmp"):
        _save(tmp_path / "images" / name, np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "stray.png", np.zeros((2, 2, 3), np.uint8))
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ["a.jpg", "b.png", "c.bmp"]
    assert all(p.parent == tmp_path / "images" for p in paths)


def test_list_images_errors_name_the_folder(tmp_path):
    from klseg.data.images import list_images

    with pytest.raises(DataError, match="does not exist") as info:
        list_images(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found") as info:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    assert ".webp" in str(info.value)  # the message lists the accepted suffixes


def test_stem_collisions_name_both_files(tmp_path):
    from klseg.data.images import check_unique_stems, list_images

    _save(tmp_path / "x.jpg", np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "y.png", np.zeros((2, 2, 3), np.uint8))
    assert len(list_images(tmp_path)) == 3  # allowed unless asked
    with pytest.raises(DataError, match="share the stem 'x'") as info:
        list_images(tmp_path, unique_stems=True)
    assert str(tmp_path / "x.jpg") in str(info.value)
    assert str(tmp_path / "x.png") in str(info.value)
    with pytest.raises(DataError, match="x.jpg"):
        check_unique_stems(list_images(tmp_path))
    assert list(check_unique_stems([tmp_path / "x.png", tmp_path / "y.png"])) == [
        "x",
        "y",
    ]


def test_read_image_errors_name_the_file(tmp_path):
    from klseg.data.images import read_image

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode image") as info:
        read_image(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "gone.png")
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((3, 3), 4000, np.uint16)).save(wide)
    with pytest.raises(DataError, match="8 bits") as info:
        read_image(wide)
    assert str(wide) in str(info.value)


def test_grey_rgba_and_palette_images_become_rgb(tmp_path):
    from klseg.data.images import read_image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    _save(tmp_path / "g.png", grey)
    np.testing.assert_array_equal(
        read_image(tmp_path / "g.png"), np.stack([grey] * 3, -1)
    )
    rgba = np.random.default_rng(1).integers(0, 256, (3, 4, 4), np.uint8)
    _save(tmp_path / "a.png", rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


# ----------------------------------------------------------------------
# Split.check_labels
# ----------------------------------------------------------------------


def test_check_labels_names_the_first_three_files_and_their_values(tmp_path):
    from klseg.data import load_split

    root = tmp_path / "d"
    _labelled(root, [0, 9, 1, 5, 7, 8, 2])
    split = load_split(root)
    assert split.num_classes_seen == 10
    split.check_labels(10)  # every value is below 10
    with pytest.raises(DataError) as info:
        split.check_labels(3, what="val_data")
    message = str(info.value)
    assert message.startswith(f"val_data {root}: mask values [9] in ")
    for index, value in ((1, 9), (3, 5), (4, 7)):
        assert f"[{value}] in {root / 'masks' / f'{index:03d}.png'}" in message
    assert "008.png" not in message and "005.png" not in message
    assert "and 1 more" in message and "num_classes=3" in message
    assert "ignore value 255" in message


def test_check_labels_ignores_the_ignore_value_and_unlabelled_splits(tmp_path):
    from klseg.data import Split, load_split

    root = tmp_path / "d"
    _labelled(root, [0, 255, 1])
    load_split(root).check_labels(2)
    with pytest.raises(DataError, match=r"\[1\] in"):
        load_split(root).check_labels(1)
    images = np.zeros((2, 3, 3, 3), np.uint8)
    Split.from_arrays(images).check_labels(1)  # nothing to check


def test_check_labels_arrays_name_the_split_and_index():
    from klseg.data import Split

    masks = np.zeros((5, 3, 3), np.int64)
    masks[2, 0, 0] = 4
    masks[4, 1, 1] = 6
    split = Split.from_arrays(np.zeros((5, 3, 3, 3), np.uint8), masks, name="mine")
    with pytest.raises(DataError) as info:
        split.check_labels(3, what="source_val_data")
    message = str(info.value)
    assert message.startswith("source_val_data mine: mask values [4] in example 2")
    assert "[6] in example 4" in message and "more" not in message
    with pytest.raises(DataError, match=r"values \[6\] in example 4 are"):
        split.check_labels(5)
    split.check_labels(7)
