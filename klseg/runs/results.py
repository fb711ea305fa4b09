"""What the jobs return, and the plain-text tables the command line prints."""

import dataclasses
import math
from pathlib import Path

__all__ = [
    "DemoResult",
    "PathResult",
    "PredictResult",
    "RunResult",
    "SweepResult",
    "format_domain_table",
    "format_metrics",
    "pct",
]


@dataclasses.dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        output: the run folder.
        model_path: ``OUTPUT/model.keras``.
        metrics: the content of ``metrics.json``.
        best_epoch: 1-based epoch of ``model.keras``.
        epochs: epochs completed.
    """

    output: Path
    model_path: Path
    metrics: dict
    best_epoch: int | None
    epochs: int

    def summary(self):
        lines = [f"Run folder: {self.output}", f"Best model: {self.model_path}"]
        if self.best_epoch:
            lines[-1] += f" (epoch {self.best_epoch} of {self.epochs})"
        for domain in ("val", "source", "target"):
            m = self.metrics.get(domain)
            if isinstance(m, dict) and m.get("mean_iou") is not None:
                lines.append(f"{domain} mean IoU: {100 * m['mean_iou']:.1f}")
        return "\n".join(lines)


@dataclasses.dataclass
class SweepResult:
    """A fine-tuning sweep over several KL weights.

    Attributes:
        output: the sweep folder (one ``kl_W`` run folder per weight;
            ``cons_C`` per consistency weight; ``kl_W_cons_C`` for a grid).
        runs: ``{kl_weight: RunResult}`` (``{consistency_weight: ...}``
            for a consistency sweep, ``{(kl_weight, consistency_weight):
            ...}`` for a grid).
        table: rows ``{"kl_weight", "source", "target", "label", "folder",
            ...}`` (mIoU in [0, 1]).
        tradeoff_plot: the PNG of source vs target mIoU.
    """

    output: Path
    runs: dict
    table: list
    tradeoff_plot: Path

    def summary(self):
        lines = [f"Sweep folder: {self.output}", _sweep_table_text(self.table)]
        lines.append(f"Trade-off plot: {self.tradeoff_plot}")
        return "\n".join(lines)


@dataclasses.dataclass
class DemoResult:
    """What :func:`demo` produced: the table, the folder and the wall time."""

    output: Path
    table: dict
    seconds: float
    export_path: Path | None

    def summary(self):
        lines = ["", format_domain_table(self.table), ""]
        lines.append(f"Report: {self.output / 'report.md'}")
        if self.export_path:
            lines.append(f"SavedModel: {self.export_path}")
        lines.append(f"Wall time: {self.seconds / 60:.1f} min")
        return "\n".join(lines)


def _sweep_table_text(rows):
    if any("consistency_weight" in row for row in rows):
        width = max(len("setting"), *(len(row["label"]) for row in rows))
        lines = [f"{'setting':<{width}}  source mIoU  target mIoU"]
        lines += [
            f"{row['label']:<{width}}  {pct(row.get('source')):>11}  "
            f"{pct(row.get('target')):>11}"
            for row in rows
        ]
        return "\n".join(lines)
    lines = ["kl_weight  source mIoU  target mIoU"]
    for row in rows:
        lines.append(
            f"{row['kl_weight']:>9g}  {pct(row.get('source')):>11}  "
            f"{pct(row.get('target')):>11}"
        )
    return "\n".join(lines)


def pct(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.1f}"


def format_domain_table(table):
    """Plain-text table of ``{model: {"source": miou, "target": miou}}``."""
    width = max([len("model")] + [len(k) for k in table])
    lines = [
        f"{'model':<{width}}  source mIoU  target mIoU",
        f"{'-' * width}  -----------  -----------",
    ]
    for name, row in table.items():
        lines.append(
            f"{name:<{width}}  {pct(row.get('source')):>11}  "
            f"{pct(row.get('target')):>11}"
        )
    return "\n".join(lines)


def format_metrics(result):
    """Human-readable text of :func:`evaluate`'s result."""
    lines = [
        f"Model: {result.get('model')}",
        f"Data:  {result.get('data')} ({result.get('num_images')} images at "
        f"{result.get('image_size')}px)",
        f"mean IoU:       {pct(result.get('mean_iou'))}",
        f"pixel accuracy: {pct(result.get('pixel_accuracy'))}",
    ]
    columns = [
        (title, result[key])
        for title, key in (
            ("IoU", "per_class_iou"),
            ("precision", "per_class_precision"),
            ("recall", "per_class_recall"),
        )
        if isinstance(result.get(key), dict)
    ]
    names = list(result.get("per_class_iou") or {})
    width = max([5] + [len(k) for k in names])
    lines.append("Per class (%):")
    lines.append("  " + " " * width + "".join(f"  {t:>9}" for t, _ in columns))
    for name in names:
        cells = []
        for title, values in columns:
            value = values.get(name)
            cells.append(
                ("absent" if title == "IoU" else "n/a") if value is None else pct(value)
            )
        lines.append(f"  {name:<{width}}" + "".join(f"  {c:>9}" for c in cells))
    if len(columns) > 1:
        lines.append(
            "  absent: no pixel in masks or predictions; n/a: never predicted "
            "(precision), no pixel in the masks (recall)"
        )
    matrix = result.get("confusion_matrix")
    if matrix and len(matrix["class_names"]) <= _MAX_TEXT_CLASSES:
        lines += ["Confusion counts (rows: true class, columns: predicted):"]
        lines += _count_table(matrix["class_names"], matrix["counts"])
    elif matrix:
        lines.append("Confusion counts: see --json (too many classes to print).")
    if result.get("plot"):
        lines.append(f"Confusion-matrix plot: {result['plot']}")
    return "\n".join(lines)


_MAX_TEXT_CLASSES = 20


def _count_table(names, counts):
    width = max([len(n) for n in names] + [len(str(v)) for row in counts for v in row])
    lines = ["  " + " " * width + "".join(f"  {n:>{width}}" for n in names)]
    for name, row in zip(names, counts):
        lines.append(f"  {name:<{width}}" + "".join(f"  {v:>{width}}" for v in row))
    return lines


@dataclasses.dataclass
class PredictResult:
    output: Path
    num_images: int
    masks: Path
    overlays: Path | None

    def summary(self):
        text = f"Wrote {self.num_images} masks to {self.masks}"
        if self.overlays:
            text += f" and overlays to {self.overlays}"
        return text


@dataclasses.dataclass
class PathResult:
    path: Path
    message: str

    def summary(self):
        return f"{self.message}: {self.path}"
