"""Confusion matrices: the per-class scores, ``klseg evaluate``'s counts and
plot, and the confusion sections of the run reports.

The scores are checked against float64 numpy computed pixel by pixel from
the masks and predictions; the run checks recount the saved model's
predictions on the folder's images (tiny 32x32 data, a 2-level U-Net with 4
base filters, 1 epoch).
"""

import doctest
import json

import numpy as np
import pytest
from helpers import SIZE, invoke, ok, read_folder, train_args
from PIL import Image

from klseg import errors, evaluation, report, runs
from klseg.data import synthetic

NAMES = ["sky", "road", "car", "sign", "boat"]


def _reference(masks, predicted, num_classes, ignore=255):
    """Float64 precision, recall, IoU and counts, one class at a time."""
    valid = (masks != ignore) & (masks >= 0) & (masks < num_classes)
    counts = np.zeros((num_classes, num_classes), np.int64)
    for i in range(num_classes):
        for j in range(num_classes):
            counts[i, j] = np.sum(valid & (masks == i) & (predicted == j))
    out = {"precision": [], "recall": [], "iou": []}
    for c in range(num_classes):
        tp = float(np.sum(valid & (masks == c) & (predicted == c)))
        fp = float(np.sum(valid & (masks != c) & (predicted == c)))
        fn = float(np.sum(valid & (masks == c) & (predicted != c)))
        out["precision"].append(tp / (tp + fp) if tp + fp else None)
        out["recall"].append(tp / (tp + fn) if tp + fn else None)
        out["iou"].append(tp / (tp + fp + fn) if tp + fp + fn else None)
    return counts, out


def _hand_case():
    """Masks and predictions with every case of the absent rule.

    - sky (0), road (1): in masks and predictions;
    - car (2): in the masks, never predicted (precision None);
    - sign (3): predicted, never in the masks (recall None, IoU 0);
    - boat (4): predicted only on ignored pixels (255) and out-of-range mask
      values (7): absent (all three None).
    """
    masks = np.array(
        [
            [[0, 0, 1, 1], [0, 2, 2, 1], [255, 255, 7, 1]],
            [[1, 1, 0, 0], [2, 2, 1, 0], [0, 255, 1, 1]],
        ]
    )
    predicted = np.array(
        [
            [[0, 1, 1, 1], [0, 0, 1, 3], [4, 4, 4, 1]],
            [[1, 0, 0, 3], [0, 1, 1, 0], [0, 4, 3, 1]],
        ]
    )
    return masks, predicted


def test_scores_against_float64_numpy():
    masks, predicted = _hand_case()
    c = len(NAMES)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(*predicted.shape, c))
    logits += 10.0 * np.eye(c)[predicted]  # argmax is `predicted`
    counts = evaluation.ConfusionCounts(c)
    counts.update(masks[:1], logits[:1])  # two batches: the counts add up
    counts.update(masks[1:], logits[1:])
    result = counts.result(NAMES)
    expected_counts, ref = _reference(masks, predicted, c)
    assert result["confusion_matrix"]["class_names"] == NAMES
    assert result["confusion_matrix"]["counts"] == expected_counts.tolist()
    assert all(
        type(v) is int for row in result["confusion_matrix"]["counts"] for v in row
    )
    for key, name in (
        ("precision", "per_class_precision"),
        ("recall", "per_class_recall"),
        ("iou", "per_class_iou"),
    ):
        assert list(result[name]) == NAMES
        assert result[name] == pytest.approx(dict(zip(NAMES, ref[key])), abs=1e-12)
    # The documented rule, case by case.
    assert result["per_class_precision"]["car"] is None
    assert result["per_class_recall"]["car"] == 0.0
    assert result["per_class_recall"]["sign"] is None
    assert result["per_class_precision"]["sign"] == 0.0
    assert result["per_class_iou"]["sign"] == 0.0
    for name in ("per_class_iou", "per_class_precision", "per_class_recall"):
        assert result[name]["boat"] is None
    defined = [v for v in ref["iou"] if v is not None]
    assert result["mean_iou"] == pytest.approx(np.mean(defined), abs=1e-12)
    valid = (masks != 255) & (masks < c)
    assert result["pixel_accuracy"] == pytest.approx(
        np.mean(masks[valid] == predicted[valid]), abs=1e-12
    )
    # The scores of the counts alone are the same, and JSON keeps them.
    again = evaluation.scores(expected_counts, class_names=NAMES)
    assert again["per_class_recall"] == result["per_class_recall"]
    assert (
        json.loads(json.dumps(result))["confusion_matrix"]
        == (result["confusion_matrix"])
    )


def test_scores_without_any_valid_pixel():
    result = evaluation.scores(np.zeros((2, 2), np.int64))
    assert result["per_class_precision"] == {"class_0": None, "class_1": None}
    assert result["per_class_recall"] == {"class_0": None, "class_1": None}
    assert result["confusion_matrix"]["counts"] == [[0, 0], [0, 0]]


def test_evaluation_doctests():
    result = doctest.testmod(evaluation)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------


def _matrix_axes(fig):
    (ax,) = [a for a in fig.axes if a.get_xlabel() == "predicted class"]
    return ax


def test_plot_confusion_draws_row_normalised_counts(tmp_path, figures):
    counts = np.array([[6, 2, 0], [0, 0, 0], [1, 1, 3]])
    path = report.plot_confusion(counts, ["sky", "road", "car"], tmp_path / "c.png")
    ax = _matrix_axes(figures[-1])
    drawn = ax.images[0].get_array()
    rows = counts / counts.sum(1, keepdims=True).clip(1)
    np.testing.assert_allclose(drawn[[0, 2]].data, rows[[0, 2]], rtol=1e-12)
    assert drawn.mask[1].all() and not drawn.mask[[0, 2]].any()  # empty row
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sky", "road", "car"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sky", "road", "car"]
    texts = {(round(t.get_position()[1]), t.get_text()) for t in ax.texts}
    assert (0, "0.75") in texts and (2, "0.60") in texts and (1, "no pixels") in texts
    assert not any(y == 1 and t != "no pixels" for y, t in texts)
    # The written PNG carries the marker; other PNGs do not.
    assert report.is_confusion_plot(path)
    Image.new("RGB", (4, 4)).save(tmp_path / "other.png")
    assert not report.is_confusion_plot(tmp_path / "other.png")
    assert not report.is_confusion_plot(tmp_path / "missing.png")

    report.plot_confusion(counts, ["a", "b", "c"], tmp_path / "p.png", normalize="pred")
    cols = _matrix_axes(figures[-1]).images[0].get_array()
    np.testing.assert_allclose(cols[:, 0].data, counts[:, 0] / 7, rtol=1e-12)
    report.plot_confusion(counts, ["a", "b", "c"], tmp_path / "n.png", normalize=None)
    raw = _matrix_axes(figures[-1]).images[0].get_array()
    np.testing.assert_array_equal(raw.data, counts)


def test_plot_confusion_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        report.plot_confusion([[1, 0], [0, 1]], ["a"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        report.plot_confusion([[1, 0, 0], [0, 1, 0]], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="normalize"):
        report.plot_confusion([[1]], ["a"], tmp_path / "x.png", normalize="rows")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------
# klseg evaluate and the run report
# --------------------------------------------------------------------------


BENCH = {"num_train": 4, "num_unlabeled": 2, "num_target_train": 2}


@pytest.fixture(scope="module")
def train_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "train"
    ok(
        *train_args(bench, out),
        "--epochs",
        1,
        "--base-filters",
        4,
        "--depth",
        2,
        "--image-size",
        SIZE,
        "--batch-size",
        4,
        "--quiet",
    )
    return out


def _folder_counts(folder, model_path):
    images, masks = read_folder(folder)
    logits = runs.load_model(model_path).predict(images, verbose=0)
    return _reference(masks, logits.argmax(-1), synthetic.NUM_CLASSES)


def test_evaluate_json_counts_and_plot(bench, train_run, tmp_path):
    model = train_run / "model.keras"
    val = bench / "source" / "val"
    plot = tmp_path / "plots" / "confusion.png"
    result = ok("evaluate", "--model", model, "--data", val, "--json", "--plot", plot)
    metrics = json.loads(result.output)
    counts, ref = _folder_counts(val, model)
    assert counts.sum() > 0
    assert metrics["confusion_matrix"] == {
        "class_names": list(synthetic.CLASS_NAMES),
        "counts": counts.tolist(),
    }
    names = synthetic.CLASS_NAMES
    assert metrics["per_class_precision"] == pytest.approx(
        dict(zip(names, ref["precision"])), abs=1e-9
    )
    assert metrics["per_class_recall"] == pytest.approx(
        dict(zip(names, ref["recall"])), abs=1e-9
    )
    assert metrics["plot"] == str(plot) and report.is_confusion_plot(plot)
    # The run's own metrics.json holds the same counts (same model and data).
    saved = json.loads((train_run / "metrics.json").read_text())
    assert saved["val"]["confusion_matrix"]["counts"] == counts.tolist()

    # Text output: the per-class table and the counts, and the plot again
    # (an earlier klseg plot is replaced).
    text = ok("evaluate", "--model", model, "--data", val, "--plot", plot).output
    assert "precision" in text and "recall" in text
    table = text.split("Confusion counts (rows: true class, columns: predicted):")[1]
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [r[0] for r in rows[: len(names)]] == list(names)
    assert [[int(v) for v in r[1:]] for r in rows[: len(names)]] == counts.tolist()


def test_evaluate_plot_refusals(bench, train_run, tmp_path):
    model = train_run / "model.keras"
    val = bench / "source" / "val"
    mine = tmp_path / "mine.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(mine)
    before = mine.read_bytes()
    base = ["evaluate", "--model", model, "--data", val]
    result = invoke(*base, "--plot", mine)
    assert result.exit_code == 1
    assert "not a klseg confusion-matrix plot" in result.output
    assert mine.read_bytes() == before
    result = invoke(*base, "--plot", "c.jpg")
    assert result.exit_code == 2 and ".png" in result.output
    same = tmp_path / "both.png"
    result = invoke(*base, "--plot", same, "--output", same)
    assert result.exit_code == 1 and "same file" in result.output
    assert not same.exists()


def test_train_report_shows_the_confusion_matrix(train_run, bench):
    text = (train_run / "report.md").read_text()
    assert "## Confusion matrix on the validation images" in text
    assert "(plots/confusion_val.png)" in text
    assert report.is_confusion_plot(train_run / "plots" / "confusion_val.png")
    assert "| class | pixels | IoU (%) | precision (%) | recall (%) |" in text
    counts, _ = _folder_counts(bench / "source" / "val", train_run / "model.keras")
    for name, row in zip(synthetic.CLASS_NAMES, counts):
        assert f"| {name} | {row.sum()} |" in text


def test_finetune_report_shows_a_confusion_matrix_per_domain(
    bench, train_run, tmp_path
):
    out = tmp_path / "finetune"
    ok(
        "finetune",
        "--source",
        train_run / "model.keras",
        "--data",
        bench / "target" / "train",
        "--val-data",
        bench / "target" / "val",
        "--source-val-data",
        bench / "source" / "val",
        "--output",
        out,
        "--epochs",
        1,
        "--image-size",
        SIZE,
        "--batch-size",
        2,
        "--quiet",
    )
    text = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    for domain in ("target", "source"):
        assert f"## Confusion matrix on {domain}-domain images" in text
        assert f"(plots/confusion_{domain}.png)" in text
        assert report.is_confusion_plot(out / "plots" / f"confusion_{domain}.png")
        counts, _ = _folder_counts(bench / domain / "val", out / "model.keras")
        assert metrics[domain]["confusion_matrix"]["counts"] == counts.tolist()


def test_plot_option_and_config_key_reach_the_job(monkeypatch, tmp_path):
    seen = []

    def fake_evaluate(cfg):
        seen.append(cfg)
        return {"model": "m", "data": "v", "per_class_iou": {}}

    monkeypatch.setattr(runs, "evaluate", fake_evaluate)
    ok("evaluate", "--model", "m.keras", "--data", "v", "--plot", "a.png")
    config = tmp_path / "c.yaml"
    config.write_text("evaluate:\n  plot: b.png\n")
    ok("evaluate", "--config", config, "--model", "m.keras", "--data", "v")
    assert [cfg.plot for cfg in seen] == ["a.png", "b.png"]
    with pytest.raises(errors.InvalidArgumentError, match=r"plot must name a \.png"):
        runs.EvaluateConfig(model="m.keras", data="v", plot="c.svg")
