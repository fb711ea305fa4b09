"""Tiled and flip-TTA inference (klseg.inference), its options on the command
line (``klseg predict`` / ``klseg evaluate``) and its route through the one
evaluation path.

The stitching is checked against an independent NumPy loop over the windows
(written as mmsegmentation's ``slide_inference`` writes it, with the weights
of the documented formula computed pixel by pixel), with fake models whose
logits are known functions of the window: per pixel (tiled must equal whole
exactly) and dependent on the position in the window (the blending weights
show). A tiny U-Net checks tiled against whole-image where its receptive
field fits in every window.
"""

import json
import math

import click
import keras
import numpy as np
import pytest
from click.testing import CliRunner
from keras import ops

from klseg import errors, export, inference, models, runs
from klseg.cli.main import cli
from klseg.data import synthetic

# --------------------------------------------------------------------------
# Fake models
# --------------------------------------------------------------------------


def _pixel_logits_np(x):
    # Sums of pixel values over powers of two: exact in float32, so every
    # kernel (vectorised or not, any shape) gives the same bits.
    x = np.asarray(x, dtype=np.float32)
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    return np.concatenate([r / 16 - g / 32, g / 16 - b / 64, (b - r) / 8], axis=-1)


class PixelLogits(keras.layers.Layer):
    """Logits of a pixel from that pixel's values only (flip-equivariant)."""

    def call(self, x):
        x = ops.cast(x, "float32")
        r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
        return ops.concatenate([r / 16 - g / 32, g / 16 - b / 64, (b - r) / 8], -1)


def _position_logits_np(x):
    """Pixel logits plus terms in the row and column within the window."""
    height, width = x.shape[1:3]
    rows = np.arange(height, dtype=np.float32)[None, :, None, None] / 8
    cols = np.arange(width, dtype=np.float32)[None, None, :, None] / 8
    shape = (x.shape[0], height, width, 1)
    position = np.concatenate(
        [np.broadcast_to(v, shape) for v in (rows, cols, -cols)], axis=-1
    )
    return _pixel_logits_np(x) + position


class PositionLogits(PixelLogits):
    def call(self, x):
        shape = ops.shape(x)
        rows = ops.arange(shape[1], dtype="float32")[None, :, None, None] / 8
        cols = ops.arange(shape[2], dtype="float32")[None, None, :, None] / 8
        ones = ops.ones_like(ops.cast(x[..., :1], "float32"))
        position = ops.concatenate([rows * ones, cols * ones, -cols * ones], -1)
        return super().call(x) + position


def _model(layer):
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, layer(inputs))


@pytest.fixture(scope="module")
def pixel_model():
    return _model(PixelLogits())


@pytest.fixture(scope="module")
def position_model():
    return _model(PositionLogits())


def _images(rng, shape):
    return rng.integers(0, 256, shape).astype(np.uint8)


# --------------------------------------------------------------------------
# The NumPy reference
# --------------------------------------------------------------------------


def _softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _weight(local, start, tile, size, ramp):
    """The documented weight of a window's pixel ``local`` along one axis."""
    w = 1.0
    if ramp > 0 and start > 0:
        w = min(w, (local + 0.5) / ramp)
    if ramp > 0 and start + tile < size:
        w = min(w, (tile - local - 0.5) / ramp)
    return w


def reference(images, logits_fn, tile, overlap, multiple=1):
    """Zero padding, mmsegmentation's window loop, weighted mean, crop."""
    count, height, width = images.shape[:3]
    ph, pw = (
        math.ceil(height / multiple) * multiple,
        math.ceil(width / multiple) * multiple,
    )
    padded = np.zeros((count, ph, pw, images.shape[3]), images.dtype)
    padded[:, :height, :width] = images
    th, tw = (ph, pw) if tile is None else (min(tile[0], ph), min(tile[1], pw))
    sh = max(1, math.floor(th * (1 - overlap) / multiple + 0.5)) * multiple
    sw = max(1, math.floor(tw * (1 - overlap) / multiple + 0.5)) * multiple
    h_grids = max(ph - th + sh - 1, 0) // sh + 1
    w_grids = max(pw - tw + sw - 1, 0) // sw + 1
    total = den = None
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * sh + th, ph)
            y1 = max(y2 - th, 0)
            x2 = min(wi * sw + tw, pw)
            x1 = max(x2 - tw, 0)
            probs = _softmax(logits_fn(padded[:, y1:y2, x1:x2]))
            if total is None:
                total = np.zeros((count, ph, pw, probs.shape[-1]))
                den = np.zeros((ph, pw))
            for i in range(th):
                for j in range(tw):
                    w = _weight(i, y1, th, ph, th - sh) * _weight(
                        j, x1, tw, pw, tw - sw
                    )
                    total[:, y1 + i, x1 + j] += w * probs[:, i, j]
                    den[y1 + i, x1 + j] += w
    return (total / den[None, :, :, None])[:, :height, :width]


# --------------------------------------------------------------------------
# Windows and weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, tile, stride, expected",
    [
        (100, 40, 30, [0, 30, 60]),
        (100, 40, 40, [0, 40, 60]),
        (80, 40, 40, [0, 40]),
        (40, 40, 20, [0]),
        (20, 40, 30, [0]),
        (7, 3, 2, [0, 2, 4]),
    ],
)
def test_window_starts(size, tile, stride, expected):
    assert inference.window_starts(size, tile, stride) == expected


def test_neighbouring_weights_cross_fade():
    # Tile 8, stride 4 (ramp 4) over 16 pixels: windows at 0, 4, 8. Inside,
    # the two windows over each pixel have weights that sum to 1.
    total = np.zeros(16)
    for start in inference.window_starts(16, 8, 4):
        total[start : start + 8] += inference.tile_weights(start, 8, 16, 4)
    np.testing.assert_allclose(total, 1.0)
    assert inference.tile_weights(4, 8, 16, 4).tolist() == [
        0.125,
        0.375,
        0.625,
        0.875,
        0.875,
        0.625,
        0.375,
        0.125,
    ]
    assert inference.tile_weights(0, 8, 8, 4).tolist() == [1.0] * 8


def test_hand_computed_blend():
    # One row of 6 pixels, tile 1x4, overlap 0.5: windows at x = 0 and 2,
    # weights [1, 1, .75, .25] and [.25, .75, 1, 1]. Two classes with logits
    # (0, column in the window): p1 = sigmoid(column).
    class ColumnLogits(keras.layers.Layer):
        def call(self, x):
            cols = ops.arange(ops.shape(x)[2], dtype="float32")[None, None, :, None]
            cols = cols * ops.ones_like(ops.cast(x[..., :1], "float32"))
            return ops.concatenate([0 * cols, cols], -1)

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    probs = inference.predict_probabilities(
        _model(ColumnLogits()),
        np.zeros((1, 1, 6, 3), np.uint8),
        tile_size=(1, 4),
        tile_overlap=0.5,
        size_multiple=1,
        dtype="float64",
    )[0, 0, :, 1]
    expected = [
        sigmoid(0),
        sigmoid(1),
        0.75 * sigmoid(2) + 0.25 * sigmoid(0),
        0.25 * sigmoid(3) + 0.75 * sigmoid(1),
        sigmoid(2),
        sigmoid(3),
    ]
    np.testing.assert_allclose(probs, expected, rtol=1e-12)


# --------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------

SHAPES = [(2, 37, 53), (1, 64, 48), (1, 5, 70)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile, overlap", [((16, 24), 0.0), ((16, 24), 0.5), (8, 0.9)])
@pytest.mark.parametrize("multiple", [1, 8])
def test_tiled_equals_whole_image_for_a_per_pixel_model(
    pixel_model, rng, shape, tile, overlap, multiple
):
    images = _images(rng, (*shape, 3))
    whole = inference.predict_probabilities(pixel_model, images, size_multiple=multiple)
    tiled = inference.predict_probabilities(
        pixel_model,
        images,
        tile_size=tile,
        tile_overlap=overlap,
        size_multiple=multiple,
        batch_size=3,
    )
    assert tiled.shape == (*shape, 3) and tiled.dtype == np.float32
    np.testing.assert_array_equal(tiled, whole)
    np.testing.assert_allclose(whole, _softmax(_pixel_logits_np(images)), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile, overlap", [((16, 24), 0.0), ((16, 24), 0.5), (8, 0.25)])
@pytest.mark.parametrize("multiple", [1, 4])
def test_position_dependent_model_matches_the_reference(
    position_model, rng, shape, tile, overlap, multiple
):
    images = _images(rng, (*shape, 3))
    tile_pair = (tile, tile) if isinstance(tile, int) else tile
    expected = reference(images, _position_logits_np, tile_pair, overlap, multiple)
    got = inference.predict_probabilities(
        position_model,
        images,
        tile_size=tile,
        tile_overlap=overlap,
        size_multiple=multiple,
        batch_size=5,
        dtype="float64",
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # The windows do matter for this model: tiled is not the whole image.
    whole = reference(images, _position_logits_np, None, 0.0, multiple)
    assert np.abs(got - whole).max() > 1e-3


def test_tile_larger_than_the_image_is_the_whole_image(position_model, rng):
    images = _images(rng, (2, 13, 21, 3))
    whole = inference.predict_probabilities(position_model, images, size_multiple=4)
    big = inference.predict_probabilities(
        position_model, images, tile_size=(64, 32), tile_overlap=0.5, size_multiple=4
    )
    np.testing.assert_array_equal(big, whole)
    np.testing.assert_allclose(
        whole, reference(images, _position_logits_np, None, 0.0, 4), atol=1e-6
    )


def test_flip_tta(pixel_model, position_model, rng):
    images = _images(rng, (2, 19, 30, 3))
    # A flip-equivariant model: the flip changes nothing.
    for tile in (None, 8):
        plain = inference.predict_probabilities(
            pixel_model, images, tile_size=tile, size_multiple=4
        )
        flipped = inference.predict_probabilities(
            pixel_model, images, tile_size=tile, tta="flip", size_multiple=4
        )
        np.testing.assert_array_equal(flipped, plain)
    # A model that is not: the mean of the image's and its mirror's maps.
    got = inference.predict_probabilities(
        position_model,
        images,
        tile_size=8,
        tile_overlap=0.5,
        tta="flip",
        size_multiple=4,
        dtype="float64",
    )
    mirror = reference(images[:, :, ::-1], _position_logits_np, (8, 8), 0.5, 4)
    expected = (
        reference(images, _position_logits_np, (8, 8), 0.5, 4) + mirror[:, :, ::-1]
    ) / 2
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_predict_classes(position_model, rng):
    images = _images(rng, (2, 19, 30, 3))
    classes = inference.predict_classes(
        position_model, images, tile_size=8, tile_overlap=0.5, size_multiple=4
    )
    expected = reference(images, _position_logits_np, (8, 8), 0.5, 4).argmax(-1)
    assert classes.dtype == np.int32
    np.testing.assert_array_equal(classes, expected)


# --------------------------------------------------------------------------
# A real U-Net
# --------------------------------------------------------------------------

#: Output pixels of the 2-level, 4-filter U-Net depend on input pixels at
#: most this far away (measured: 23 at the worst alignment; checked below).
REACH = 24


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(0)
    return models.build("unet", num_classes=3, base_filters=4, depth=2)


def _smooth_images(rng, shape):
    noise = rng.normal(size=(shape[0], shape[1] // 8 + 2, shape[2] // 8 + 2, 3))
    big = np.kron(noise, np.ones((1, 8, 8, 1)))[:, : shape[1], : shape[2]]
    return np.clip(128 + 60 * big, 0, 255).astype(np.uint8)


def test_unet_reach(unet, rng):
    images = _smooth_images(rng, (1, 96, 96))
    base = unet.predict_on_batch(images.astype("float32"))
    changed = images.astype("float32")
    changed[0, 48, 48] = 255 - changed[0, 48, 48]
    diff = np.abs(unet.predict_on_batch(changed) - base).max(-1)[0]
    rows, cols = np.nonzero(diff > 0)
    assert rows.size and np.abs(rows - 48).max() < REACH
    assert np.abs(cols - 48).max() < REACH


def _safe(size, tile, stride):
    """Pixels every covering window sees with their whole receptive field
    (a window side on the image border pads as the whole image does)."""
    safe = np.ones(size, bool)
    for start in inference.window_starts(size, tile, stride):
        local = np.arange(size) - start
        inside = (local >= 0) & (local < tile)
        ok = np.ones(size, bool)
        if start > 0:
            ok &= local >= REACH
        if start + tile < size:
            ok &= tile - 1 - local >= REACH
        safe &= ~inside | ok
    return safe


@pytest.mark.parametrize("overlap, stride", [(0.0, 64), (0.5, 32)])
def test_unet_tiled_equals_whole_image_where_the_receptive_field_fits(
    unet, rng, overlap, stride
):
    # A convolution sees zeros beyond a window's edge instead of the
    # neighbouring pixels, so a tiled U-Net equals the whole-image U-Net only
    # at pixels at least its reach away from every window edge inside the
    # image. Window starts are multiples of the size multiple (4), so the
    # pooling grids agree.
    images = _smooth_images(rng, (2, 128, 160))
    whole = inference.predict_probabilities(unet, images)
    tiled = inference.predict_probabilities(
        unet, images, tile_size=64, tile_overlap=overlap, batch_size=4
    )
    safe = _safe(128, 64, stride)[:, None] & _safe(160, 64, stride)[None, :]
    assert safe.mean() >= 0.2
    np.testing.assert_allclose(tiled[:, safe], whole[:, safe], atol=1e-5)
    assert np.abs(tiled - whole).max() > 1e-4  # elsewhere the seams show


def test_unet_whole_image_equals_the_export_padding(unet, rng):
    # Whole-image inference pads with zeros as the SavedModel export does.
    images = _smooth_images(rng, (2, 30, 45))
    padded = export.pad_to_multiple(images, models.size_multiple(unet))
    logits = unet.predict_on_batch(padded)[:, :30, :45]
    classes = inference.predict_classes(unet, images)
    np.testing.assert_array_equal(classes, np.argmax(logits, -1))
    reflect = inference.predict_probabilities(unet, images, pad_mode="reflect")
    assert reflect.shape == (2, 30, 45, 3)
    np.testing.assert_allclose(reflect.sum(-1), 1, atol=1e-5)


# --------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tile_overlap": 0.95}, ["tile_overlap", "0.95", "[0, 0.9]"]),
        ({"tile_overlap": -0.1}, ["tile_overlap", "-0.1"]),
        ({"tile_overlap": float("nan")}, ["tile_overlap", "nan"]),
        ({"tile_overlap": True}, ["tile_overlap", "True"]),
        ({"tile_size": 30}, ["tile_size", "30x30", "28 and 32", "multiple of"]),
        ({"tile_size": (32, 18)}, ["tile_size", "32x18", "16 and 20"]),
        ({"tile_size": (0, 8)}, ["tile_size", "0x8", "positive"]),
        ({"tile_size": "16"}, ["tile_size", "'16'"]),
        ({"tile_size": (8, 8, 8)}, ["tile_size", "(8, 8, 8)"]),
        ({"tta": "hflip"}, ["tta", "none, flip", "'hflip'"]),
        ({"pad_mode": "edge"}, ["pad_mode", "'edge'"]),
        ({"batch_size": 0}, ["batch_size", "0"]),
        ({"size_multiple": 0}, ["size_multiple", "0"]),
    ],
)
def test_bad_arguments_name_the_argument_and_value(unet, kwargs, words):
    kwargs = {"size_multiple": 4, **kwargs}
    with pytest.raises(errors.InvalidArgumentError) as info:
        inference.predict_probabilities(unet, np.zeros((1, 8, 8, 3)), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_images_and_models(unet, pixel_model):
    with pytest.raises(errors.InvalidArgumentError, match=r"images\[None\]"):
        inference.predict_probabilities(unet, np.zeros((8, 8, 3)))
    with pytest.raises(errors.ModelError, match="size_multiple"):
        inference.predict_probabilities(pixel_model, np.zeros((1, 8, 8, 3)))


def test_inference_options():
    options = inference.InferenceOptions(tile_size=64, tile_overlap=0.5)
    assert options.tile_size == (64, 64) and not options.is_plain
    assert inference.InferenceOptions().is_plain
    with pytest.raises(errors.InvalidArgumentError, match="tile_size=-1"):
        inference.InferenceOptions(tile_size=-1)
    with pytest.raises(errors.InvalidArgumentError, match="tta='x'"):
        runs.PredictConfig(model="m", images="i", output="o", tta="x")
    with pytest.raises(errors.InvalidArgumentError, match="tile_overlap=1"):
        runs.EvaluateConfig(model="m", data="d", tile_overlap=1)
    cfg = runs.EvaluateConfig("m", "d", tile_size=[32, 16])
    assert cfg.tile_size == (32, 16) and cfg.data == "d"


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

PREDICT = ["predict", "--model", "m.keras", "--images", "i", "-o", "out"]
EVALUATE = ["evaluate", "--model", "m.keras", "--data", "d"]


@pytest.fixture
def recorded(monkeypatch):
    calls = {}

    def record(name):
        def job(cfg):
            calls[name] = cfg
            return {} if name == "evaluate" else None

        return job

    for name in ("predict", "evaluate"):
        monkeypatch.setattr(runs, name, record(name))
    monkeypatch.setattr(runs, "format_metrics", lambda result: "")
    return calls


@pytest.mark.parametrize("command", [PREDICT, EVALUATE], ids=["predict", "evaluate"])
@pytest.mark.parametrize(
    "args, expected",
    [
        ([], (None, 0.0, "none")),
        (["--tile-size", "64"], ((64, 64), 0.0, "none")),
        (["--tile-size", "64x32", "--tile-overlap", "0.5"], ((64, 32), 0.5, "none")),
        (["--tile-size", " 48X16 ", "--tta", "flip"], ((48, 16), 0.0, "flip")),
        (["--tta", "flip", "--tile-overlap", "0.9"], (None, 0.9, "flip")),
    ],
)
def test_tile_options_reach_the_config(recorded, command, args, expected):
    result = CliRunner().invoke(cli, [*command, *args])
    assert result.exit_code == 0, result.output
    cfg = recorded[command[0]]
    assert (cfg.tile_size, cfg.tile_overlap, cfg.tta) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tile_size: 32\n", (32, 32)),
        ("tile-size: 32x16\n", (32, 16)),
        ("predict:\n  tile_size: [32, 16]\n  tta: flip\n", (32, 16)),
    ],
)
def test_tile_options_from_a_config_file(recorded, tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    result = CliRunner().invoke(cli, [*PREDICT, "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert recorded["predict"].tile_size == expected


@pytest.mark.parametrize("command", [PREDICT, EVALUATE], ids=["predict", "evaluate"])
@pytest.mark.parametrize(
    "args, words",
    [
        (["--tile-size", "30x"], ["--tile-size", "'30x'"]),
        (["--tile-size", "0x8"], ["--tile-size", "'0x8'", "positive"]),
        (["--tile-size", "big"], ["--tile-size", "'big'"]),
        (["--tile-size", "8x8x8"], ["--tile-size", "'8x8x8'"]),
        (["--tile-overlap", "0.95"], ["--tile-overlap", "0.95"]),
        (["--tile-overlap", "-0.1"], ["--tile-overlap", "-0.1"]),
        (["--tile-overlap", "nan"], ["--tile-overlap", "nan"]),
        (["--tta", "hflip"], ["--tta", "'hflip'"]),
    ],
)
def test_bad_tile_options_exit_2(recorded, command, args, words):
    result = CliRunner().invoke(cli, [*command, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not recorded
    for word in words:
        assert word in result.output


@pytest.mark.parametrize(
    "text, words",
    [
        ("tile_size: true\n", ["tile_size", "true", "HxW"]),
        ("tile_size: [32]\n", ["tile_size", "[32]"]),
        ("tile_size: 32.5\n", ["tile_size", "32.5"]),
        ("tile_overlap: 1.5\n", ["tile_overlap", "1.5"]),
        ("tta: [flip]\n", ["tta", "['flip']"]),
    ],
)
def test_bad_tile_options_in_a_config_file(recorded, tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    result = CliRunner().invoke(cli, [*PREDICT, "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not recorded
    for word in words:
        assert word in result.output


# --------------------------------------------------------------------------
# End to end on the built-in synthetic data
# --------------------------------------------------------------------------

SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained briefly on synthetic scenes, and a labelled
    validation folder."""
    root = tmp_path_factory.mktemp("tiles")
    keras.utils.set_random_seed(0)
    images, masks = synthetic.generate("source", 32, image_size=SIZE, seed=1)
    model = models.build(
        "unet",
        num_classes=synthetic.NUM_CLASSES,
        base_filters=4,
        depth=2,
        class_names=list(synthetic.CLASS_NAMES),
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images, masks, batch_size=8, epochs=8, verbose=0)
    model.save(root / "model.keras")
    val_images, val_masks = synthetic.generate("source", 4, image_size=SIZE, seed=2)
    for folder in ("images", "masks"):
        (root / "val" / folder).mkdir(parents=True)
    for i, (image, mask) in enumerate(zip(val_images, val_masks)):
        synthetic.write_png(root / "val" / "images" / f"{i}.png", image)
        synthetic.write_png(root / "val" / "masks" / f"{i}.png", mask)
    return root


def _evaluate(trained, *args):
    result = CliRunner().invoke(
        cli,
        [
            *["evaluate", "--model", trained / "model.keras"],
            *["--data", trained / "val", "--image-size", SIZE, "--json"],
            *[str(a) for a in args],
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_tiled_evaluate_scores(trained):
    whole = _evaluate(trained)
    assert whole["inference"] == {"tile_size": None, "tile_overlap": 0.0, "tta": "none"}
    assert whole["mean_iou"] > 0.3  # the model learned something
    # A tile as large as the images is the whole image: the same counts.
    same = _evaluate(trained, "--tile-size", SIZE * 2, "--tile-overlap", 0.5)
    assert same["inference"]["tile_size"] == [SIZE * 2, SIZE * 2]
    for key in ("mean_iou", "pixel_accuracy", "per_class_iou", "num_images"):
        assert same[key] == whole[key], key
    assert same["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    # Windows of half the image: seams change a few pixels only.
    tiled = _evaluate(trained, "--tile-size", "32x32", "--tile-overlap", 0.5)
    assert tiled["mean_iou"] == pytest.approx(whole["mean_iou"], abs=0.03)
    assert tiled["pixel_accuracy"] == pytest.approx(whole["pixel_accuracy"], abs=0.02)
    assert tiled["loss"] == pytest.approx(whole["loss"], rel=0.1)
    assert tiled["mean_iou"] != whole["mean_iou"] or tiled["loss"] != whole["loss"]
    flipped = _evaluate(trained, "--tta", "flip", "--tile-size", 32)
    assert flipped["inference"]["tta"] == "flip"
    assert flipped["mean_iou"] == pytest.approx(whole["mean_iou"], abs=0.05)


def test_tile_size_must_fit_the_model(trained, tmp_path):
    for command in (
        ["evaluate", "--data", trained / "val", "--image-size", SIZE],
        ["predict", "--images", trained / "val", "-o", tmp_path / "p"],
    ):
        result = CliRunner().invoke(
            cli,
            [
                *[str(a) for a in command],
                *["--model", str(trained / "model.keras"), "--tile-size", "30"],
            ],
        )
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        for word in ("--tile-size", "30x30", "multiple", "28 and 32"):
            assert word in result.output
    assert not (tmp_path / "p").exists()


def test_tiled_predict(trained, tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    big, _ = synthetic.generate("source", 1, image_size=96, seed=3)
    synthetic.write_png(folder / "odd.png", big[0, :50, :70])  # not multiples of 4

    def masks(*args):
        out = tmp_path / "pred"
        result = CliRunner().invoke(
            cli,
            [
                *["predict", "--model", str(trained / "model.keras")],
                *["--images", str(folder), "-o", str(out), "--overwrite", "-q"],
                *[str(a) for a in args],
            ],
        )
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(out / "masks" / "odd.png"))

    whole = masks()
    assert whole.shape == (50, 70)
    np.testing.assert_array_equal(masks("--tile-size", "64x96"), whole)
    tiled = masks("--tile-size", "32", "--tile-overlap", "0.25", "--tta", "flip")
    assert tiled.shape == (50, 70)
    assert (tiled == whole).mean() > 0.7
    # The same classes as the library gives.
    model = keras.saving.load_model(trained / "model.keras")
    expected = inference.predict_classes(
        model, big[:, :50, :70], tile_size=32, tile_overlap=0.25, tta="flip"
    )
    np.testing.assert_array_equal(tiled, expected[0])


def test_tta_modes_are_the_run_layers():
    from klseg.cli import options

    assert "none" in inference.TTA_MODES and "flip" in inference.TTA_MODES
    predict = cli.get_command(click.Context(cli), "predict")
    params = {p.name: p for p in predict.params}
    assert tuple(params["tta"].type.choices) == inference.TTA_MODES
    assert options.default(runs.PredictConfig, "tta") == "none"
