"""Plots and the markdown report (matplotlib Agg, no TensorFlow)."""

import doctest

import numpy as np
import pytest

from klseg import report


def test_doctests():
    assert doctest.testmod(report).failed == 0


def test_palette_is_fixed_and_distinct():
    colors = report.palette(25)
    assert colors.shape == (25, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors, report.palette(25))
    assert len({tuple(c) for c in colors}) == 25
    np.testing.assert_array_equal(report.palette(3), colors[:3])
    with pytest.raises(ValueError, match="num_classes"):
        report.palette(0)


def test_colorize_and_overlay():
    colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    mask = np.array([[0, 1], [255, 7]])
    np.testing.assert_array_equal(
        report.colorize(mask, colors),
        [[[255, 0, 0], [0, 0, 255]], [[0, 0, 0], [0, 0, 0]]],
    )
    image = np.full((2, 2, 3), 100, np.uint8)
    out = report.overlay(image, mask, colors, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [178, 50, 50])  # (100 + 255) / 2
    np.testing.assert_array_equal(out[1], image[1])  # ignored and unknown: as is
    with pytest.raises(ValueError, match="same height and width"):
        report.overlay(image, mask[:1], colors)


def test_history_round_trip_and_plots(tmp_path):
    csv_path = tmp_path / "history.csv"
    csv_path.write_text(
        "epoch,loss,mean_iou,val_loss,val_mean_iou\n"
        "0,1.5,0.2,1.7,0.1\n1,0.9,0.5,nan,0.4\n"
    )
    rows = report.read_history(csv_path)
    assert rows[0] == {
        "epoch": 0,
        "loss": 1.5,
        "mean_iou": 0.2,
        "val_loss": 1.7,
        "val_mean_iou": 0.1,
    }
    paths = [
        report.plot_history(rows, tmp_path / "curves.png"),
        report.plot_domain_miou(
            {
                "source model": {"source": 0.97, "target": 0.08},
                "KL": {"source": 0.95, "target": 0.9},
            },
            tmp_path / "domains.png",
        ),
        report.plot_tradeoff(
            [
                {"kl_weight": 1, "source": 0.96, "target": 0.8},
                {"kl_weight": 0, "source": 0.1, "target": 0.91},
            ],
            tmp_path / "tradeoff.png",
            reference={"source": 0.97, "target": 0.08},
        ),
        report.plot_overlays(
            np.zeros((2, 8, 8, 3), np.uint8),
            {"a": np.zeros((2, 8, 8), int), "b": np.ones((2, 8, 8), int)},
            tmp_path / "overlays.png",
            masks=np.full((2, 8, 8), 255),
            class_names=["x", "y"],
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # temporary files renamed away


def test_markdown_report(tmp_path):
    table = report.markdown_table(
        ["model", "mIoU"], [("a", 0.51234), ("b", float("nan"))]
    )
    assert table.splitlines() == [
        "| model | mIoU |",
        "| --- | --- |",
        "| a | 0.5123 |",
        "| b | n/a |",
    ]
    image = tmp_path / "plots" / "x.png"
    image.parent.mkdir()
    image.write_bytes(b"")
    path = report.write_report(
        tmp_path / "report.md", title="T", sections=[("Table", table), ("Plot", image)]
    )
    text = path.read_text()
    assert text.startswith("# T\n") and "![x](plots/x.png)" in text
