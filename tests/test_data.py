"""Tests for klseg.data: synthetic benchmark, folders, TFDS, augmentation, style."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from klseg.data import synthetic
from klseg.errors import DataError, InvalidArgumentError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _make_folder(root, count=4, size=(12, 10), masks=True, seed=0):
    """images/ + masks/ with class values 0..2; returns (images, masks)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, *size, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (count, *size), dtype=np.uint8)
    for i in range(count):
        _save(root / "images" / f"{i:03d}.png", images[i])
        if masks:
            _save(root / "masks" / f"{i:03d}.png", labels[i])
    return images, labels


# ----------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------


def test_synthetic_is_numpy_only():
    code = (
        "import sys, klseg.data.synthetic as s; s.generate('target', 1, image_size=16);"
        "bad = [m for m in ('tensorflow', 'keras', 'albumentations', 'jax', 'cv2')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_synthetic_shapes_and_determinism():
    images, masks = synthetic.generate("source", 5, image_size=32, seed=3)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert masks.shape == (5, 32, 32) and masks.dtype == np.uint8
    again, again_masks = synthetic.generate("source", 5, image_size=32, seed=3)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(masks, again_masks)
    # scene i depends only on (seed, domain, i)
    first, _ = synthetic.generate("source", 2, image_size=32, seed=3)
    np.testing.assert_array_equal(first, images[:2])
    other, _ = synthetic.generate("source", 5, image_size=32, seed=4)
    assert not np.array_equal(other, images)


def test_synthetic_classes():
    assert synthetic.NUM_CLASSES >= 5
    assert len(synthetic.CLASS_NAMES) == synthetic.NUM_CLASSES
    assert synthetic.IGNORE_VALUE == 255
    for domain in synthetic.DOMAINS:
        _, masks = synthetic.generate(domain, 24, image_size=32)
        assert set(np.unique(masks)) == set(range(synthetic.NUM_CLASSES))


def test_synthetic_domain_gap_statistics():
    size, count = 48, 32
    src, src_masks = synthetic.generate("source", count, image_size=size)
    tgt, tgt_masks = synthetic.generate("target", count, image_size=size)
    src_f, tgt_f = src.astype(np.float64), tgt.astype(np.float64)
    for c, name in enumerate(synthetic.CLASS_NAMES):
        src_mean = src_f[src_masks == c].mean(0)
        tgt_mean = tgt_f[tgt_masks == c].mean(0)
        # every class looks different (palette and lighting)
        assert np.abs(src_mean - tgt_mean).sum() > 40, name
        # geometry is shared: class frequencies are alike
        assert abs((src_masks == c).mean() - (tgt_masks == c).mean()) < 0.08, name

    def grain(images, masks, c):
        # pixel-to-pixel differences inside one class: texture plus noise
        d = np.abs(np.diff(images.astype(np.float64), axis=2)).sum(-1)
        both = (masks[:, :, 1:] == c) & (masks[:, :, :-1] == c)
        return d[both].mean()

    sky = synthetic.CLASS_NAMES.index("sky")
    assert grain(tgt, tgt_masks, sky) > 2 * grain(src, src_masks, sky)
    # lighting: the target's brightness varies across the image, the source's
    # does not (compare left and right halves of the same class)
    ground = synthetic.CLASS_NAMES.index("ground")

    def side_gap(images, masks):
        gaps = []
        for image, mask in zip(images.astype(np.float64), masks):
            left, right = mask[:, : size // 2] == ground, mask[:, size // 2 :] == ground
            if left.sum() > 20 and right.sum() > 20:
                a = image[:, : size // 2][left].mean()
                b = image[:, size // 2 :][right].mean()
                gaps.append(abs(a - b))
        return np.mean(gaps)

    assert side_gap(tgt, tgt_masks) > 2 * side_gap(src, src_masks)


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="domain"):
        synthetic.generate("night", 1)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate("source", 1, image_size=4)
    with pytest.raises(ValueError, match="num_images"):
        synthetic.generate("source", -1)


def test_write_benchmark_layout(tmp_path):
    from klseg.data import load_arrays, load_split

    out = synthetic.write_benchmark(
        tmp_path / "bench",
        image_size=16,
        num_train=3,
        num_val=2,
        num_unlabeled=2,
        num_target_train=1,
    )
    expected = {
        "source/train": (3, True),
        "source/val": (2, True),
        "source/unlabeled": (2, False),
        "target/train": (1, True),
        "target/val": (2, True),
        "target/unlabeled": (2, False),
    }
    for sub, (count, labelled) in expected.items():
        assert len(list((out / sub / "images").glob("*.png"))) == count
        assert (out / sub / "masks").is_dir() == labelled
        if labelled:
            assert len(list((out / sub / "masks").glob("*.png"))) == count
    info = json.loads((out / "classes.json").read_text())
    assert info["class_names"] == list(synthetic.CLASS_NAMES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".synth")]

    split = load_split(out / "source" / "train")
    assert split.class_names == list(synthetic.CLASS_NAMES)
    images, masks = load_arrays(split, 16)
    ref_images, ref_masks = synthetic._generate("source", 3, 16, 0, "train")
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(masks, ref_masks)
    val_images, _ = load_arrays(out / "source" / "val", 16)
    assert not np.array_equal(val_images[0], images[0])  # splits differ

    with pytest.raises(FileExistsError):
        synthetic.write_benchmark(out, image_size=16, num_train=1)
    synthetic.write_benchmark(
        out, image_size=16, num_train=1, num_val=1, num_unlabeled=1, overwrite=True
    )
    assert len(list((out / "source/train/images").glob("*.png"))) == 1


def test_png_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    synthetic.write_png(tmp_path / "a.png", rgb)
    synthetic.write_png(tmp_path / "b.png", grey)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), grey)


# ----------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------


def test_folder_loading_basic(tmp_path):
    from klseg.data import load_arrays, load_split

    images, labels = _make_folder(tmp_path / "d", count=3)
    split = load_split(tmp_path / "d", num_classes=3)
    assert split.has_masks and len(split) == 3 and split.kind == "folder"
    assert split.num_classes_seen == int(labels.max()) + 1
    assert [p.name for p in split.images] == ["000.png", "001.png", "002.png"]
    got_images, got_masks = load_arrays(split, (12, 10))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_masks, labels)
    assert got_masks.dtype == np.int32


def test_folder_palette_grey_rgba_and_jpeg(tmp_path):
    from klseg.data import load_split

    root = tmp_path / "d"
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 4, (8, 8), dtype=np.uint8)
    mask[0, 0] = 255
    palette_mask = Image.fromarray(mask, mode="P")
    palette_mask.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
    (root / "masks").mkdir(parents=True)
    palette_mask.save(root / "masks" / "a.png")
    _save(root / "masks" / "b.png", mask)
    _save(root / "masks" / "c.png", mask)
    _save(root / "images" / "a.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    _save(root / "images" / "b.png", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    _save(root / "images" / "c.JPG", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    split = load_split(root, num_classes=4)
    for i in range(3):
        image, got = split.read(i)
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(got, mask)  # palette read as indices
    assert split.num_classes_seen == 4


def test_folder_class_map(tmp_path):
    from klseg.data import load_split

    root = tmp_path / "d"
    mask = np.array([[0, 7], [15, 255]], dtype=np.uint8)
    _save(root / "images" / "a.png", np.zeros((2, 2, 3), np.uint8))
    _save(root / "masks" / "a.png", mask)
    split = load_split(root, class_map={"0": 0, "7": 2, "15": 1})
    np.testing.assert_array_equal(split.read(0)[1], [[0, 2], [1, 255]])
    assert split.num_classes_seen == 3
    path = tmp_path / "map.json"
    path.write_text(
        json.dumps({"map": {"0": 0, "7": 1, "15": 255}, "class_names": ["bg", "x"]})
    )
    split = load_split(root, class_map=path)
    np.testing.assert_array_equal(split.read(0)[1], [[0, 1], [255, 255]])
    assert split.class_names == ["bg", "x"] and split.num_classes == 2


def test_unlabelled_folders(tmp_path):
    from klseg.data import load_arrays, load_split

    _make_folder(tmp_path / "u", count=2, masks=False)
    split = load_split(tmp_path / "u", require_masks=False)
    assert not split.has_masks and len(split) == 2 and split.num_classes_seen == 0
    _, masks = load_arrays(split, 8)
    assert (masks == 255).all()
    # a plain folder of images is an unlabelled set too
    flat = tmp_path / "flat"
    _save(flat / "x.jpg", np.zeros((5, 5, 3), np.uint8))
    assert len(load_split(flat, require_masks=False)) == 1
    with pytest.raises(DataError, match="no masks/ folder"):
        load_split(tmp_path / "u")


@pytest.mark.parametrize(
    "problem, match",
    [
        ("corrupt", "cannot decode image"),
        ("truncated", "cannot decode image"),
        ("size", "must be the same size"),
        ("value", r"mask values \[9\].*num_classes=3"),
        ("missing_masks", r"6 of 7 images have no mask.*and 1 more"),
        ("empty", "no images found"),
        ("absent", "does not exist"),
        ("class_map", r"mask values \[2\] are not in the class map"),
        ("colour_mask", "palette PNG of class indices"),
        ("duplicate", "share the stem"),
        ("bad_map_json", "not valid JSON"),
    ],
)
def test_folder_errors_name_the_file(tmp_path, problem, match):
    from klseg.data import load_split

    root = tmp_path / "d"
    _make_folder(root, count=2)
    kwargs = {"num_classes": 3}
    named = None
    if problem == "corrupt":
        named = root / "images" / "001.png"
        named.write_bytes(b"not an image at all")
    elif problem == "truncated":
        named = root / "images" / "001.png"
        named.write_bytes(named.read_bytes()[:60])
    elif problem == "size":
        named = root / "masks" / "001.png"
        _save(named, np.zeros((3, 3), np.uint8))
    elif problem == "value":
        named = root / "masks" / "001.png"
        _save(named, np.full((12, 10), 9, np.uint8))
    elif problem == "missing_masks":
        for i in range(2, 7):
            _save(root / "images" / f"{i:03d}.png", np.zeros((4, 4, 3), np.uint8))
        (root / "masks" / "001.png").unlink()
        named = "001.png"
    elif problem == "empty":
        root = tmp_path / "empty"
        (root / "images").mkdir(parents=True)
        named = root / "images"
    elif problem == "absent":
        root = named = tmp_path / "nowhere"
    elif problem == "class_map":
        kwargs = {"class_map": {0: 0, 1: 1}}
        named = "masks"
    elif problem == "colour_mask":
        named = root / "masks" / "000.png"
        _save(named, np.random.default_rng(0).integers(0, 3, (12, 10, 3), np.uint8))
    elif problem == "duplicate":
        _save(root / "images" / "000.jpg", np.zeros((12, 10, 3), np.uint8))
        named = "000"
    elif problem == "bad_map_json":
        named = tmp_path / "map.json"
        named.write_text("{not json")
        kwargs = {"class_map": named}
    with pytest.raises(DataError, match=match) as info:
        load_split(root, **kwargs)
    assert str(named) in str(info.value)


def test_check_header_mode_is_lighter(tmp_path):
    from klseg.data import load_split

    _make_folder(tmp_path / "d", count=2)
    split = load_split(tmp_path / "d", check="header")
    assert len(split) == 2
    with pytest.raises(ValueError, match="check"):
        load_split(tmp_path / "d", check="deep")


# ----------------------------------------------------------------------
# resizing and arrays
# ----------------------------------------------------------------------


def test_fit_to_size_modes():
    from klseg.data import fit_to_size

    image = np.full((20, 40, 3), 100, np.uint8)
    mask = np.ones((20, 40), np.int32)
    for mode in ("stretch", "crop", "pad"):
        out_image, out_mask = fit_to_size(image, mask, (16, 16), mode=mode)
        assert out_image.shape == (16, 16, 3) and out_mask.shape == (16, 16)
    _, padded = fit_to_size(image, mask, (16, 16), mode="pad")
    assert (padded[:8] == 1).all() and (padded[8:] == 255).all()
    _, cropped = fit_to_size(image, mask, (16, 16), mode="crop")
    assert (cropped == 1).all()


def test_array_split_checks():
    from klseg.data import Split

    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(DataError, match="shape"):
        Split.from_arrays(images, np.zeros((2, 5, 4), np.uint8))
    with pytest.raises(DataError, match=r"mask values \[7\]"):
        Split.from_arrays(images, np.full((2, 4, 4), 7), num_classes=3)
    split = Split.from_arrays(images, np.full((2, 4, 4), 255))
    assert split.num_classes_seen == 0 and split.has_masks


# ----------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------


def _class_coded(count=4, size=32):
    """Images whose colour is a function of the mask (a class colour code)."""
    _, masks = synthetic.generate("source", count, image_size=size)
    colours = np.array(
        [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 0],
            [0, 255, 255],
            [255, 0, 255],
        ],
        np.uint8,
    )
    return colours[masks], masks.astype(np.int32), colours


@pytest.mark.parametrize("augment", ["light", "strong"])
def test_presets_keep_mask_and_extra_map_aligned(augment):
    from klseg.data.augment import Augmenter

    images, masks, _ = _class_coded()
    onehot = np.eye(6, dtype=np.float16)[masks]
    augmenter = Augmenter(augment, 32, extra_names=["probs"])
    changed = 0
    for seed in range(12):
        i = seed % len(images)
        image, mask, extras = augmenter(
            images[i], masks[i], {"probs": onehot[i]}, seed=seed
        )
        probs = extras["probs"]
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert probs.dtype == np.float16 and probs.shape == (32, 32, 6)
        valid = mask != 255
        np.testing.assert_array_equal(probs[valid].argmax(-1), mask[valid])
        assert (probs[valid].max(-1) == 1).all()
        assert (probs[~valid] == 0).all()  # filled pixels: ignore and zeros
        changed += not np.array_equal(mask, masks[i])
    assert changed >= 3  # the geometric transforms did act


def test_geometric_augmentation_moves_image_with_mask():
    import albumentations as A

    from klseg.data.augment import Augmenter

    images, masks, colours = _class_coded()
    compose = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-30, 30), scale=(0.8, 1.2), p=1.0),
            A.RandomResizedCrop(size=(32, 32), scale=(0.4, 1.0), p=1.0),
        ]
    )
    augmenter = Augmenter(compose, 32)
    for seed in range(8):
        i = seed % len(images)
        image, mask, _ = augmenter(images[i], masks[i], seed=seed)
        valid = mask != 255
        # nearest class colour of each image pixel
        distance = np.abs(image[:, :, None, :].astype(int) - colours[None, None])
        decoded = distance.sum(-1).argmin(-1)
        agreement = (decoded[valid] == mask[valid]).mean()
        assert agreement > 0.9, agreement
        assert not np.array_equal(mask, masks[i]) or seed % 2


def test_augmenter_is_deterministic_per_seed():
    from klseg.data.augment import Augmenter

    images, masks, _ = _class_coded(count=1)
    augmenter = Augmenter("strong", 32)
    a = augmenter(images[0], masks[0], seed=5)
    b = augmenter(images[0], masks[0], seed=5)
    c = augmenter(images[0], masks[0], seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_augment_argument_errors():
    import albumentations as A

    from klseg.data.augment import Augmenter

    with pytest.raises(InvalidArgumentError, match="augment"):
        Augmenter("medium", 32)
    with pytest.raises(InvalidArgumentError, match="fill_mask"):
        Augmenter(A.Compose([A.Affine(rotate=10, fill_mask=255)]), 32)
    resize = Augmenter(A.Compose([A.Resize(16, 16)]), 32)
    with pytest.raises(InvalidArgumentError, match="changed the image size"):
        resize(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.int32))


# ----------------------------------------------------------------------
# tf.data
# ----------------------------------------------------------------------


def _batches(dataset):
    return [
        tuple(np.asarray(v) for v in batch) for batch in dataset.as_numpy_iterator()
    ]


def test_make_dataset_is_deterministic_with_a_seed(tmp_path):
    from klseg.data import make_dataset

    _make_folder(tmp_path / "d", count=6, size=(20, 20))

    def build(seed):
        return make_dataset(
            tmp_path / "d",
            batch_size=4,
            image_size=16,
            augment="strong",
            shuffle=True,
            seed=seed,
            num_parallel_calls=4,
        )

    first = _batches(build(1))
    assert [b[0].shape for b in first] == [(4, 16, 16, 3), (2, 16, 16, 3)]
    assert first[0][0].dtype == np.uint8 and first[0][1].dtype == np.int32
    for a, b in zip(first, _batches(build(1))):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    other = _batches(build(2))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    # a second pass over the same dataset (the next epoch) draws anew
    dataset = build(1)
    epoch1, epoch2 = _batches(dataset), _batches(dataset)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(epoch1, epoch2))


def test_make_dataset_extra_maps_and_unlabelled(tmp_path):
    from klseg.data import Split, make_dataset

    images, masks, _ = _class_coded(count=5, size=32)
    probs = np.eye(6, dtype=np.float16)[masks]
    dataset = make_dataset(
        (images, masks),
        batch_size=2,
        image_size=32,
        augment="strong",
        extra_maps={"source_probs": probs},
        shuffle=True,
        repeat=True,
        drop_remainder=True,
    )
    for inputs, labels in dataset.take(4).as_numpy_iterator():
        assert set(inputs) == {"images", "source_probs"}
        assert inputs["source_probs"].dtype == np.float16
        valid = labels != 255
        np.testing.assert_array_equal(
            inputs["source_probs"][valid].argmax(-1), labels[valid]
        )
    unlabelled = Split.from_arrays(images)
    batch = next(iter(make_dataset(unlabelled, batch_size=5, image_size=16)))
    assert batch[0].shape == (5, 16, 16, 3) and (batch[1].numpy() == 255).all()
    with pytest.raises(InvalidArgumentError, match="extra_maps"):
        make_dataset(
            (images, masks), batch_size=2, image_size=16, extra_maps={"p": probs}
        )
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        make_dataset((images, masks), batch_size=0, image_size=16)


def test_make_dataset_cache_and_style(tmp_path):
    from klseg.data import DomainStyle, make_dataset

    synthetic.write_benchmark(
        tmp_path / "b", image_size=16, num_train=4, num_val=1, num_unlabeled=3
    )
    style = DomainStyle("histogram", tmp_path / "b" / "target" / "unlabeled")
    plain = _batches(
        make_dataset(tmp_path / "b/source/train", batch_size=4, image_size=16)
    )
    styled = _batches(
        make_dataset(
            tmp_path / "b/source/train",
            batch_size=4,
            image_size=16,
            style=style,
            cache=True,
        )
    )
    np.testing.assert_array_equal(plain[0][1], styled[0][1])  # masks untouched
    assert not np.array_equal(plain[0][0], styled[0][0])


# ----------------------------------------------------------------------
# style
# ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fda", "histogram", "pda"])
def test_domain_style_moves_colours_towards_the_references(tmp_path, method):
    from klseg.data import DomainStyle

    source, _ = synthetic.generate("source", 6, image_size=32)
    target, _ = synthetic.generate("target", 1, image_size=32, seed=1)
    _save(tmp_path / "refs" / "images" / "ref.png", target[0])
    style = DomainStyle(method, tmp_path / "refs")
    out = style(source, seed=0)
    assert out.shape == source.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, style(source, seed=0))

    def gap(images):
        means = images.reshape(len(images), -1, 3).mean(1)
        return np.abs(means - target.reshape(-1, 3).mean(0)).sum(-1).mean()

    # mean colour distance to the reference, averaged over images
    assert gap(out) < 0.7 * gap(source)


def test_domain_style_argument_errors(tmp_path):
    from klseg.data import DomainStyle

    refs = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(InvalidArgumentError, match="method"):
        DomainStyle("cyclegan", refs)
    with pytest.raises(InvalidArgumentError, match="reference_images"):
        DomainStyle("fda", refs, reference_images=[refs[0]])
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        DomainStyle("fda", tmp_path / "empty")


# ----------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------


def test_tfds_mock_data_offline(tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    from klseg.data import load_arrays, load_split, make_dataset

    with tfds.testing.mock_data(num_examples=5):
        split = load_split("tfds:oxford_iiit_pet", data_dir=tmp_path)
        assert split.kind == "tfds" and split.class_names == ["background", "pet"]
        assert split.num_classes == 2
        dataset = make_dataset(
            split, batch_size=2, image_size=24, augment="light", shuffle=True
        )
        shapes, values = [], set()
        for images, masks in dataset.as_numpy_iterator():
            shapes.append(images.shape)
            values |= set(np.unique(masks).tolist())
        assert shapes == [(2, 24, 24, 3), (2, 24, 24, 3), (1, 24, 24, 3)]
        # mock masks hold random values 0..254: trimap 1, 2 -> classes, rest ignored
        assert values <= {0, 1, 255} and 255 in values
        images, masks = load_arrays("tfds:oxford_iiit_pet:test", 16)
        assert images.shape == (5, 16, 16, 3) and masks.shape == (5, 16, 16)


# Two oxford_iiit_pet examples with trimap values at known pixels: 1 pet,
# 2 background, 3 border; 0, 4 and 255 are not trimap values.
_TRIMAPS = np.array(
    [
        [[1, 1, 2, 2], [2, 3, 1, 2], [3, 3, 2, 1], [0, 4, 255, 2]],
        [[2, 2, 2, 2], [2, 1, 1, 2], [2, 1, 1, 3], [3, 3, 3, 3]],
    ],
    np.uint8,
)
# docs/data.md: background (trimap 2) is class 0, pet (trimap 1) class 1,
# the border (trimap 3) and anything else is ignored (255).
_TRIMAP_CLASSES = np.array(
    [
        [[1, 1, 0, 0], [0, 255, 1, 0], [255, 255, 0, 1], [255, 255, 255, 0]],
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 255], [255, 255, 255, 255]],
    ]
)


def _pet_examples(self, split, decoders=None, read_config=None, **kwargs):
    import tensorflow as tf

    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    return tf.data.Dataset.from_tensor_slices(
        {"image": images, "segmentation_mask": _TRIMAPS[..., None]}
    )


def test_tfds_pet_trimap_maps_to_background_and_pet(tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    from klseg.data import load_arrays, load_split, make_dataset

    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    with tfds.testing.mock_data(as_dataset_fn=_pet_examples):
        split = load_split("tfds:oxford_iiit_pet:test", data_dir=tmp_path)
        names = split.class_names
        assert names[int(_TRIMAP_CLASSES[0, 0, 0])] == "pet"
        assert names[int(_TRIMAP_CLASSES[0, 0, 2])] == "background"
        streamed = list(split.iterate_numpy())
        np.testing.assert_array_equal([m for _, m in streamed], _TRIMAP_CLASSES)
        np.testing.assert_array_equal([i for i, _ in streamed], images)
        (batch,) = make_dataset(split, batch_size=2, image_size=4).as_numpy_iterator()
        np.testing.assert_array_equal(batch[0], images)
        np.testing.assert_array_equal(batch[1], _TRIMAP_CLASSES)
        got_images, got_masks = load_arrays("tfds:oxford_iiit_pet:test", 4)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_masks, _TRIMAP_CLASSES)
        # An explicit class map replaces the built-in one, value by value.
        swapped = load_split(
            "tfds:oxford_iiit_pet:test",
            data_dir=tmp_path,
            class_map={"1": 0, "2": 1, "3": 2},
        )
        masks = np.array([m for _, m in swapped.iterate_numpy()])
        expected = np.select(
            [_TRIMAPS == 1, _TRIMAPS == 2, _TRIMAPS == 3], [0, 1, 2], 255
        )
        np.testing.assert_array_equal(masks, expected)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path, no_network, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from klseg.data import load_split

    def refuse(*args, **kwargs):
        raise AssertionError("klseg tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    with pytest.raises(DataError, match="not prepared") as info:
        load_split("tfds:oxford_iiit_pet:test", data_dir=tmp_path)
    assert "tfds build oxford_iiit_pet" in str(info.value)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="not a TFDS data set"):
        load_split("tfds:no_such_data_set_here", data_dir=tmp_path)
