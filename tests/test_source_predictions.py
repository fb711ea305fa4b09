"""``--source-predictions auto``: stored when they fit, live otherwise, and
the run says which and why."""

import json

import numpy as np
import pytest
from helpers import SIZE, finetune_args, ok

from klseg import finetune, runs
from klseg.runs.finetune import resolve_source_predictions

GiB = 1024**3


@pytest.fixture
def memory(monkeypatch):
    """Set the memory ``available_memory_bytes`` reports."""

    def set_available(value):
        monkeypatch.setattr(finetune, "available_memory_bytes", lambda: value)

    return set_available


def test_auto_stores_what_fits_in_half_the_available_memory(memory):
    # 100 images x 64x64 x 5 classes: float16 maps plus uint8 images.
    needed = 100 * 64 * 64 * (5 * 2 + 3)
    memory(2 * needed)
    mode, why = resolve_source_predictions(
        "auto", {"data": 60, "unlabeled_data": 40}, 64, 5, "light"
    )
    assert mode == "stored"
    assert "100 images x 64x64 x 5 classes" in why
    assert "light augmentation moves them" in why
    memory(2 * needed - 2)
    mode, why = resolve_source_predictions(
        "auto", {"data": 60, "unlabeled_data": 40}, 64, 5, "light"
    )
    assert mode == "live"
    assert "more than half the available memory" in why


def test_auto_counts_height_and_width_and_every_set(memory):
    needed = (10 + 30) * 48 * 80 * (3 * 2 + 3)
    memory(2 * needed)
    predictions, pixels = 40 * 48 * 80 * 3 * 2, 40 * 48 * 80 * 3
    assert resolve_source_predictions(
        "auto", {"data": 10, "source_images": 30}, (48, 80), 3, "none"
    ) == (
        "stored",
        f"40 images x 48x80 x 3 classes: {_text(predictions)} of float16 "
        f"predictions and {_text(pixels)} of images, {_text(needed)} in all, "
        f"within half the available memory ({_text(needed)})",
    )
    assert (
        resolve_source_predictions(
            "auto", {"data": 10, "source_images": 31}, (48, 80), 3, "none"
        )[0]
        == "live"
    )


def _text(n):
    return finetune.format_bytes(n)


def test_auto_runs_live_when_a_count_or_the_memory_is_unknown(memory):
    memory(64 * GiB)
    mode, why = resolve_source_predictions(
        "auto", {"data": 4, "source_images": None}, 32, 3, "light"
    )
    assert mode == "live" and "--source-images is not known" in why
    memory(None)
    mode, why = resolve_source_predictions("auto", {"data": 4}, 32, 3, "light")
    assert (mode, why) == ("live", "the available memory is not known")


def test_an_explicit_choice_is_kept(memory):
    memory(1)  # nothing fits
    assert resolve_source_predictions("stored", {"data": 4}, 32, 3, "none") == (
        "stored",
        "--source-predictions stored",
    )
    memory(64 * GiB)
    assert resolve_source_predictions("live", {"data": 4}, 32, 3, "none")[0] == "live"


def test_auto_is_the_default():
    assert runs.FinetuneConfig.source_predictions == "auto"


def _finetune(bench, source, out, *extra):
    result = ok(
        *finetune_args(bench, source, out),
        "--source-images",
        bench / "source" / "unlabeled",
        "--kl-weight",
        "0.5",
        "--epochs",
        "1",
        "--image-size",
        SIZE,
        "--batch-size",
        "4",
        *extra,
    )
    return result.output, json.loads((out / "metrics.json").read_text())


def test_auto_on_the_command_line_chooses_stored_and_says_why(bench, source, tmp_path):
    said, auto = _finetune(bench, source, tmp_path / "auto")
    line = next(s for s in said.splitlines() if s.startswith("Source predictions:"))
    # 4 unlabelled source images (the KL term's default inputs) at 32x32.
    assert line.startswith("Source predictions: stored (4 images x 32x32 x ")
    assert "Stored source predictions" in said  # the memory estimate
    said, stored = _finetune(
        bench, source, tmp_path / "stored", "--source-predictions", "stored"
    )
    assert "Source predictions: stored (--source-predictions stored)." in said
    for domain in ("target",):
        assert auto[domain]["mean_iou"] == stored[domain]["mean_iou"]
    history = [
        (tmp_path / name / "history.csv").read_text() for name in ("auto", "stored")
    ]
    assert history[0] == history[1]


def test_auto_runs_live_when_memory_is_short(bench, source, tmp_path, memory):
    memory(1000)
    said, live = _finetune(bench, source, tmp_path / "auto")
    assert "Source predictions: live (storing them (4 images x 32x32" in said
    assert "Stored source predictions" not in said
    _, explicit = _finetune(
        bench, source, tmp_path / "live", "--source-predictions", "live"
    )
    kl = [
        np.loadtxt(tmp_path / name / "history.csv", delimiter=",", skiprows=1)
        for name in ("auto", "live")
    ]
    np.testing.assert_array_equal(kl[0][..., 1:], kl[1][..., 1:])
