"""Image sizes as height x width, training crops, and sizes taken from the
data or the source model instead of a fixed default.

The runs are tiny: 32x64 images (non-square on purpose), a 2-level U-Net
with 4 base filters, one or two epochs.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from helpers import invoke, ok, readme_command
from PIL import Image

from klseg import errors, models, runs
from klseg.cli.types import ImageSize, TileSize
from klseg.data import synthetic
from klseg.models import layers

HEIGHT, WIDTH = 32, 64
TINY = ["--base-filters", "4", "--depth", "2", "--batch-size", "4", "--quiet"]


def write_folder(path, count, height, width, *, seed, domain="source"):
    """A labelled folder of ``count`` images of ``height x width`` pixels."""
    images, masks = synthetic.generate(
        domain, count, image_size=max(height, width), seed=seed
    )
    (path / "images").mkdir(parents=True)
    (path / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image[:height, :width]).save(path / "images" / f"{i}.png")
        Image.fromarray(mask[:height, :width].astype(np.uint8)).save(
            path / "masks" / f"{i}.png"
        )
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    return {
        "train": write_folder(root / "train", 8, HEIGHT, WIDTH, seed=1),
        "val": write_folder(root / "val", 4, HEIGHT, WIDTH, seed=2),
        "target": write_folder(root / "target", 4, HEIGHT, WIDTH, seed=3),
    }


class BatchShapes(keras.callbacks.Callback):
    """Records (height, width) of every tensor a training step receives."""

    def __init__(self):
        super().__init__()
        self.sizes = set()

    def set_model(self, model):
        # Before fit builds its train function from model.train_step.
        super().set_model(model)
        if getattr(model, "_klseg_recorded", False):
            return
        import tensorflow as tf

        model._klseg_recorded = True
        step = model.train_step

        def train_step(data):
            for tensor in tf.nest.flatten(data):
                if len(tensor.shape) >= 3:
                    self.sizes.add(tuple(tensor.shape[1:3]))
            return step(data)

        model.train_step = train_step


@pytest.fixture
def forward_sizes(monkeypatch):
    """(height, width) of every image batch any klseg model is called on."""
    seen = set()
    call = layers.ImagePreprocessing.call

    def recording(self, images):
        seen.add(tuple(images.shape[1:3]))
        return call(self, images)

    monkeypatch.setattr(layers.ImagePreprocessing, "call", recording)
    return seen


# --------------------------------------------------------------------------
# Parsing: the command line type and the config fields
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("512x1024", (512, 1024)),
        ("64", (64, 64)),
        (" 64X32 ", (64, 32)),
        (64, (64, 64)),
        ([64, 128], (64, 128)),
    ],
)
def test_image_size_type_parses(value, expected):
    assert ImageSize().convert(value, None, None) == expected


@pytest.mark.parametrize("value", ["0x5", "64x", "axb", "64x32x16", "-8x8", True])
def test_image_size_type_refuses(value):
    with pytest.raises(Exception) as info:
        ImageSize().convert(value, None, None)
    assert "size" in str(info.value) or "positive" in str(info.value)


def test_tile_size_is_an_image_size_with_its_own_name():
    assert isinstance(TileSize(), ImageSize)
    with pytest.raises(Exception, match="not a tile size"):
        TileSize().convert("axb", None, None)


@pytest.mark.parametrize(
    "given, stored",
    [
        ((512, 1024), (512, 1024)),
        ("512x1024", (512, 1024)),
        ([64, 128], (64, 128)),
        (64, 64),
        ("64x64", 64),
        ((64, 64), 64),
        (None, None),
    ],
)
def test_config_sizes_have_one_form(given, stored):
    cfg = runs.TrainConfig(data="a", val_data="b", output="o", image_size=given)
    assert cfg.image_size == stored
    saved = cfg.to_dict()["image_size"]
    assert saved == (list(stored) if isinstance(stored, tuple) else stored)
    again = runs.TrainConfig(data="a", val_data="b", output="o", image_size=saved)
    assert again.image_size == cfg.image_size
    evaluate = runs.EvaluateConfig(model="m.keras", data="d", image_size=given)
    predict = runs.PredictConfig(
        model="m.keras", images="i", output="o", image_size=given
    )
    assert evaluate.image_size == predict.image_size == stored


@pytest.mark.parametrize("value", ["0x5", "64x", "axb", (64,), 4, "4x64", True])
def test_config_refuses_bad_sizes(value):
    with pytest.raises(errors.InvalidArgumentError, match="image_size") as info:
        runs.TrainConfig(data="a", val_data="b", output="o", image_size=value)
    assert "Received: image_size=" in str(info.value)


def test_config_refuses_a_crop_larger_than_the_image():
    with pytest.raises(errors.InvalidArgumentError, match="crop_size=64x32"):
        runs.TrainConfig(
            data="a", val_data="b", output="o", image_size=(32, 64), crop_size=(64, 32)
        )


# --------------------------------------------------------------------------
# The command line: bad values exit 2, naming the option and the value
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0x5", "64x", "axb", "64x32x16"])
@pytest.mark.parametrize("option", ["--image-size", "--crop-size"])
def test_train_refuses_bad_sizes(tmp_path, option, value):
    result = invoke(
        "train", "--data", "d", "--val-data", "v", "--output", tmp_path / "o",
        option, value,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert option in result.output and repr(value) in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["evaluate", "predict", "finetune", "demo"])
def test_other_commands_refuse_bad_sizes(tmp_path, command):
    result = invoke(command, "--image-size", "64x", "--output", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "--image-size" in result.output and "'64x'" in result.output


def test_crop_larger_than_image_exits_2(tmp_path):
    result = invoke(
        "train", "--data", "d", "--val-data", "v", "--output", tmp_path / "o",
        "--image-size", "32x64", "--crop-size", "64x32",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "crop_size=64x32" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "extra, option, side",
    [
        (["--image-size", "32x30"], "--image-size=32x30", 30),
        (["--image-size", "32x64", "--crop-size", "30x32"], "--crop-size=30x32", 30),
    ],
)
def test_sizes_must_fit_the_model_per_side(folders, tmp_path, extra, option, side):
    result = invoke(
        "train", "--data", folders["train"], "--val-data", folders["val"],
        "--output", tmp_path / "o", *TINY, *extra,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert f"nearest valid sizes for {side} are 28 and 32" in result.output
    assert "Traceback" not in result.output


def test_differing_image_sizes_ask_for_image_size(folders, tmp_path):
    mixed = tmp_path / "mixed"
    write_folder(mixed, 2, HEIGHT, WIDTH, seed=4)
    write_folder(tmp_path / "square", 1, HEIGHT, HEIGHT, seed=5)
    for sub in ("images", "masks"):
        (tmp_path / "square" / sub / "0.png").rename(mixed / sub / "z.png")
    result = invoke(
        "train", "--data", mixed, "--val-data", folders["val"],
        "--output", tmp_path / "o", *TINY,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "differ in size" in result.output and "--image-size" in result.output
    assert "32x64" in result.output and "32x32" in result.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crop_run(folders, tmp_path_factory):
    """Train at the data's own size (32x64, no --image-size) on 32x32 crops."""
    out = tmp_path_factory.mktemp("runs") / "crops"
    shapes = BatchShapes()
    cfg = runs.TrainConfig(
        data=str(folders["train"]),
        val_data=str(folders["val"]),
        output=str(out),
        crop_size="32x32",
        epochs=1,
        batch_size=4,
        base_filters=4,
        depth=2,
        verbose=0,
    )
    runs.train(cfg, callbacks=[shapes])
    return out, shapes.sizes


def test_train_on_crops_validates_at_full_size(crop_run):
    out, sizes = crop_run
    assert sizes == {(32, 32)}  # every training batch is a crop
    model = runs.load_model(out / "model.keras")
    assert models.get_training_size(model) == (HEIGHT, WIDTH)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["image_size"] is None and saved["crop_size"] == 32
    assert "images at 32x64" in (out / "report.md").read_text()


def test_validation_sees_whole_images(folders, tmp_path, forward_sizes):
    cfg = runs.TrainConfig(
        data=str(folders["train"]),
        val_data=str(folders["val"]),
        output=str(tmp_path / "o"),
        image_size=(32, 64),
        crop_size=(32, 32),
        epochs=1,
        batch_size=4,
        base_filters=4,
        depth=2,
        augment="none",
        verbose=0,
    )
    runs.train(cfg)
    # Training steps see crops, validation and the report whole 32x64 images.
    assert forward_sizes == {(32, 32), (32, 64)}


def test_evaluate_uses_the_training_size(crop_run, folders, tmp_path):
    model = crop_run[0] / "model.keras"
    result = ok("evaluate", "--model", model, "--data", folders["val"], "--json")
    assert json.loads(result.output)["image_size"] == [HEIGHT, WIDTH]
    # Outside its run folder the size still comes from the model file.
    alone = tmp_path / "alone.keras"
    alone.write_bytes(model.read_bytes())
    result = ok("evaluate", "--model", alone, "--data", folders["val"], "--json")
    assert json.loads(result.output)["image_size"] == [HEIGHT, WIDTH]
    result = ok(
        "evaluate", "--model", alone, "--data", folders["val"], "--json",
        "--image-size", "16x32",
    )  # fmt: skip
    assert json.loads(result.output)["image_size"] == [16, 32]


def test_predict_resizes_to_height_and_width(crop_run, folders, tmp_path):
    out = tmp_path / "pred"
    ok(
        "predict", "--model", crop_run[0] / "model.keras",
        "--images", folders["val"], "--output", out, "--image-size", "16x32",
        "--quiet",
    )  # fmt: skip
    mask = np.asarray(Image.open(out / "masks" / "0.png"))
    assert mask.shape == (16, 32)


def test_finetune_uses_the_source_training_size(folders, tmp_path):
    # A source model trained at 32x32 (stretched from the 32x64 images).
    source = tmp_path / "source"
    ok(
        "train", "--data", folders["train"], "--val-data", folders["val"],
        "--output", source, "--image-size", "32", "--epochs", "1", *TINY,
    )  # fmt: skip
    alone = tmp_path / "model.keras"  # no run folder (config.yaml) beside it
    alone.write_bytes((source / "model.keras").read_bytes())
    shapes = BatchShapes()
    cfg = runs.FinetuneConfig(
        source=str(alone),
        data=str(folders["target"]),
        val_data=str(folders["val"]),
        output=str(tmp_path / "ft"),
        kl_weight=0.5,
        epochs=1,
        batch_size=4,
        verbose=0,
    )
    runs.finetune(cfg, callbacks=[shapes])
    assert shapes.sizes == {(32, 32)}  # not the target images' 32x64
    tuned = runs.load_model(tmp_path / "ft" / "model.keras")
    assert models.get_training_size(tuned) == (32, 32)


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt


def test_resume_keeps_a_non_square_size(folders, tmp_path):
    out = tmp_path / "run"
    cfg = runs.TrainConfig(
        data=str(folders["train"]),
        val_data=str(folders["val"]),
        output=str(out),
        image_size="32x64",
        crop_size=(32, 32),
        epochs=2,
        batch_size=4,
        base_filters=4,
        depth=2,
        verbose=0,
    )
    with pytest.raises(KeyboardInterrupt):
        runs.train(cfg, callbacks=[InterruptAfterFirstEpoch()])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["image_size"] == [32, 64] and saved["crop_size"] == 32
    refused = invoke("train", "--output", out, "--resume", "--image-size", "32")
    assert refused.exit_code == 1
    assert "image_size: saved (32, 64), now 32" in refused.output
    ok("train", "--output", out, "--resume", "--image-size", "32x64", "--quiet")
    assert len((out / "history.csv").read_text().splitlines()) == 3


def test_config_file_sizes(folders, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(runs, "train", lambda cfg: seen.setdefault("cfg", cfg))
    config = tmp_path / "run.yaml"
    config.write_text("image_size: 32x64\ncrop_size: [16, 32]\n")
    ok(
        "train", "--config", config, "--data", folders["train"],
        "--val-data", folders["val"], "--output", tmp_path / "o",
    )  # fmt: skip
    assert (seen["cfg"].image_size, seen["cfg"].crop_size) == ((32, 64), (16, 32))
    config.write_text("image_size: 32.5\n")
    result = invoke(
        "train", "--config", config, "--data", "d", "--val-data", "v",
        "--output", tmp_path / "o",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "not an image size" in result.output


def test_readme_crop_command_runs(tmp_path, monkeypatch):
    """The README's crop example, run on a small built-in benchmark."""
    monkeypatch.chdir(tmp_path)
    ok(
        "data", "synth", "--output", "data", "--num-train", 8, "--num-val", 4,
        "--num-unlabeled", 0,
    )  # fmt: skip
    command = readme_command("--crop-size")
    assert command[0] == "train"
    # Later options win: a smaller model and one epoch.
    ok(*command, "--base-filters", 4, "--depth", 2, "--epochs", 1, "--quiet")
    out = Path(command[command.index("--output") + 1])
    model = runs.load_model(out / "model.keras")
    size = command[command.index("--image-size") + 1]
    assert models.get_training_size(model) == tuple(map(int, size.split("x")))


# --------------------------------------------------------------------------
# The data layer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("augment", ["none", "light", "strong"])
def test_crops_keep_image_mask_and_extra_maps_aligned(augment):
    from klseg.data.augment import Augmenter

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    code = (yy * WIDTH + xx) % 250
    image = np.repeat(code[..., None], 3, axis=-1).astype(np.uint8)
    extra = code[..., None].astype(np.float32)
    augmenter = Augmenter(
        augment, (HEIGHT, WIDTH), extra_names=["p"], crop_size=(16, 32)
    )
    corners = set()
    for seed in range(6):
        out, mask, maps = augmenter(image, code, {"p": extra}, seed=seed)
        assert out.shape == (16, 32, 3) and mask.shape == (16, 32)
        assert maps["p"].shape == (16, 32, 1)
        if augment == "none":  # a plain window: the codes tell where it is
            np.testing.assert_array_equal(out[..., 0], mask)
            np.testing.assert_array_equal(maps["p"][..., 0], mask)
            corners.add(int(mask[0, 0]))
    assert augment != "none" or len(corners) > 1  # the window moves


def test_make_dataset_crops_training_batches_only(folders):
    from klseg import data

    train = data.make_dataset(
        str(folders["train"]), batch_size=4, image_size=(32, 64), crop_size=16
    )
    val = data.make_dataset(str(folders["val"]), batch_size=4, image_size=(32, 64))
    images, masks = next(iter(train))
    assert images.shape == (4, 16, 16, 3) and masks.shape == (4, 16, 16)
    assert next(iter(val))[0].shape == (4, 32, 64, 3)
    with pytest.raises(errors.InvalidArgumentError, match="crop_size"):
        data.make_dataset(
            str(folders["train"]), batch_size=4, image_size=16, crop_size=(16, 32)
        )
