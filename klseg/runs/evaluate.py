"""``klseg evaluate``: scores of a model on a labelled folder."""

import json
from pathlib import Path

from klseg import errors
from klseg.files import write_json
from klseg.runs import inputs, runtime
from klseg.runs.checks import size_text
from klseg.runs.folder import check_inputs_not_outputs
from klseg.runs.scoring import evaluate_model

__all__ = ["evaluate"]

_RESULT_KEYS = {"model", "data", "mean_iou", "per_class_iou"}


def _check_file_target(path, option, example):
    """A file to write: its folder can be made and it is not a folder."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise errors.RunError(
                    f"cannot write {option} {path}: {parent} is a file, not a folder."
                )
            break
    if path.is_dir():
        raise errors.RunError(
            f"{option} {path} is a folder; name a file (e.g. {path}/{example})."
        )
    return path


def _check_plot_file(path, output=None):
    """The confusion-matrix PNG: an existing file there must be a plot klseg
    drew (its PNG title says so); never the --output file."""
    path = _check_file_target(path, "--plot", "confusion.png")
    if output is not None and path.resolve() == Path(output).resolve():
        raise errors.RunError(
            f"--plot {path} and --output {output} name the same file; choose two."
        )
    if path.exists():
        from klseg import report

        if not report.is_confusion_plot(path):
            raise errors.RunError(
                f"--plot {path} exists and is not a klseg confusion-matrix plot; "
                "klseg does not overwrite files it did not write. Choose another "
                "file name."
            )


def _check_output_file(path):
    """An output JSON file: its folder can be made, and an existing file
    there is an earlier klseg evaluation (never someone else's file)."""
    path = _check_file_target(path, "--output", "metrics.json")
    if path.exists():
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            content = None
        if not isinstance(content, dict) or not _RESULT_KEYS <= set(content):
            raise errors.RunError(
                f"--output {path} exists and is not a klseg evaluation result; "
                "klseg does not overwrite files it did not write. Choose another "
                "file name."
            )


def evaluate(cfg):
    """Evaluate a model on a labelled folder.

    The images are resized to ``image_size``; with ``cfg.tile_size`` or
    ``cfg.tta`` they are then predicted in windows and/or with the flip
    (:func:`klseg.inference.predict_probabilities`) and scored by the same
    confusion counts. A tile as large as the images gives the whole-image
    scores.

    Returns:
        ``{"model", "data", "image_size", "inference", "num_images", "loss",
        "mean_iou", "pixel_accuracy", "per_class_iou", "per_class_precision",
        "per_class_recall", "confusion_matrix"}`` (``inference``:
        ``tile_size``, ``tile_overlap``, ``tta``; ``confusion_matrix``:
        ``class_names`` and ``counts``, rows: true class, columns: predicted
        class; see :func:`klseg.evaluation.scores`); also written to
        ``cfg.output`` when set (an earlier result there is replaced, any
        other file is refused). With ``cfg.plot`` the row-normalised matrix
        is drawn to that PNG (:func:`klseg.report.plot_confusion`; an earlier
        plot there is replaced, any other file is refused) and the result
        holds ``"plot"``.
    """
    from klseg import data, inference, models

    if cfg.output or cfg.plot:
        check_inputs_not_outputs(
            {"--output": cfg.output, "--plot": cfg.plot},
            {"--model": cfg.model, "--data": cfg.data, "--class-map": cfg.class_map},
        )
    if cfg.output:
        _check_output_file(cfg.output)
    if cfg.plot:
        _check_plot_file(cfg.plot, cfg.output)
    model = inputs.load_model(cfg.model)
    num_classes, multiple = inputs.model_info(model, cfg.model)
    # The given size, else the model's training size, else the data's own.
    image_size = cfg.image_size or inputs.run_image_size(cfg.model, model)
    if image_size is not None:
        inputs.check_image_size(image_size, multiple)
    inference.check_tile_size(cfg.tile_size, multiple, name="--tile-size")
    split = inputs.load_split(cfg.data, cfg)
    if image_size is None:
        image_size = inputs.data_image_size(split)
        inputs.check_image_size(image_size, multiple)
    inputs.check_labels(
        split,
        num_classes,
        "--data",
        f"The model predicts {num_classes} classes. Use --class-map to map "
        "the mask values to the model's classes.",
    )
    dataset = data.make_dataset(
        split,
        batch_size=cfg.batch_size,
        image_size=image_size,
        ignore_value=cfg.ignore_value,
        cache=inputs.cache_in_memory(split, image_size),
    )
    try:
        result = evaluate_model(
            model,
            dataset,
            num_classes=num_classes,
            ignore_value=cfg.ignore_value,
            class_names=models.get_class_names(model),
            options=cfg,
        )
    except Exception as e:
        if not runtime.out_of_memory(e):
            raise
        raise errors.ResourceError(
            f"out of memory evaluating {cfg.model} on {cfg.data} at "
            f"{size_text(image_size)} ({runtime.first_line(e)}): predict in "
            "windows with --tile-size N (e.g. --tile-size 512), or lower "
            "--batch-size or --image-size."
        ) from None
    options = cfg.inference_kwargs()
    if options["tile_size"] is not None:
        options["tile_size"] = list(options["tile_size"])
    result = {
        "model": str(cfg.model) if isinstance(cfg.model, (str, Path)) else model.name,
        "data": str(cfg.data),
        "image_size": image_size,
        "inference": options,
        **result,
    }
    if cfg.plot:
        from klseg import report

        matrix = result["confusion_matrix"]
        report.plot_confusion(
            matrix["counts"],
            matrix["class_names"],
            cfg.plot,
            title=f"Confusion matrix on {Path(str(cfg.data)).name or cfg.data}",
        )
        result["plot"] = str(cfg.plot)
    if cfg.output:
        write_json(cfg.output, result)
    return result
