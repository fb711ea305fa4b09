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
        output: the sweep folder (one ``kl_W`` run folder per weight).
        runs: ``{kl_weight: RunResult}``.
        table: rows ``{"kl_weight", "source", "target"}`` (mIoU in [0, 1]).
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
        "IoU per class:",
    ]
    per_class = result.get("per_class_iou") or {}
    width = max([5] + [len(k) for k in per_class])
    for name, value in per_class.items():
        shown = "absent" if value is None else pct(value)
        lines.append(f"  {name:<{width}}  {shown:>6}")
    return "\n".join(lines)


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
