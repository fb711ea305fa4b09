"""Plots and the run report (matplotlib Agg, PNG files and markdown).

Everything here works on plain numbers and numpy arrays, so it runs without
Keras: the jobs in :mod:`klseg.runs` collect the values and call these
functions. Figures are drawn on :class:`matplotlib.figure.Figure` objects
with the Agg canvas (no GUI, no global pyplot state) and written to a
temporary file that is then renamed into place, so a report file is either
complete or absent.

Example:

>>> import numpy as np, tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> rows = [{"epoch": 0, "loss": 1.0, "val_mean_iou": 0.3},
...         {"epoch": 1, "loss": 0.5, "val_mean_iou": 0.6}]
>>> plot_history(rows, out / "curves.png").name
'curves.png'
"""

import csv
import math
import os
from pathlib import Path

import numpy as np

from klseg.files import atomic_path, atomic_write_text

__all__ = [
    "palette",
    "colorize",
    "overlay",
    "read_history",
    "plot_history",
    "plot_domain_miou",
    "plot_tradeoff",
    "plot_overlays",
    "plot_confusion",
    "is_confusion_plot",
    "confusion_section",
    "markdown_table",
    "write_report",
]

_DPI = 100

#: The PNG ``Title`` of a confusion-matrix plot: how klseg recognises one it
#: wrote (and may replace).
CONFUSION_PLOT_TITLE = "klseg confusion matrix"


# --------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------


def palette(num_classes):
    """A fixed colour per class, as uint8 RGB of shape ``(num_classes, 3)``.

    The first 20 colours are matplotlib's ``tab20`` (darker shade first, then
    the lighter); further classes get evenly spaced hues.
    """
    from matplotlib import colormaps

    if num_classes < 1:
        raise ValueError(
            "num_classes must be a positive integer. "
            f"Received: num_classes={num_classes}"
        )
    tab = colormaps["tab20"].colors
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    colors = [tab[i] for i in order]
    if num_classes > len(colors):
        hsv = colormaps["hsv"]
        extra = num_classes - len(colors)
        colors += [hsv(i / extra)[:3] for i in range(extra)]
    return np.round(np.asarray(colors[:num_classes]) * 255).astype(np.uint8)


def colorize(mask, colors, *, ignore_value=255):
    """Colour image of an index mask; ignored and unknown values are black.

    Args:
        mask: integer array (H, W) of class indices.
        colors: uint8 array (C, 3), e.g. from :func:`palette`.
        ignore_value: mask value drawn black. Defaults to 255.

    Returns:
        uint8 array (H, W, 3).
    """
    mask = np.asarray(mask)
    colors = np.asarray(colors, dtype=np.uint8)
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    valid = (mask >= 0) & (mask < len(colors)) & (mask != ignore_value)
    out[valid] = colors[mask[valid]]
    return out


def overlay(image, mask, colors, *, alpha=0.5, ignore_value=255):
    """Blend class colours over an image: ``(1 - alpha) * image + alpha * colour``.

    Ignored pixels keep the image unchanged.

    Args:
        image: uint8 array (H, W, 3).
        mask: integer array (H, W).
        colors: uint8 array (C, 3).
        alpha: opacity of the colours in [0, 1]. Defaults to 0.5.
        ignore_value: mask value left uncoloured. Defaults to 255.

    Returns:
        uint8 array (H, W, 3).
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.shape[:2] != mask.shape:
        raise ValueError(
            "image and mask must have the same height and width. Received: "
            f"image.shape={image.shape}, mask.shape={mask.shape}"
        )
    color = colorize(mask, colors, ignore_value=ignore_value).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * color
    keep = (mask == ignore_value) | (mask < 0) | (mask >= len(colors))
    blended[keep] = image[keep]
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _save_figure(fig, path):
    """Write ``fig`` atomically; a PNG of a labelled figure gets the label as
    its ``Title`` text."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    metadata = {"Title": fig.get_label()} if fmt == "png" and fig.get_label() else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, format=fmt, metadata=metadata)
    return Path(path)


def _write_text(path, text):
    return atomic_write_text(path, text)


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def read_history(path):
    """Rows of a history CSV (as written by ``keras.callbacks.CSVLogger``).

    Numbers become floats (``epoch`` an int); empty cells are dropped.
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if key is None or value in (None, ""):
                    continue
                try:
                    row[key] = int(value) if key == "epoch" else float(value)
                except ValueError:
                    row[key] = value
            rows.append(row)
    return rows


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def _finite(values):
    return [
        v if isinstance(v, (int, float)) and math.isfinite(v) else np.nan
        for v in values
    ]


def plot_history(rows, path, *, title="Training curves"):
    """Training curves: losses on the left, every other metric on the right.

    Args:
        rows: list of dicts, one per epoch, with an ``epoch`` key and metric
            columns (``loss``, ``val_loss``, ``val_mean_iou``, ...).
        path: PNG file to write.
        title: figure title.

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("rows must hold at least one epoch. Received: rows=[]")
    epochs = [int(r.get("epoch", i)) + 1 for i, r in enumerate(rows)]
    keys = []
    for row in rows:
        for key in row:
            if key != "epoch" and key not in keys:
                keys.append(key)
    losses = [k for k in keys if "loss" in k]
    others = [k for k in keys if k not in losses and k not in ("learning_rate", "lr")]
    fig = _figure(10, 3.8)
    axes = fig.subplots(1, 2)
    for ax, group, label in ((axes[0], losses, "loss"), (axes[1], others, "metric")):
        for key in group:
            values = _finite([r.get(key) for r in rows])
            style = "--" if key.startswith("val_") else "-"
            ax.plot(epochs, values, style, marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save_figure(fig, path)


def plot_domain_miou(results, path, *, title="Mean IoU per domain"):
    """Grouped bars: each model's mean IoU on the source and target domains.

    Args:
        results: ``{model label: {"source": miou, "target": miou}}`` with mIoU
            in [0, 1]; a missing domain is left out.
        path: PNG file to write.

    Returns:
        The path written.
    """
    labels = list(results)
    domains = [d for d in ("source", "target") if any(d in r for r in results.values())]
    fig = _figure(max(5, 1.8 * len(labels) + 1), 3.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(domains))
    x = np.arange(len(labels))
    for i, domain in enumerate(domains):
        values = [100 * results[label].get(domain, np.nan) for label in labels]
        bars = ax.bar(
            x + (i - (len(domains) - 1) / 2) * width, values, width, label=domain
        )
        for bar, value in zip(bars, values):
            if np.isfinite(value):
                ax.annotate(
                    f"{value:.1f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(x, labels)
    ax.set_ylabel("mean IoU (%)")
    ax.set_ylim(0, 105)
    ax.legend(title="validation domain")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def plot_tradeoff(points, path, *, reference=None, title="Source vs target mean IoU"):
    """The KL-weight trade-off: source mIoU against target mIoU, one point per weight.

    Args:
        points: list of dicts with ``kl_weight``, ``source`` and ``target``
            (mIoU in [0, 1]), and optionally ``consistency_weight`` (points
            are drawn in the order of the two weights) and ``label`` (the
            point's annotation; defaults to ``w=<kl_weight>``).
        path: PNG file to write.
        reference: optional ``{"source": ..., "target": ...}`` of the source
            model before fine-tuning, drawn as a star.

    Returns:
        The path written.
    """
    points = sorted(
        points, key=lambda p: (p["kl_weight"], p.get("consistency_weight", 0.0))
    )
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    xs = [100 * p["target"] for p in points]
    ys = [100 * p["source"] for p in points]
    ax.plot(xs, ys, "-", color="0.6", zorder=1)
    ax.scatter(xs, ys, c=range(len(points)), cmap="viridis", zorder=2, s=40)
    for p, x, y in zip(points, xs, ys):
        ax.annotate(
            p.get("label") or f"w={p['kl_weight']:g}",
            (x, y),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    if reference is not None:
        ax.scatter(
            [100 * reference["target"]],
            [100 * reference["source"]],
            marker="*",
            s=160,
            color="tab:red",
            label="source model",
            zorder=3,
        )
        ax.legend(fontsize=8)
    ax.set_xlim(0, 105)
    ax.set_ylim(0, 105)
    ax.set_xlabel("target-domain mean IoU (%)")
    ax.set_ylabel("source-domain mean IoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def plot_overlays(
    images,
    predictions,
    path,
    *,
    masks=None,
    class_names=None,
    colors=None,
    ignore_value=255,
    alpha=0.5,
    title=None,
):
    """A grid of images with predicted (and, when given, true) masks overlaid.

    Args:
        images: uint8 array (N, H, W, 3) or list of (H, W, 3).
        predictions: integer masks (N, H, W), or a dict ``{column title:
            masks}`` to compare several models side by side.
        path: PNG file to write.
        masks: optional true masks (N, H, W); adds a column.
        class_names: names for the legend. Defaults to ``class_0``, ...
        colors: uint8 (C, 3). Defaults to :func:`palette`.
        ignore_value: mask value left uncoloured. Defaults to 255.
        alpha: opacity of the colours. Defaults to 0.5.

    Returns:
        The path written.
    """
    from matplotlib.patches import Patch

    n = len(images)
    if n == 0:
        raise ValueError("images must hold at least one image. Received: 0 images")
    if not isinstance(predictions, dict):
        predictions = {"prediction": predictions}
    num_classes = len(class_names) if class_names else None
    if num_classes is None:
        seen = [np.asarray(p) for preds in predictions.values() for p in preds]
        num_classes = int(max(int(p.max()) for p in seen)) + 1
    names = (
        list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    )
    colors = palette(num_classes) if colors is None else np.asarray(colors)
    columns = [("image", None), *predictions.items()]
    if masks is not None:
        columns.insert(1, ("ground truth", masks))
    fig = _figure(2.4 * len(columns), 2.4 * n + 0.8)
    axes = np.atleast_2d(fig.subplots(n, len(columns), squeeze=False))
    for i in range(n):
        image = np.asarray(images[i])
        for j, (name, source) in enumerate(columns):
            ax = axes[i, j]
            if source is None:
                ax.imshow(image)
            else:
                ax.imshow(
                    overlay(
                        image,
                        np.asarray(source[i]),
                        colors,
                        alpha=alpha,
                        ignore_value=ignore_value,
                    )
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    handles = [
        Patch(color=colors[c] / 255.0, label=names[c]) for c in range(num_classes)
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(6, num_classes),
        fontsize=8,
    )
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def _normalized(counts, normalize):
    counts = np.asarray(counts, dtype=np.float64)
    if normalize is None:
        return counts
    axis = {"true": 1, "pred": 0}[normalize]
    totals = counts.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def plot_confusion(
    counts, class_names, path, *, normalize="true", title="Confusion matrix"
):
    """A confusion matrix as a heat map, class names on both axes.

    With ``normalize="true"`` each row (true class) is divided by its sum,
    so cell ``(i, j)`` is the fraction of the pixels of class ``i`` predicted
    as ``j`` and the diagonal is the recall; a row without pixels (a class
    absent from the masks) is left empty and marked "no pixels". With
    ``"pred"`` each column is divided by its sum (the diagonal is the
    precision; a class never predicted leaves its column empty); with None
    the counts are drawn as they are. Cells are annotated with their values
    up to 30 classes.

    Args:
        counts: ``(C, C)`` integer counts, rows: true class, columns:
            predicted class (``scores(...)["confusion_matrix"]["counts"]``).
        class_names: ``C`` names, in the order of the rows.
        path: PNG file to write.
        normalize: ``"true"``, ``"pred"`` or None. Defaults to ``"true"``.
        title: axes title. Defaults to ``"Confusion matrix"``.

    Returns:
        The path written.

    Example:

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "confusion.png"
    >>> plot_confusion([[3, 1], [0, 2]], ["sky", "road"], out).name
    'confusion.png'
    """
    from matplotlib import colormaps

    counts = np.asarray(counts)
    names = [str(n) for n in class_names]
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(
            f"counts must be a square (C, C) matrix. Received: counts.shape="
            f"{counts.shape}"
        )
    if len(names) != counts.shape[0]:
        raise ValueError(
            f"class_names must hold {counts.shape[0]} names, one per row of "
            f"counts. Received: class_names={names}"
        )
    if normalize not in ("true", "pred", None):
        raise ValueError(
            "normalize must be 'true', 'pred' or None. "
            f"Received: normalize={normalize!r}"
        )
    values = _normalized(counts, normalize)
    n = len(names)
    side = min(3.0 + 0.55 * n, 24.0)
    fig = _figure(side + 1.2, side)
    fig.set_label(CONFUSION_PLOT_TITLE)
    ax = fig.subplots()
    cmap = colormaps["Blues"].with_extremes(bad="white")
    top = 1.0 if normalize else max(float(np.nanmax(values, initial=0)), 1.0)
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=top, aspect="equal"
    )
    fig.colorbar(
        image,
        ax=ax,
        shrink=0.8,
        label={
            "true": "fraction of the true class",
            "pred": "fraction of the predicted class",
            None: "pixels",
        }[normalize],
    )
    if n <= 30:
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                if np.isfinite(v):
                    text = f"{v:.2f}" if normalize else f"{int(v)}"
                    color = "white" if v > 0.5 * top else "black"
                    ax.text(
                        j, i, text, ha="center", va="center", fontsize=8, color=color
                    )
        if normalize == "true":
            for i in np.flatnonzero(np.isnan(values).all(axis=1)):
                ax.text(
                    (n - 1) / 2,
                    i,
                    "no pixels",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="0.5",
                    style="italic",
                )
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _save_figure(fig, path)


def is_confusion_plot(path):
    """Whether ``path`` is a PNG that :func:`plot_confusion` wrote."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return (
                image.format == "PNG"
                and image.text.get("Title") == CONFUSION_PLOT_TITLE
            )
    except (OSError, ValueError):
        return False


def confusion_section(scores, path, *, heading="Confusion matrix"):
    """A report section: the per-class table and the row-normalised plot.

    Args:
        scores: a :func:`klseg.evaluation.scores` dict (with
            ``confusion_matrix``, ``per_class_iou``, ``per_class_precision``
            and ``per_class_recall``).
        path: PNG file for :func:`plot_confusion`.
        heading: the section heading (also the plot's title).

    Returns:
        ``(heading, [markdown table, path])`` for :func:`write_report`.
    """
    matrix = scores["confusion_matrix"]
    names = matrix["class_names"]
    plot = plot_confusion(matrix["counts"], names, path, title=heading)

    def shown(value, missing):
        return missing if value is None else round(100 * value, 1)

    rows = [
        (
            name,
            int(sum(row)),
            shown(scores["per_class_iou"].get(name), "absent"),
            shown(scores["per_class_precision"].get(name), "never predicted"),
            shown(scores["per_class_recall"].get(name), "no pixels"),
        )
        for name, row in zip(names, matrix["counts"])
    ]
    table = markdown_table(
        ["class", "pixels", "IoU (%)", "precision (%)", "recall (%)"], rows
    )
    note = (
        "Rows: true class, columns: predicted class; each row is divided by "
        "its number of pixels, so the diagonal is the recall."
    )
    return heading, [table, note, plot]


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------


def _cell(value):
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def markdown_table(headers, rows):
    """A GitHub-flavoured markdown table; floats use 4 significant digits."""
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def write_report(path, *, title, sections):
    """Write a markdown report.

    Args:
        path: the ``.md`` file to write (atomically).
        title: top heading.
        sections: list of ``(heading, body)``; ``body`` is markdown text, or
            a path of an image (drawn relative to the report's folder), or a
            list of those.

    Returns:
        The path written.
    """
    path = Path(path)
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", ""]
        for item in body if isinstance(body, (list, tuple)) else [body]:
            if isinstance(item, Path):
                rel = os.path.relpath(item, path.parent).replace(os.sep, "/")
                parts += [f"![{item.stem}]({rel})", ""]
            else:
                parts += [str(item).rstrip(), ""]
    return _write_text(path, "\n".join(parts).rstrip() + "\n")
