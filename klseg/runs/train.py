"""``klseg train``: train a segmentation model from scratch into a run folder."""

import math
import time

from klseg.files import yaml_text
from klseg.runs import hub, inputs, runtime
from klseg.runs.callbacks import validation
from klseg.runs.checks import check_crop_fits, size_text
from klseg.runs.configs import DEFAULT_LEARNING_RATE
from klseg.runs.fit import (
    curves_section,
    examples_drawn,
    finish,
    fit,
    in_run_folder,
    say,
)
from klseg.runs.folder import check_inputs_not_outputs
from klseg.runs.results import pct
from klseg.runs.scoring import evaluate_model, first_batch, predict_classes

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
        {"data": cfg.data, "val_data": cfg.val_data, "class_map": cfg.class_map},
    )
    if hub.is_hub_spec(cfg.model):
        hub.check_spec(cfg.model)
        hub.import_keras_hub(cfg.model)
    # Every input is read and checked before the run folder is touched.
    train_split = inputs.load_split(cfg.data, cfg)
    val_split = inputs.load_split(cfg.val_data, cfg)
    num_classes, class_names = _resolve_classes(cfg, train_split)
    # Without --image-size, the training images' own size (one for all).
    image_size = cfg.image_size or inputs.data_image_size(train_split)
    if cfg.crop_size is not None:
        check_crop_fits(cfg.crop_size, image_size)
    inputs.check_labels(
        val_split,
        num_classes,
        "--val-data",
        f"The model has {num_classes} classes (from --data); remap the values "
        "with --class-map, or raise --num-classes.",
    )
    strategy, is_chief = runtime.make_strategy(cfg.strategy)

    def job(run, checkpoint):
        return _train(
            cfg,
            strategy,
            run,
            checkpoint,
            callbacks,
            started,
            (train_split, val_split, num_classes, class_names, image_size),
        )

    return in_run_folder(cfg, job, is_chief=is_chief)


def _model_kwargs(cfg, num_classes, class_names):
    kwargs = {"num_classes": num_classes, "input_shape": (None, None, 3)}
    if class_names:
        kwargs["class_names"] = list(class_names)
    if cfg.backbone:
        kwargs["backbone"] = cfg.backbone
    if cfg.model == "unet":
        if cfg.base_filters:
            kwargs["base_filters"] = cfg.base_filters
        if cfg.depth:
            kwargs["depth"] = cfg.depth
    return kwargs


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


def _train(cfg, strategy, run, checkpoint, callbacks, started, prepared):
    import keras

    from klseg import data, losses, metrics, models

    train_split, val_split, num_classes, class_names, image_size = prepared
    state = checkpoint[1] if checkpoint else None
    keras.utils.set_random_seed(cfg.seed)
    learning_rate = cfg.learning_rate or DEFAULT_LEARNING_RATE["train"]
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        with strategy.scope():
            if hub.is_hub_spec(cfg.model):
                model = hub.load_segmenter(
                    cfg.model, num_classes=num_classes, class_names=class_names
                )
            else:
                model = models.build(
                    cfg.model, **_model_kwargs(cfg, num_classes, class_names)
                )
            multiple = models.size_multiple(model)
            inputs.check_image_size(image_size, multiple)
            inputs.check_crop_size(cfg.crop_size, image_size, multiple)
            models.set_training_size(model, image_size)
            optimizer = runtime.make_optimizer(learning_rate, policy)
            model.compile(
                optimizer=optimizer,
                loss=losses.SparseKLDivergence(ignore_class=cfg.ignore_value),
                metrics=[
                    metrics.MeanIoU(num_classes, ignore_class=cfg.ignore_value),
                    metrics.PixelAccuracy(ignore_class=cfg.ignore_value),
                ],
                jit_compile=runtime.jit_setting(cfg),
            )
            if checkpoint:
                from klseg.runs.checkpoint import restore_checkpoint

                restore_checkpoint(checkpoint[0], model, optimizer)
        n_train = inputs.num_images(train_split) or cfg.batch_size
        steps = cfg.steps_per_epoch or max(1, math.ceil(n_train / cfg.batch_size))
        train_ds = data.make_dataset(
            train_split,
            batch_size=cfg.batch_size,
            image_size=image_size,
            crop_size=cfg.crop_size,
            augment=cfg.augment,
            shuffle=True,
            seed=cfg.seed,
            repeat=True,
            drop_remainder=True,
            ignore_value=cfg.ignore_value,
            cache=inputs.cache_in_memory(train_split, image_size),
            # A resumed run continues the stream where its checkpoint left it.
            skip=examples_drawn(state, steps, cfg.batch_size),
        )
        val_ds = data.make_dataset(
            val_split,
            batch_size=cfg.batch_size,
            image_size=image_size,
            ignore_value=cfg.ignore_value,
            cache=inputs.cache_in_memory(val_split, image_size),
        )
        train_ds = runtime.distribute_options(train_ds)
        val_ds = runtime.distribute_options(val_ds)
        monitor = "val_mean_iou" if cfg.monitor == "auto" else cfg.monitor
        say(
            cfg.verbose,
            f"Training {cfg.model} ({num_classes} classes) on {cfg.data}: "
            f"{n_train} images, {steps} steps/epoch, {cfg.epochs} epochs "
            f"-> {run.path}",
        )
        final_state = fit(
            run=run,
            checkpoint=checkpoint,
            model=model,
            save_model=model,
            train_ds=train_ds,
            steps=steps,
            validation=validation(
                {"": val_ds}, eval_model=model, ignore_value=cfg.ignore_value
            ),
            cfg=cfg,
            monitor=monitor,
            callbacks=callbacks,
            learning_rate=learning_rate,
        )
    best = inputs.load_model(run.model) if run.model.exists() else model
    names = models.get_class_names(best)
    val_metrics = evaluate_model(
        best,
        val_ds,
        num_classes=num_classes,
        ignore_value=cfg.ignore_value,
        class_names=names,
    )
    result_metrics = {
        "val": val_metrics,
        "best_epoch": (final_state or {}).get("best_epoch"),
        "epochs": cfg.epochs,
        "monitor": monitor,
        "seconds": round(time.time() - started, 1),
    }
    _write_report(run, cfg, best, val_ds, names, val_metrics)
    return finish(run, cfg, result_metrics)


def _write_report(run, cfg, model, val_ds, names, val_metrics):
    from klseg import models, report

    size = size_text(models.get_training_size(model))

    sections = []
    curves = curves_section(run)
    if curves:
        sections.append(curves)
    images, masks = first_batch(val_ds, 4)
    preds = predict_classes(model, images)
    overlays = report.plot_overlays(
        images,
        preds,
        run.plots / "overlays.png",
        masks=masks,
        class_names=names,
        ignore_value=cfg.ignore_value,
    )
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
    sections.insert(0, ("Result", summary))
    sections.append(("Predictions on validation images", overlays))
    sections.append(
        report.confusion_section(
            val_metrics,
            run.plots / "confusion_val.png",
            heading="Confusion matrix on the validation images",
        )
    )
    sections.append(("Settings", "```yaml\n" + yaml_text(cfg.to_dict()) + "```"))
    report.write_report(
        run.report, title=f"Training run {run.path.name}", sections=sections
    )
