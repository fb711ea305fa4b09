"""Plots and the markdown report (matplotlib Agg, no TensorFlow)."""

import doctest

import numpy as np
import pytest

from klseg import report


def test_doctests():
    result = doctest.testmod(report)
    assert result.attempted > 0 and result.failed == 0


def _png(path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(path).convert("RGB"))


def _center_pixel(fig, ax, png):
    """The PNG pixel at the centre of ``ax`` (figure saved at its own dpi)."""
    box = ax.get_window_extent()
    x, y = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    assert png.shape[:2] == (round(fig.bbox.height), round(fig.bbox.width))
    return png[int(png.shape[0] - y), int(x)]


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


def test_history_round_trip_and_curves(tmp_path, figures):
    csv_path = tmp_path / "history.csv"
    csv_path.write_text(
        "epoch,loss,mean_iou,val_loss,val_mean_iou,learning_rate\n"
        "0,1.5,0.2,1.7,0.1,0.01\n1,0.9,0.5,nan,0.4,0.01\n"
    )
    rows = report.read_history(csv_path)
    assert rows[0] == {
        "epoch": 0,
        "loss": 1.5,
        "mean_iou": 0.2,
        "val_loss": 1.7,
        "val_mean_iou": 0.1,
        "learning_rate": 0.01,
    }
    path = report.plot_history(rows, tmp_path / "curves.png")
    _png(path)
    (fig,) = figures
    losses_ax, metrics_ax = fig.axes
    lines = {ax: {ln.get_label(): ln for ln in ax.get_lines()} for ax in fig.axes}
    # Losses on the left, other metrics on the right, epochs counted from 1;
    # the learning rate is not drawn; validation curves dashed; NaN is a gap.
    assert list(lines[losses_ax]) == ["loss", "val_loss"]
    assert list(lines[metrics_ax]) == ["mean_iou", "val_mean_iou"]
    expected = {
        "loss": [1.5, 0.9],
        "val_loss": [1.7, np.nan],
        "mean_iou": [0.2, 0.5],
        "val_mean_iou": [0.1, 0.4],
    }
    for ax in fig.axes:
        for key, line in lines[ax].items():
            np.testing.assert_array_equal(line.get_xdata(), [1, 2])
            np.testing.assert_array_equal(line.get_ydata(), expected[key])
            assert line.get_linestyle() == ("--" if key.startswith("val_") else "-")
    assert losses_ax.get_ylabel() == "loss" and metrics_ax.get_ylabel() == "metric"
    assert not list(tmp_path.glob(".*"))  # temporary files renamed away


def test_domain_miou_bars(tmp_path, figures):
    results = {
        "source model": {"source": 0.97, "target": 0.08},
        "KL": {"source": 0.95, "target": 0.9},
        "target only": {"target": 0.5},
    }
    _png(report.plot_domain_miou(results, tmp_path / "domains.png"))
    (ax,) = figures[0].axes
    containers = {c.get_label(): c for c in ax.containers}
    assert list(containers) == ["source", "target"]
    heights = {d: [bar.get_height() for bar in c] for d, c in containers.items()}
    np.testing.assert_allclose(heights["source"], [97, 95, np.nan])
    np.testing.assert_allclose(heights["target"], [8, 90, 50])
    # Bars of one model sit side by side over that model's tick.
    ticks = dict(zip([t.get_text() for t in ax.get_xticklabels()], ax.get_xticks()))
    assert list(ticks) == list(results)
    for i, label in enumerate(results):
        centres = [
            bar.get_x() + bar.get_width() / 2
            for bar in (containers["source"][i], containers["target"][i])
        ]
        np.testing.assert_allclose(np.mean(centres), ticks[label])
        assert centres[0] < centres[1]
    assert sorted(t.get_text() for t in ax.texts) == sorted(
        ["97.0", "95.0", "8.0", "90.0", "50.0"]
    )


def test_tradeoff_points_in_weight_order(tmp_path, figures):
    path = report.plot_tradeoff(
        [
            {"kl_weight": 1, "source": 0.96, "target": 0.8},
            {"kl_weight": 0, "source": 0.1, "target": 0.91},
            {"kl_weight": 0.5, "source": 0.6, "target": 0.85},
        ],
        tmp_path / "tradeoff.png",
        reference={"source": 0.97, "target": 0.08},
    )
    _png(path)
    (ax,) = figures[0].axes
    # x: target mIoU, y: source mIoU, in %, sorted by KL weight.
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [91, 85, 80])
    np.testing.assert_allclose(line.get_ydata(), [10, 60, 96])
    points, star = ax.collections
    np.testing.assert_allclose(points.get_offsets(), [[91, 10], [85, 60], [80, 96]])
    np.testing.assert_allclose(star.get_offsets(), [[8, 97]])
    assert star.get_label() == "source model"
    assert [t.get_text() for t in ax.texts] == ["w=0", "w=0.5", "w=1"]


def test_overlay_grid_colours_each_prediction(tmp_path, figures):
    colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    images = np.full((2, 8, 8, 3), 100, np.uint8)
    a = np.zeros((2, 8, 8), int)
    a[1, 2, 3] = 1
    b = np.ones((2, 8, 8), int)
    masks = np.full((2, 8, 8), 255)
    masks[0, 2:6, 2:6] = 0
    path = report.plot_overlays(
        images,
        {"a": a, "b": b},
        tmp_path / "overlays.png",
        masks=masks,
        class_names=["x", "y"],
        colors=colors,
    )
    png = _png(path)
    fig = figures[0]
    grid = np.array(fig.axes[:8]).reshape(2, 4)
    assert [ax.get_title() for ax in grid[0]] == ["image", "ground truth", "a", "b"]
    # (100 + 255) / 2 rounds to 178; 100 / 2 = 50.
    red, blue, gray = [178, 50, 50], [50, 50, 178], [100, 100, 100]
    shown = [[ax.get_images()[0].get_array() for ax in row] for row in grid]
    np.testing.assert_array_equal(shown[0][0], images[0])
    expected_truth = np.broadcast_to(gray, (8, 8, 3)).copy()
    expected_truth[2:6, 2:6] = red
    np.testing.assert_array_equal(shown[0][1], expected_truth)
    np.testing.assert_array_equal(shown[1][1], np.broadcast_to(gray, (8, 8, 3)))
    np.testing.assert_array_equal(shown[0][2], np.broadcast_to(red, (8, 8, 3)))
    expected_a = np.broadcast_to(red, (8, 8, 3)).copy()
    expected_a[2, 3] = blue
    np.testing.assert_array_equal(shown[1][2], expected_a)
    for row in shown:
        np.testing.assert_array_equal(row[3], np.broadcast_to(blue, (8, 8, 3)))
    # The written PNG: the centre of each panel has that panel's colour.
    centres = [[_center_pixel(fig, ax, png).tolist() for ax in row] for row in grid]
    assert centres == [[gray, red, red, blue], [gray, gray, red, blue]]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["x", "y"]
    np.testing.assert_allclose(
        [h.get_facecolor()[:3] for h in legend.legend_handles], colors / 255
    )


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
