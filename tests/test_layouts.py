"""The field's data sets in their own folder layouts (``klseg.data.layouts``).

Each test writes a small fake tree in the data set's exact layout (file names
included), with every raw label value at a known pixel, and compares what
klseg reads with a table written here independently of klseg's.
"""

import doctest
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import ok, refused
from PIL import Image

from klseg import errors
from klseg.data import label_tables, layout_specs, layouts, load_split, make_dataset
from klseg.data.tfds_source import CITYSCAPES_CLASS_MAP, CITYSCAPES_CLASS_NAMES
from klseg.runs.folder import check_inputs_not_outputs

IGNORE = 255
H, W = 32, 64  # every fake image; a U-Net of depth 2 takes it

# Written from cityscapesScripts' labels.py, not from klseg.
CITYSCAPES_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_ID_TO_CLASS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_IDS = range(34)

# SYNTHIA RAND-CITYSCAPES id -> class of the 16 (and 13) shared classes.
SYNTHIA_16 = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10,
    17: 11, 8: 12, 19: 13, 12: 14, 11: 15,
}  # fmt: skip
SYNTHIA_13 = {
    3: 0, 4: 1, 2: 2, 15: 3, 9: 4, 6: 5, 1: 6, 10: 7, 17: 8, 8: 9, 19: 10,
    12: 11, 11: 12,
}  # fmt: skip
SYNTHIA_16_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "sky", "person", "rider", "car", "bus",
    "motorcycle", "bicycle",
]  # fmt: skip
VOC_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


# --------------------------------------------------------------------------
# writing fake trees
# --------------------------------------------------------------------------


def _label_grid(values, index=0, fill=None):
    """An (H, W) uint16 label holding every value at a known pixel: value
    ``values[k]`` at flat pixel ``k + index`` (so two files differ); the rest
    is ``fill`` (the first value by default)."""
    values = list(values)
    grid = np.full(H * W, values[0] if fill is None else fill, np.uint16)
    grid[index : index + len(values)] = values
    return grid.reshape(H, W)


def _expected(label, table, ignore=IGNORE):
    return np.vectorize(lambda v: table.get(int(v), ignore))(label).astype(np.int32)


def _image(path, index):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((H, W, 3), index * 10 + 5, np.uint8)
    image[0, 0] = (index, 200, 100)
    Image.fromarray(image).save(path, quality=100)
    return image


def _grey(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def _palette(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette([(v * 37) % 256 for v in range(768)])
    image.save(path)


def _png16_rgb(path, rgb):
    """A 16-bit RGB PNG written by hand (zlib), independent of any reader."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag, data):
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _cityscapes(root, split="train", cities=("aachen", "bochum"), per_city=2):
    labels = {}
    for c, city in enumerate(cities):
        for n in range(per_city):
            stem = f"{city}_{n:06d}_000019"
            index = c * per_city + n
            _image(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", index
            )
            label = _label_grid(CITYSCAPES_IDS, index)
            gt = root / "gtFine" / split / city
            _grey(gt / f"{stem}_gtFine_labelIds.png", label)
            # the other files of gtFine, which must not be read as labels
            _grey(gt / f"{stem}_gtFine_instanceIds.png", label + 1)
            Image.new("RGB", (W, H), (1, 2, 3)).save(gt / f"{stem}_gtFine_color.png")
            labels[stem] = label
    return [labels[k] for k in sorted(labels)]


def _gta5(root, count=2):
    labels = []
    for index in range(count):
        name = f"{index + 1:05d}.png"
        _image(root / "images" / name, index)
        label = _label_grid(CITYSCAPES_IDS, index + 3)
        _palette(root / "labels" / name, label)
        labels.append(label)
    return labels


@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    return root, _cityscapes(root), _cityscapes(root, "val", ("frankfurt",), 1)


# --------------------------------------------------------------------------
# the seven layouts, value by value
# --------------------------------------------------------------------------


def test_cityscapes_label_ids_become_the_19_train_ids(cityscapes):
    root, train_labels, val_labels = cityscapes
    split = load_split(f"cityscapes:{root}")
    assert split.class_names == CITYSCAPES_NAMES and split.num_classes == 19
    assert split.ignore_value == IGNORE
    assert [p.name for p in split.images] == [
        "aachen_000000_000019_leftImg8bit.png",
        "aachen_000001_000019_leftImg8bit.png",
        "bochum_000000_000019_leftImg8bit.png",
        "bochum_000001_000019_leftImg8bit.png",
    ]
    for index, label in enumerate(train_labels):
        image, mask = split.read(index)
        assert image[0, 0].tolist() == [index, 200, 100]  # its own image
        np.testing.assert_array_equal(mask, _expected(label, CITYSCAPES_ID_TO_CLASS))
    val = load_split(f"cityscapes:{root}:val")
    assert val.num_images == 1
    np.testing.assert_array_equal(
        val.read(0)[1], _expected(val_labels[0], CITYSCAPES_ID_TO_CLASS)
    )


def test_gta5_reads_palette_labels_as_cityscapes_ids(tmp_path):
    labels = _gta5(tmp_path / "gta5")
    split = load_split(f"gta5:{tmp_path / 'gta5'}")
    assert split.class_names == CITYSCAPES_NAMES
    assert [p.name for p in split.images] == ["00001.png", "00002.png"]
    for index, label in enumerate(labels):
        np.testing.assert_array_equal(
            split.read(index)[1], _expected(label, CITYSCAPES_ID_TO_CLASS)
        )


@pytest.mark.parametrize(
    "option, table, names",
    [
        ("", SYNTHIA_16, SYNTHIA_16_NAMES),
        (":16", SYNTHIA_16, SYNTHIA_16_NAMES),
        (
            ":13",
            SYNTHIA_13,
            [n for n in SYNTHIA_16_NAMES if n not in ("wall", "fence", "pole")],
        ),
    ],
)
def test_synthia_reads_the_first_channel_of_16_bit_labels(
    tmp_path, option, table, names
):
    root = tmp_path / "RAND_CITYSCAPES"
    label = _label_grid(range(23), 5)
    rgb = np.stack([label, 1000 + label * 7, np.full_like(label, 3)], axis=-1)
    _image(root / "RGB" / "0000000.png", 0)
    _png16_rgb(root / "GT" / "LABELS" / "0000000.png", rgb)
    split = load_split(f"synthia:{root}{option}")
    assert split.class_names == names and split.num_classes == len(names)
    np.testing.assert_array_equal(split.read(0)[1], _expected(label, table))


def _acdc(root):
    labels = {}
    for c, condition in enumerate(("fog", "night", "rain", "snow")):
        for split in ("train", "val"):
            seq = "GOPR0475"
            stem = f"{seq}_frame_{c:06d}"
            _image(
                root / "rgb_anon" / condition / split / seq / f"{stem}_rgb_anon.png",
                c,
            )
            label = _label_grid(CITYSCAPES_IDS, c)
            gt = root / "gt" / condition / split / seq
            _grey(gt / f"{stem}_gt_labelIds.png", label)
            _grey(gt / f"{stem}_gt_labelTrainIds.png", label * 0)
            labels[condition, split] = label
    return labels


def test_acdc_conditions_and_splits(tmp_path):
    root = tmp_path / "acdc"
    labels = _acdc(root)
    every = load_split(f"acdc:{root}")
    assert every.num_images == 4
    assert [p.parts[-4] for p in every.images] == ["fog", "night", "rain", "snow"]
    assert {p.parts[-3] for p in every.images} == {"train"}
    night = load_split(f"acdc:{root}:night:val")
    assert night.num_images == 1 and night.images[0].parts[-4:-2] == ("night", "val")
    np.testing.assert_array_equal(
        night.read(0)[1], _expected(labels["night", "val"], CITYSCAPES_ID_TO_CLASS)
    )
    assert night.class_names == CITYSCAPES_NAMES


def test_darkzurich_val(tmp_path):
    root = tmp_path / "Dark_Zurich_val_anon"
    stem = "GOPR0356_frame_000321"
    seq = root / "rgb_anon" / "val" / "night" / "GOPRO0356"
    _image(seq / f"{stem}_rgb_anon.png", 0)
    gt = root / "gt" / "val" / "night" / "GOPRO0356"
    label = _label_grid(CITYSCAPES_IDS, 9)
    _grey(gt / f"{stem}_gt_labelIds.png", label)
    _grey(gt / f"{stem}_gt_invIds.png", label * 0 + 200)
    Image.new("RGB", (W, H)).save(gt / f"{stem}_gt_labelColor.png")
    split = load_split(f"darkzurich:{root}")
    assert split.class_names == CITYSCAPES_NAMES and split.num_images == 1
    np.testing.assert_array_equal(
        split.read(0)[1], _expected(label, CITYSCAPES_ID_TO_CLASS)
    )


def _voc(root):
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    labels = {}
    for index, name in enumerate(["2007_000032", "2007_000039", "2008_000002"]):
        _image(root / "JPEGImages" / f"{name}.jpg", index)
        label = _label_grid([*range(21), 255], index)
        _palette(root / "SegmentationClass" / f"{name}.png", label)
        labels[name] = label
    _image(root / "JPEGImages" / "2009_000001.jpg", 9)  # in no list
    (lists / "train.txt").write_text("2007_000032\n2008_000002\n")
    (lists / "val.txt").write_text("2007_000039\n")
    return labels


def test_voc_palette_indices_are_the_classes(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    labels = _voc(root)
    identity = {v: v for v in range(21)}
    split = load_split(f"voc:{root}")
    assert split.class_names == VOC_NAMES
    assert [p.stem for p in split.images] == ["2007_000032", "2008_000002"]
    for index, name in enumerate(["2007_000032", "2008_000002"]):
        np.testing.assert_array_equal(
            split.read(index)[1], _expected(labels[name], identity)
        )
    val = load_split(f"voc:{root.parent}:val")  # the VOCdevkit folder works too
    assert [p.stem for p in val.images] == ["2007_000039"]


def test_ade20k_values_1_to_150_become_classes_0_to_149(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "training" / "ADE_train_00000001.jpg", 0)
    label = _label_grid(range(151), 2)
    _grey(root / "annotations" / "training" / "ADE_train_00000001.png", label)
    split = load_split(f"ade20k:{root}")
    assert split.num_classes == 150 and len(set(split.class_names)) == 150
    assert split.class_names[:5] == ["wall", "building", "sky", "floor", "tree"]
    assert split.class_names[-1] == "flag" and split.class_names[7] == "bed"
    shifted = {v: v - 1 for v in range(1, 151)}
    np.testing.assert_array_equal(split.read(0)[1], _expected(label, shifted))


def test_tables_agree_with_the_tfds_cityscapes_map():
    table = label_tables.CITYSCAPES
    assert list(table.class_names) == CITYSCAPES_CLASS_NAMES == CITYSCAPES_NAMES
    in_use = {k: v for k, v in table.class_map(IGNORE).items() if v != IGNORE}
    assert in_use == CITYSCAPES_CLASS_MAP == CITYSCAPES_ID_TO_CLASS
    assert table.raw_values() == list(CITYSCAPES_IDS)


# --------------------------------------------------------------------------
# through the pipeline: sizes, crops
# --------------------------------------------------------------------------


def test_make_dataset_gives_the_mapped_masks_resized_and_cropped(cityscapes):
    root, train_labels, _ = cityscapes
    spec = f"cityscapes:{root}"
    whole = make_dataset(spec, batch_size=4, image_size=(H, W))
    _, masks = next(iter(whole))
    expected = [_expected(label, CITYSCAPES_ID_TO_CLASS) for label in train_labels]
    np.testing.assert_array_equal(masks.numpy(), np.stack(expected))
    cropped = make_dataset(
        spec, batch_size=4, image_size=(16, 32), crop_size=(8, 8), augment="light"
    )
    images, masks = next(iter(cropped))
    assert images.shape == (4, 8, 8, 3) and masks.shape == (4, 8, 8)
    allowed = set(range(19)) | {IGNORE}
    assert set(np.unique(masks.numpy()).tolist()) <= allowed


def test_unlabelled_split_where_labels_are_not_required(cityscapes):
    root, _, _ = cityscapes
    (root / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    _image(root / "leftImg8bit" / "test" / "berlin" / "b_0_0_leftImg8bit.png", 1)
    split = load_split(f"cityscapes:{root}:test", require_masks=False)
    assert not split.has_masks and split.num_images == 1
    assert split.class_names == CITYSCAPES_NAMES
    with pytest.raises(errors.DataError, match="gtFine/test does not exist"):
        load_split(f"cityscapes:{root}:test")
    assert [p.name for p in layouts.layout_image_paths(f"cityscapes:{root}:val")] == [
        "frankfurt_000000_000019_leftImg8bit.png"
    ]


# --------------------------------------------------------------------------
# refusals, each naming the file
# --------------------------------------------------------------------------


def test_missing_sub_folders_are_named(tmp_path, cityscapes):
    root, _, _ = cityscapes
    with pytest.raises(errors.DataError, match=r"leftImg8bit/test does not exist"):
        load_split(f"cityscapes:{root}:test")
    with pytest.raises(errors.DataError, match=r"folder .*nowhere does not exist"):
        load_split(f"gta5:{tmp_path / 'nowhere'}")
    (tmp_path / "acdc" / "rgb_anon" / "fog" / "train").mkdir(parents=True)
    with pytest.raises(errors.DataError, match=r"rgb_anon/night/train does not"):
        load_split(f"acdc:{tmp_path / 'acdc'}")
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(errors.DataError, match=r"ImageSets/Segmentation does not"):
        load_split(f"voc:{tmp_path / 'voc'}")


def test_image_without_label_and_label_without_image(cityscapes):
    root, _, _ = cityscapes
    label = root / "gtFine/train/bochum/bochum_000001_000019_gtFine_labelIds.png"
    label.rename(label.with_suffix(".bak"))
    with pytest.raises(errors.DataError) as info:
        load_split(f"cityscapes:{root}")
    message = str(info.value)
    assert message.startswith(str(root / "leftImg8bit/train/bochum"))
    assert "image without its label" in message and str(label) in message
    label.with_suffix(".bak").rename(label)
    image = root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    image.unlink()
    with pytest.raises(errors.DataError) as info:
        load_split(f"cityscapes:{root}")
    message = str(info.value)
    assert message.startswith(str(root / "gtFine/train/aachen"))
    assert "label without its image" in message and str(image) in message


def test_voc_listed_image_without_label(tmp_path):
    root = tmp_path / "VOC2012"
    _voc(root)
    (root / "SegmentationClass" / "2007_000039.png").unlink()
    with pytest.raises(errors.DataError, match="2007_000039.jpg: image without"):
        load_split(f"voc:{root}:val")


@pytest.mark.parametrize(
    "layout, bad",
    [("cityscapes", 200), ("cityscapes", 34), ("voc", 21), ("ade20k", 151)],
)
def test_label_values_outside_the_table_name_the_file(tmp_path, layout, bad):
    if layout == "cityscapes":
        _cityscapes(tmp_path, "val", ("lindau",), 1)
        path = tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
        spec = f"cityscapes:{tmp_path}:val"
        values = CITYSCAPES_IDS
    elif layout == "voc":
        _voc(tmp_path)
        path = tmp_path / "SegmentationClass" / "2007_000039.png"
        spec = f"voc:{tmp_path}:val"
        values = range(21)
    else:
        _image(tmp_path / "images/validation/ADE_val_00000001.jpg", 0)
        path = tmp_path / "annotations/validation/ADE_val_00000001.png"
        spec = f"ade20k:{tmp_path}:validation"
        values = range(151)
    _grey(path, _label_grid([*values, bad]))
    with pytest.raises(errors.DataError) as info:
        load_split(spec)
    assert str(info.value).startswith(f"{path}: label values [{bad}] are not in")


def test_synthia_value_outside_the_table(tmp_path):
    _image(tmp_path / "RGB" / "0000001.png", 0)
    path = tmp_path / "GT" / "LABELS" / "0000001.png"
    label = _label_grid([3, 23])
    _png16_rgb(path, np.stack([label, label, label], axis=-1))
    with pytest.raises(errors.DataError, match=r"0000001.png: label values \[23\]"):
        load_split(f"synthia:{tmp_path}")


def test_gta5_size_mismatch_names_both_files(tmp_path):
    root = tmp_path / "gta5"
    _gta5(root, count=3)
    Image.fromarray(np.zeros((H, W + 2), np.uint8), mode="P").save(
        root / "labels" / "00002.png"
    )
    with pytest.raises(errors.DataError) as info:
        load_split(f"gta5:{root}")
    message = str(info.value)
    assert str(root / "images" / "00002.png") in message
    assert str(root / "labels" / "00002.png") in message
    assert "GTA5 holds a few such pairs" in message


@pytest.mark.parametrize(
    "spec, message",
    [
        ("acdc:/x:val", "'val' is not a valid condition for acdc"),
        ("synthia:/x:19", "'19' is not a valid classes for synthia"),
        ("ade20k:/x:train", "'train' is not a valid split for ade20k"),
        ("cityscapes:", "no folder"),
        ("cityscapes:/x:", "the split is empty"),
    ],
)
def test_malformed_specs(spec, message):
    with pytest.raises(errors.DataError, match=message):
        load_split(spec)


def test_an_ignore_value_that_is_a_class_is_refused(cityscapes):
    root, _, _ = cityscapes
    with pytest.raises(errors.DataError, match="the class 'road'"):
        load_split(f"cityscapes:{root}", ignore_value=0)


def test_a_class_map_replaces_the_table(cityscapes):
    root, train_labels, _ = cityscapes
    mapping = {"map": {str(i): int(i == 26) for i in range(34)}}
    mapping["class_names"] = ["other", "car"]
    split = load_split(f"cityscapes:{root}", class_map=mapping)
    assert split.class_names == ["other", "car"] and split.num_classes == 2
    np.testing.assert_array_equal(
        split.read(0)[1], (train_labels[0] == 26).astype(np.int32)
    )


def test_outputs_inside_a_spec_folder_are_refused(cityscapes):
    root, _, _ = cityscapes
    with pytest.raises(errors.RunError, match="never writes over its inputs"):
        check_inputs_not_outputs(
            {"--output": root / "run"}, {"--data": f"cityscapes:{root}:val"}
        )


def _documented(title):
    text = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    section = text.split("## Data sets in their own layouts")[1].split("\n## ")[0]
    return next(part for part in section.split("\n### ") if part.startswith(title))


@pytest.mark.parametrize(
    "title, table",
    [
        ("Cityscapes, GTA5", label_tables.CITYSCAPES),
        ("PASCAL VOC", label_tables.VOC),
        ("ADE20K", label_tables.ADE20K),
    ],
)
def test_the_documented_tables_are_the_ones_in_use(title, table):
    cells = re.findall(r"\| (\d+) \| (\d+|ignored) \| `([^`]+)`", _documented(title))
    documented = {
        int(raw): (None if c == "ignored" else int(c), n) for raw, c, n in cells
    }
    names = list(table.class_names)
    assert documented == {
        raw: (c, name if c is None else names[c]) for raw, name, c in table.rows
    }


def test_the_documented_synthia_table_is_the_one_in_use():
    rows = re.findall(
        r"^\| (\d+) \| `([^`]+)` \| (\d+|ignored) \| (\d+|ignored) \|",
        _documented("SYNTHIA"),
        flags=re.M,
    )
    assert len(rows) == 23
    for raw, name, c16, c13 in rows:
        raw = int(raw)
        assert label_tables.SYNTHIA_LABELS[raw] == name
        for table, documented in ((SYNTHIA_16, c16), (SYNTHIA_13, c13)):
            assert table.get(raw, "ignored") == (
                documented if documented == "ignored" else int(documented)
            )


def test_docstring_examples_run():
    for module in (label_tables, layout_specs, layouts):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# --------------------------------------------------------------------------
# the command line: train on Cityscapes, evaluate on GTA5 (tiled)
# --------------------------------------------------------------------------


def test_train_on_cityscapes_and_evaluate_on_gta5(cityscapes, tmp_path):
    root, _, _ = cityscapes
    gta_labels = _gta5(tmp_path / "gta5")
    out = tmp_path / "run"
    ok(
        "train",
        "--data", f"cityscapes:{root}",
        "--val-data", f"cityscapes:{root}:val",
        "--output", out,
        "--model", "unet",
        "--base-filters", 4,
        "--depth", 2,
        "--epochs", 1,
        "--batch-size", 2,
        "--augment", "none",
        "--quiet",
    )  # fmt: skip
    result = ok(
        "evaluate",
        "--model", out / "model.keras",
        "--data", f"gta5:{tmp_path / 'gta5'}",
        "--tile-size", "32x32",
        "--json",
    )  # fmt: skip
    scores = json.loads(result.output)
    matrix = scores["confusion_matrix"]
    assert matrix["class_names"] == CITYSCAPES_NAMES
    counts = np.asarray(matrix["counts"])
    expected_rows = np.zeros(19, np.int64)
    for label in gta_labels:
        for value in label.ravel():
            if int(value) in CITYSCAPES_ID_TO_CLASS:
                expected_rows[CITYSCAPES_ID_TO_CLASS[int(value)]] += 1
    np.testing.assert_array_equal(counts.sum(axis=1), expected_rows)
    refused(
        "evaluate", "--model", out / "model.keras", "--data", f"gta5:{tmp_path}/none"
    )
    # predict reads a spec's images (the split's, labels unread)
    preds = tmp_path / "predictions"
    ok(
        "predict",
        "--model", out / "model.keras",
        "--images", f"cityscapes:{root}:val",
        "--output", preds,
        "--quiet",
    )  # fmt: skip
    written = sorted(p.name for p in (preds / "masks").iterdir())
    assert written == ["frankfurt_000000_000019_leftImg8bit.png"]
    mask = np.asarray(Image.open(preds / "masks" / written[0]))
    assert mask.shape == (H, W) and int(mask.max()) < 19
