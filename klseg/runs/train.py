"""``klseg train``: train a segmentation model from scratch into a run folder."""

import time

from klseg.runs import hub, inputs, runtime, streams
from klseg.runs.callbacks import validation
from klseg.runs.checks import size_text
from klseg.runs.fit import (
    best_model,
    compile_model,
    finish,
    fit,
    run_in_folder,
    run_summary,
    say,
)
from klseg.runs.folder import check_inputs_not_outputs
from klseg.runs.reports import RunReport
from klseg.runs.results import pct
from klseg.runs.scoring import evaluate_model, first_batch

__all__ = ["train"]


def train(cfg, *, callbacks=None):
    """Train a segmentation model from scratch into a run folder.

    Args:
        cfg: a :class:`klseg.runs.TrainConfig`.
        callbacks: extra Keras callbacks, run after klseg's own.

    Returns:
        A :class:`klseg.runs.RunResult`.

    Raises:
        klseg.errors.DataError: unreadable or inconsistent data.
        klseg.errors.RunError: the output folder cannot be used or resumed.
        klseg.errors.TrainingDiverged: the loss became NaN or infinite.
        klseg.errors.InvalidArgumentError: an option does not fit the data
            or model (for example an image size that is not a multiple of
            the model's size multiple).
        klseg.errors.ModelError: a ``keras-hub:`` model cannot be loaded or
            outputs probabilities.
    """
    started = time.time()
    check_inputs_not_outputs(
        {"output": cfg.output},
        {
            "data": cfg.data,
            "val_data": cfg.val_data,
            "class_map": cfg.class_map,
            "style_references": cfg.style_references,
        },
    )
    if hub.is_hub_spec(cfg.model):
        hub.check_spec(cfg.model)
        hub.import_keras_hub(cfg.model)
    # Every input is read and checked before the run folder is touched.
    splits = {
        "data": inputs.load_split(cfg.data, cfg),
        "val_data": inputs.load_split(cfg.val_data, cfg),
    }
    if cfg.style_references:
        splits["style_references"] = inputs.load_split(
            cfg.style_references, cfg, require_masks=False
        )
    classes = _resolve_classes(cfg, splits["data"])
    # Without --image-size, the training images' own size (one for all).
    image_size = inputs.default_image_size(cfg, splits["data"])
    inputs.check_labels(
        splits["val_data"],
        classes[0],
        "--val-data",
        f"The model has {classes[0]} classes (from --data); remap the values "
        "with --class-map, or raise --num-classes.",
    )
    strategy, is_chief = runtime.make_strategy(cfg.strategy)

    return run_in_folder(
        cfg,
        lambda ctx: _train(ctx, *classes),
        job="train",
        strategy=strategy,
        is_chief=is_chief,
        callbacks=callbacks,
        started=started,
        splits=splits,
        image_size=image_size,
    )


def _resolve_classes(cfg, split):
    """Class count and names: options, else the data (class map, classes.json)."""
    from klseg import errors

    seen = int(getattr(split, "num_classes_seen", 0) or 0)
    num_classes = cfg.num_classes or getattr(split, "num_classes", None) or seen
    if not num_classes:
        raise errors.DataError(
            f"cannot tell the number of classes from {cfg.data}; pass --num-classes."
        )
    inputs.check_labels(
        split,
        num_classes,
        "--data",
        f"num_classes={num_classes}: raise --num-classes or remap the values "
        "with --class-map.",
    )
    names = cfg.class_names or getattr(split, "class_names", None)
    if names is not None and len(names) != num_classes:
        names = None
    return int(num_classes), names


def _train(ctx, num_classes, class_names):
    """Settings, model, streams, fit, scores, report."""
    import keras

    from klseg import models

    cfg = ctx.cfg
    keras.utils.set_random_seed(cfg.seed)
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        model = _model(ctx, num_classes, class_names, policy)
        n_train = streams.images_per_epoch(ctx.splits, cfg.batch_size)
        steps = streams.steps_per_epoch(cfg, n_train)
        # A resumed run continues the stream where its checkpoint left it.
        drawn = streams.examples_drawn(ctx.state, steps, cfg.batch_size)
        style = None
        if cfg.style != "none":
            style = streams.domain_style(
                cfg, ctx.splits["style_references"], ctx.image_size
            )
        train_ds = streams.TrainingStreams(
            cfg, ctx.splits, ctx.image_size, skip=drawn
        ).stream("data", style=style)
        val_ds = streams.evaluation_stream(cfg, ctx.splits["val_data"], ctx.image_size)
        monitor = "val_mean_iou" if cfg.monitor == "auto" else cfg.monitor
        say(
            cfg.verbose,
            f"Training {cfg.model} ({num_classes} classes) on {cfg.data}: "
            f"{n_train} images, {steps} steps/epoch, {cfg.epochs} epochs "
            f"-> {ctx.run.path}",
        )
        final_state = fit(
            ctx,
            model,
            save_model=model,
            train_ds=train_ds,
            steps=steps,
            validation=validation(
                {"": val_ds}, eval_model=model, ignore_value=cfg.ignore_value
            ),
            monitor=monitor,
        )
    best = best_model(ctx.run, model)
    names = models.get_class_names(best)
    val_metrics = evaluate_model(
        best,
        val_ds,
        num_classes=num_classes,
        ignore_value=cfg.ignore_value,
        class_names=names,
    )
    result_metrics = {"val": val_metrics, **run_summary(ctx, final_state, monitor)}
    _write_report(ctx.run, cfg, best, val_ds, names, val_metrics)
    return finish(ctx.run, cfg, result_metrics)


def _model(ctx, num_classes, class_names, policy):
    """The new model, checked against the sizes, compiled (and restored)."""
    from klseg import models

    with ctx.strategy.scope():
        model = inputs.build_model(ctx.cfg, num_classes, class_names)
        if ctx.cfg.strategy != "default":
            # BatchNorm statistics of the global batch, as on one device.
            models.set_batch_norm(model, "synchronized")
        multiple = models.size_multiple(model)
        inputs.check_image_size(ctx.image_size, multiple)
        inputs.check_crop_size(ctx.cfg.crop_size, ctx.image_size, multiple)
        models.set_training_size(model, ctx.image_size)
        compile_model(ctx, model, policy, num_classes=num_classes)
    return model


def _write_report(run, cfg, model, val_ds, names, val_metrics):
    from klseg import models, report

    size = size_text(models.get_training_size(model))
    table = report.markdown_table(
        ["class", "IoU (%)"],
        [
            (n, "absent" if v is None else round(100 * v, 1))
            for n, v in val_metrics["per_class_iou"].items()
        ],
    )
    summary = (
        f"Validation data `{cfg.val_data}`: mean IoU "
        f"**{pct(val_metrics['mean_iou'])}**, pixel accuracy "
        f"{pct(val_metrics['pixel_accuracy'])} "
        f"({val_metrics['num_images']} images at {size}).\n\n{table}"
    )
    out = RunReport(run, cfg, names=names)
    out.add(("Result", summary))
    out.add_curves()
    out.add_overlays(
        model,
        first_batch(val_ds, 4),
        file="overlays.png",
        heading="Predictions on validation images",
    )
    out.add_confusion(
        val_metrics,
        name="val",
        heading="Confusion matrix on the validation images",
    )
    out.write(f"Training run {run.path.name}")
