"""TFDS data sets by name: the known mappings and the explicit feature form.

Every test runs offline on ``tfds.testing.mock_data`` with examples of our
own, so each mask value is checked at a known pixel.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from klseg.data.tfds_source import (
    CITYSCAPES_CLASS_MAP,
    CITYSCAPES_CLASS_NAMES,
    TfdsSpec,
    parse_spec,
)
from klseg.errors import DataError

tfds = pytest.importorskip("tensorflow_datasets")


def _mock(examples):
    """``mock_data`` yielding ``examples`` (a dict of arrays) for any split."""
    import tensorflow as tf

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        return tf.data.Dataset.from_tensor_slices(examples)

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _images(count, size):
    return np.arange(count * size * size * 3, dtype=np.uint8).reshape(
        count, size, size, 3
    )


def _loaded(spec, data_dir, size, **kwargs):
    """``(split, masks)`` read three ways, which must agree: streamed in numpy,
    through ``make_dataset`` and through ``load_arrays``."""
    from klseg.data import load_arrays, load_split, make_dataset

    split = load_split(spec, data_dir=data_dir, **kwargs)
    streamed = np.array([m for _, m in split.iterate_numpy()])
    batches = list(make_dataset(split, batch_size=8, image_size=size))
    piped = np.concatenate([masks.numpy() for _, masks in batches])
    np.testing.assert_array_equal(piped, streamed)
    _, arrays = load_arrays(split, size)
    np.testing.assert_array_equal(arrays, streamed)
    return split, streamed


# ----------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------


def test_parse_spec_forms():
    assert parse_spec("tfds:oxford_iiit_pet") == TfdsSpec("oxford_iiit_pet", "train")
    assert parse_spec("tfds:cityscapes/semantic_segmentation:train[:80%]") == (
        TfdsSpec("cityscapes/semantic_segmentation", "train[:80%]")
    )
    assert parse_spec("tfds:x?mask=labels&image=photo&channel=2") == TfdsSpec(
        "x", "train", image="photo", mask="labels", channel=2
    )
    assert parse_spec("tfds:x:test?mask=m") == TfdsSpec("x", "test", mask="m")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tfds:", "expected 'tfds:NAME"),
        ("tfds:x?", "expected 'tfds:NAME"),
        ("tfds:x?label=y", "unknown key 'label'"),
        ("tfds:x?mask=a&mask=b", "mask= is given twice"),
        ("tfds:x?image=", "image= needs a value"),
        ("tfds:x?image", "image= needs a value"),
        ("tfds:x?image=a&mask=b:test", "the split goes before the '\\?'"),
        ("tfds:x?channel=red", "Received: channel=red"),
    ],
)
def test_parse_spec_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


# ----------------------------------------------------------------------
# cityscapes: label ids -> the 19 training classes
# ----------------------------------------------------------------------

# Label id -> trainId, typed from cityscapesScripts' helpers/labels.py (the
# names are the labels' names there); 255 is ignored.
_CITYSCAPES_TRAIN_IDS = {
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def _cityscapes_labels():
    """Two 6x6 label maps: every id 0..35 once, the second one reversed."""
    first = np.arange(36, dtype=np.uint8).reshape(6, 6)
    return np.stack([first, first[::-1, ::-1]])


def _cityscapes_examples():
    return {
        "image_id": np.array([b"aachen_000000_000019", b"bonn_000001_000019"]),
        "image_left": _images(2, 6),
        "segmentation_label": _cityscapes_labels()[..., None],
    }


@pytest.mark.parametrize(
    "spec",
    [
        "tfds:cityscapes:validation",
        "tfds:cityscapes/semantic_segmentation_extra:train_extra",
        "tfds:cityscapes?image=image_left&mask=segmentation_label",
    ],
)
def test_cityscapes_label_ids_become_train_ids(tmp_path, no_network, spec):
    labels = _cityscapes_labels()
    expected = np.vectorize(lambda v: _CITYSCAPES_TRAIN_IDS.get(int(v), 255))(labels)
    with _mock(_cityscapes_examples()):
        split, masks = _loaded(spec, tmp_path, 6)
        images = np.array([i for i, _ in split.iterate_numpy()])
    np.testing.assert_array_equal(masks, expected)
    np.testing.assert_array_equal(images, _images(2, 6))
    assert split.num_classes == 19 and len(split.class_names) == 19
    names = split.class_names
    by_label = {int(v): int(c) for v, c in zip(labels[0].ravel(), masks[0].ravel())}
    assert names[by_label[7]] == "road" and names[by_label[26]] == "car"
    assert names[by_label[33]] == "bicycle" and names[by_label[23]] == "sky"
    assert by_label[9] == by_label[0] == by_label[34] == by_label[35] == 255


def test_cityscapes_config_without_labels_names_its_features(tmp_path, no_network):
    from klseg.data import load_split

    with pytest.raises(DataError, match="no 'segmentation_label' feature") as info:
        load_split("tfds:cityscapes/stereo_disparity", data_dir=tmp_path)
    assert "disparity_map" in str(info.value) and "image_right" in str(info.value)
    assert "?image=FEATURE&mask=FEATURE" in str(info.value)


# ----------------------------------------------------------------------
# scene_parse150: red channel = instance category 1..100
# ----------------------------------------------------------------------


def _scene_parse_annotations():
    """Two 4x4 RGB annotations: red = category, green = instance, blue = 0."""
    red = np.array(
        [
            [[0, 1, 2, 3], [4, 9, 50, 99], [100, 101, 150, 255], [1, 1, 0, 4]],
            [[4, 4, 4, 4], [9, 9, 0, 0], [100, 100, 1, 1], [0, 0, 0, 0]],
        ],
        np.uint8,
    )
    green = np.where(red > 0, (red % 7) + 1, 0).astype(np.uint8)
    return np.stack([red, green, np.zeros_like(red)], axis=-1)


def test_scene_parse150_reads_the_red_channel(tmp_path, no_network):
    annotations = _scene_parse_annotations()
    red = annotations[..., 0].astype(np.int64)
    expected = np.where((red >= 1) & (red <= 100), red - 1, 255)
    examples = {"image": _images(2, 4), "annotation": annotations}
    with _mock(examples):
        split, masks = _loaded("tfds:scene_parse150:test", tmp_path, 4)
    np.testing.assert_array_equal(masks, expected)
    assert split.num_classes == 100
    names = split.class_names
    assert names[masks[0, 1, 0]] == "person"  # red 4
    assert names[masks[0, 1, 1]] == "car"  # red 9
    assert names[masks[0, 0, 1]] == "bed" and names[masks[0, 2, 0]] == "flag"


# ----------------------------------------------------------------------
# Any data set: features named in the spec
# ----------------------------------------------------------------------

_SHORE_NAMES = ["sky", "sea", "sand"]


class KlsegShoreParts(tfds.core.GeneratorBasedBuilder):
    """A data set with non-standard feature names, for the explicit form."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "caption": tfds.features.Text(),
                    "photo": tfds.features.Image(shape=(None, None, 3)),
                    "labels": tfds.features.LabeledImage(labels=_SHORE_NAMES),
                    "painted": tfds.features.Image(shape=(None, None, 3)),
                }
            ),
        )

    def _split_generators(self, dl_manager):  # pragma: no cover - mocked
        raise NotImplementedError

    def _generate_examples(self):  # pragma: no cover - mocked
        raise NotImplementedError


_SHORE_LABELS = np.array(
    [[[0, 0, 0], [1, 1, 2], [2, 2, 2]], [[0, 1, 2], [0, 1, 2], [2, 1, 0]]],
    np.uint8,
)


def _shore_examples(painted):
    return {
        "caption": np.array([b"a beach", b"a coast"]),
        "photo": _images(2, 3),
        "labels": _SHORE_LABELS[..., None],
        "painted": painted,
    }


def test_explicit_features_with_labeled_image_names(tmp_path, no_network):
    painted = np.repeat(_SHORE_LABELS[..., None], 3, axis=-1)
    spec = "tfds:klseg_shore_parts:test?image=photo&mask=labels"
    with _mock(_shore_examples(painted)):
        split, masks = _loaded(spec, tmp_path, 3)
        images = np.array([i for i, _ in split.iterate_numpy()])
        np.testing.assert_array_equal(images, _images(2, 3))
        np.testing.assert_array_equal(masks, _SHORE_LABELS)
        assert split.class_names == _SHORE_NAMES and split.num_classes == 3
        assert split.class_names[masks[0, 0, 0]] == "sky"
        assert split.class_names[masks[0, 1, 2]] == "sand"
        # A class map replaces the labels' names and values, value by value.
        _, remapped = _loaded(spec, tmp_path, 3, class_map={2: 0, 1: 1})
        np.testing.assert_array_equal(
            remapped, np.select([_SHORE_LABELS == 2, _SHORE_LABELS == 1], [0, 1], 255)
        )
        # Three identical channels are one mask.
        _, squeezed = _loaded(
            "tfds:klseg_shore_parts:test?image=photo&mask=painted", tmp_path, 3
        )
        np.testing.assert_array_equal(squeezed, _SHORE_LABELS)


def test_explicit_channel_picks_one_of_differing_channels(tmp_path, no_network):
    from klseg.data import load_split

    painted = np.stack(
        [_SHORE_LABELS, 2 - _SHORE_LABELS, np.zeros_like(_SHORE_LABELS)], axis=-1
    )
    spec = "tfds:klseg_shore_parts?image=photo&mask=painted"
    with _mock(_shore_examples(painted)):
        for channel in (0, 1, 2):
            _, masks = _loaded(f"{spec}&channel={channel}", tmp_path, 3)
            np.testing.assert_array_equal(masks, painted[..., channel])
        # Without channel=, the first mask is read at once and refused.
        with pytest.raises(DataError, match="3 channels that differ.*channel=N"):
            load_split(spec, data_dir=tmp_path)
        with pytest.raises(DataError, match="has 3 channel.*channel=3"):
            load_split(f"{spec}&channel=3", data_dir=tmp_path)
        with pytest.raises(DataError, match="has 1 channel.*channel=1"):
            load_split(
                "tfds:klseg_shore_parts?image=photo&mask=labels&channel=1",
                data_dir=tmp_path,
            )


def test_missing_or_wrong_features_list_what_the_data_set_has(tmp_path, no_network):
    from klseg.data import load_split

    with _mock(_shore_examples(np.zeros((2, 3, 3, 3), np.uint8))):
        with pytest.raises(DataError) as info:
            load_split("tfds:klseg_shore_parts:test", data_dir=tmp_path)
        message = str(info.value)
        assert "no 'image' or 'segmentation_mask' feature" in message
        assert "['caption', 'labels', 'painted', 'photo']" in message
        assert "'tfds:klseg_shore_parts:test?image=FEATURE&mask=FEATURE'" in message
        with pytest.raises(DataError, match="no 'pixels' feature.*'photo'"):
            load_split(
                "tfds:klseg_shore_parts?image=photo&mask=pixels", data_dir=tmp_path
            )
        with pytest.raises(DataError, match="'caption' \\(Text.*not an image"):
            load_split(
                "tfds:klseg_shore_parts?image=caption&mask=labels", data_dir=tmp_path
            )


# ----------------------------------------------------------------------
# Data that is not prepared
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "build"),
    [
        ("tfds:cityscapes:validation", "tfds build cityscapes"),
        (
            "tfds:cityscapes/semantic_segmentation_extra:train?mask=segmentation_label",
            "tfds build cityscapes/semantic_segmentation_extra",
        ),
    ],
)
def test_not_prepared_says_how_to_build(tmp_path, no_network, monkeypatch, spec, build):
    from klseg.data import load_split

    def refuse(*args, **kwargs):
        raise AssertionError("klseg tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    with pytest.raises(DataError, match="not prepared") as info:
        load_split(spec, data_dir=tmp_path)
    message = str(info.value)
    assert f"{build} --data_dir {tmp_path}" in message
    assert "--manual_dir" in message  # cityscapes is fetched by hand


def test_the_documented_cityscapes_table_is_the_one_in_use():
    text = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    rows = re.findall(r"\| (\d+) \| ([a-z ]+?) \| (\d+) \|", text)
    documented = {int(label): (int(c), name) for c, name, label in rows}
    in_use = {
        label: (c, CITYSCAPES_CLASS_NAMES[c])
        for label, c in CITYSCAPES_CLASS_MAP.items()
    }
    assert len(documented) == 19 and documented == in_use
