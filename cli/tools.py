"""The commands that use or make models and data without training:
``evaluate``, ``predict``, ``export``, ``data synth`` and ``demo``.

Each parses its options, merges them with ``--config`` and calls one job of
:mod:`klseg.runs`.
"""

import click

from klseg.registry import (
    DEMO_DEFAULTS,
    EVALUATE_DEFAULTS,
    EXPORT_DEFAULTS,
    EXPORT_FORMATS,
    PREDICT_DEFAULTS,
    QUANTIZATIONS,
    SYNTH_DEFAULTS,
)

from .options import (
    FILE,
    PATH,
    bounded,
    build,
    config_option,
    default_option,
    inference_options,
    option_block,
    prepare_runtime,
    require,
    run_errors,
    run_job,
)
from .types import FiniteFloat, ImageSize

__all__ = ["data", "demo", "evaluate", "export", "predict", "synth"]


@click.command()
@config_option
@click.option("--model", type=PATH, help="Model file (.keras).")
@click.option(
    "--data",
    type=PATH,
    help="Labelled folder (images/ + masks/), tfds:NAME:SPLIT or a data set spec "
    "(cityscapes:PATH:val, ...: docs/data.md).",
)
@click.option(
    "--image-size",
    type=ImageSize(minimum=8),
    help="Resize to HxW (or N for NxN)  [default: the model's training size, "
    "else the images' own size].",
)
@default_option(EVALUATE_DEFAULTS, "--batch-size", type=bounded("batch_size"))
@default_option(EVALUATE_DEFAULTS, "--ignore-value", type=bounded("ignore_value"))
@click.option("--class-map", type=FILE, help="JSON file mapping mask values.")
@inference_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--output", "-o", type=PATH, help="Also write the metrics to this file.")
@click.option(
    "--plot",
    type=PATH,
    help="Also draw the confusion matrix (rows normalised) to this PNG file.",
)
@click.pass_context
@run_errors
def evaluate(ctx, **_):
    """Evaluate a model: mean IoU, pixel accuracy, per-class IoU, precision
    and recall, and the confusion counts (rows: true class, columns:
    predicted class).

    With --tile-size / --tta the (resized) images are predicted in
    overlapping windows and/or with the flip; the scores come from the same
    confusion counts.

    \b
    Example:
      klseg evaluate --model runs/finetune/model.keras --data data/target/val
      klseg evaluate --model m.keras --data val --tile-size 128 --tile-overlap 0.5
      klseg evaluate --model m.keras --data val --json --plot confusion.png
    """
    from .config_files import resolve_options

    values, _ = resolve_options(ctx)
    require(values, "model", "data")
    as_json = values.pop("as_json")
    prepare_runtime()
    from klseg import runs

    result = runs.evaluate(build(runs.EvaluateConfig, values))
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(runs.format_metrics(result))


@click.command()
@config_option
@click.option("--model", type=PATH, help="Model file (.keras).")
@click.option(
    "--images",
    type=PATH,
    help="Folder of images (or its images/), or a data set spec "
    "(cityscapes:PATH:val: the split's images).",
)
@click.option("--output", "-o", type=PATH, help="Folder for masks/ and overlays/.")
@default_option(
    PREDICT_DEFAULTS,
    "--overlay/--no-overlay",
    help="Also write colour overlays a person can look at.",
)
@default_option(
    PREDICT_DEFAULTS,
    "--alpha",
    type=FiniteFloat(0, 1),
    help="Opacity of the overlay colours.",
)
@click.option(
    "--image-size",
    type=ImageSize(minimum=8),
    help="Resize to HxW (or N for NxN) before predicting  [default: each "
    "image's own size].",
)
@inference_options
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
@run_errors
def predict(ctx, **_):
    """Predict class masks for a folder of images.

    Writes masks/NAME.png (class index per pixel, the format --data reads)
    and, with --overlay, overlays/NAME.png. Large images: --tile-size 512
    --tile-overlap 0.25 predicts them in blended windows.
    """
    run_job(ctx, "predict", "PredictConfig", "model", "images", "output")


@click.command()
@config_option
@click.option("--model", type=PATH, help="Model file (.keras).")
@click.option("--output", "-o", type=PATH, help="Export folder to write.")
@default_option(
    EXPORT_DEFAULTS,
    "--format",
    type=click.Choice(EXPORT_FORMATS),
    help="SavedModel folder, LiteRT model.tflite or model.onnx.",
)
@default_option(
    EXPORT_DEFAULTS,
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    help="TFLite weights: float32, float16, or full-integer int8 (needs "
    "--representative-data).",
)
@click.option(
    "--image-size",
    type=ImageSize(),
    help="Fixed input size HxW (or N): tflite/onnx [default: the model's "
    "training size]; saved_model [default: any size].",
)
@click.option(
    "--representative-data",
    type=PATH,
    help="Folder of typical images (or with images/) to calibrate int8 on.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@click.pass_context
@run_errors
def export(ctx, **_):
    """Export a model for serving: SavedModel, LiteRT (TFLite) or ONNX.

    saved_model: the 'serving_default' signature takes uint8 images
    (B, H, W, 3) of any size (of the --image-size when given) and returns
    'classes' (B, H, W) and 'probabilities' (B, H, W, C). tflite / onnx:
    OUTPUT/model.tflite or OUTPUT/model.onnx takes uint8 images (1, H, W, 3)
    of the --image-size (onnx: any batch) and returns the int32 class map (1, H, W).
    OUTPUT/export.json describes the export.
    """
    run_job(ctx, "export", "ExportConfig", "model", "output")


@click.group()
def data():
    """Data sets."""


def _benchmark_sizes():
    """The benchmark's image side and split sizes, and its seed."""
    return option_block(
        *(
            default_option(SYNTH_DEFAULTS, f"--{name}", type=limits)
            for name, limits in (
                ("image-size", bounded("image_side", minimum=16)),
                ("num-train", bounded("num_train")),
                ("num-val", bounded("num_val")),
                ("num-unlabeled", bounded("num_unlabeled")),
            )
        ),
        default_option(SYNTH_DEFAULTS, "--seed", type=bounded("seed")),
    )


@data.command()
@config_option
@click.option("--output", "-o", type=PATH, help="Folder to write.")
@_benchmark_sizes()
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder.")
@click.pass_context
@run_errors
def synth(ctx, **_):
    """Write the built-in two-domain benchmark as image folders.

    \b
    Layout:
      OUTPUT/{source,target}/{train,val}/{images,masks}/
      OUTPUT/{source,target}/unlabeled/images/
    """
    run_job(ctx, "synth_data", "SynthConfig", "output")


@click.command()
@config_option
@default_option(
    DEMO_DEFAULTS,
    "--output",
    "-o",
    type=PATH,
    help="Folder for the data, runs, report and export.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny version that finishes in seconds (checks the set-up; the "
    "numbers mean nothing).",
)
@click.option(
    "--image-size",
    type=ImageSize(minimum=16),
    help="Training size HxW (or N); the data is written as squares of the longer side.",
)
@click.option("--num-train", type=bounded("num_train"), help="Training images.")
@click.option("--source-epochs", type=bounded("source_epochs"), help="Source epochs.")
@click.option(
    "--finetune-epochs", type=bounded("finetune_epochs"), help="Fine-tuning epochs."
)
@click.option("--kl-weight", type=FiniteFloat(min=0), help="KL weight of the KL run.")
@default_option(DEMO_DEFAULTS, "--seed", type=bounded("seed"))
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
@run_errors
def demo(ctx, **_):
    """Show the method end to end on built-in two-domain data.

    Writes the data, trains a source model, fine-tunes it on the target
    domain without and with the KL term, prints both domains' mIoU for the
    three models, and writes report.md and a SavedModel export.
    """
    run_job(ctx, "demo", "DemoConfig")
