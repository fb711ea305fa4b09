"""``klseg finetune``: fine-tune a source model on a target domain with the KL term."""

import dataclasses
import time

from klseg.runs import classmaps, inputs, mean_teacher, runtime, streams
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
from klseg.runs.scoring import domain_metrics, first_batch
from klseg.runs.sweep import sweep

__all__ = ["finetune", "finetune_one", "input_paths"]


def finetune(cfg, *, callbacks=None):
    """Fine-tune a source model on a target domain with the KL term.

    One KL weight writes one run folder. Several weights (``kl_weight=(0,
    0.1, 0.3, 1)``) write ``OUTPUT/kl_W/`` per weight, ``OUTPUT/tradeoff.png``
    (source vs target mIoU), ``OUTPUT/metrics.json`` and
    ``OUTPUT/report.md``; with ``resume`` the finished weights are kept and
    the interrupted one continues.

    Args:
        cfg: a :class:`klseg.runs.FinetuneConfig`.
        callbacks: extra Keras callbacks (each run).

    Returns:
        A :class:`klseg.runs.RunResult`, or a :class:`klseg.runs.SweepResult`
        for several weights.

    Raises:
        klseg.errors.ModelError: the source model is missing, not a klseg
            segmentation model, or predicts fewer classes than the masks
            hold.
        klseg.errors.DataError, klseg.errors.RunError,
        klseg.errors.TrainingDiverged: as for :func:`klseg.runs.train`.
    """
    strategy, is_chief = runtime.make_strategy(cfg.strategy)
    say(cfg.verbose, cfg.recipe_note())
    if cfg.is_sweep:
        return sweep(
            cfg,
            strategy,
            is_chief,
            callbacks,
            run_one=finetune_one,
            input_paths=input_paths,
        )
    return finetune_one(cfg, strategy, is_chief, callbacks)


def input_paths(cfg):
    """``{option: path}`` of everything a fine-tuning run reads."""
    return {
        "source": cfg.source,
        "data": cfg.data,
        "val_data": cfg.val_data,
        "unlabeled_data": cfg.unlabeled_data,
        "source_val_data": cfg.source_val_data,
        "source_images": cfg.source_images,
        "class_map": cfg.class_map,
        "source_class_map": cfg.source_class_map,
    }


def finetune_one(cfg, strategy, is_chief, callbacks, baseline=None):
    """One fine-tuning run (one KL weight) into ``cfg.output``."""
    started = time.time()
    check_inputs_not_outputs({"output": cfg.output}, input_paths(cfg))
    if isinstance(cfg.source, str) or hasattr(cfg.source, "__fspath__"):
        inputs.check_model_file(cfg.source)
    # Every data set is read and checked before the run folder is touched.
    splits = _load_inputs(cfg)
    image_size = training_size(cfg, splits["data"])

    return run_in_folder(
        cfg,
        lambda ctx: _finetune(ctx, baseline),
        job="finetune",
        strategy=strategy,
        is_chief=is_chief,
        callbacks=callbacks,
        started=started,
        splits=splits,
        image_size=image_size,
    )


def training_size(cfg, split):
    """``cfg.image_size``, else the source model's training size (recorded in
    the model, else in its run's config.yaml), else the size of the target
    training images (one for all)."""
    return inputs.default_image_size(cfg, split, cfg.source)


def _load_inputs(cfg):
    splits = {
        "data": inputs.load_split(cfg.data, cfg),
        "val_data": inputs.load_split(cfg.val_data, cfg),
    }
    if cfg.unlabeled_data:
        splits["unlabeled_data"] = inputs.load_split(
            cfg.unlabeled_data, cfg, require_masks=False
        )
    if cfg.source_val_data:
        # With a class change the source-domain masks hold the source
        # model's classes; class_map (mask values) describes the target data.
        splits["source_val_data"] = inputs.load_split(
            cfg.source_val_data, cfg, remap=not classmaps.changes_classes(cfg)
        )
    if cfg.source_images:
        splits["source_images"] = inputs.load_split(
            cfg.source_images, cfg, require_masks=False
        )
    return splits


def _check_classes(splits, cfg, num_classes, num_source_classes=None):
    """Masks of every labelled split hold only the classes the model has."""
    for key in ("data", "val_data", "source_val_data"):
        split = splits.get(key)
        option = "--" + key.replace("_", "-")
        if key == "source_val_data" and num_source_classes is not None:
            inputs.check_labels(
                split,
                num_source_classes,
                option,
                f"The source model {cfg.source} predicts {num_source_classes} "
                "classes (source-domain masks are read in the source model's "
                "classes when the classes change).",
            )
            continue
        inputs.check_labels(
            split,
            num_classes,
            option,
            f"The source model {cfg.source} predicts {num_classes} classes: "
            "map the mask values with --class-map, or fine-tune a source model "
            "trained with these classes.",
        )


def _resolve_kl_inputs(cfg):
    if cfg.kl_inputs != "auto":
        return cfg.kl_inputs
    return "source" if cfg.source_images else "target"


def _prediction_counts(cfg, splits, kl_inputs, kl_weight):
    """``{option: images}`` of the sets the KL term needs predictions for."""
    if kl_weight <= 0:
        return {}
    keys = []
    if kl_inputs in ("target", "both"):
        # With the consistency term, unlabelled images are not the KL's.
        keys += ["data"] if mean_teacher.settings(cfg) else ["data", "unlabeled_data"]
    if kl_inputs in ("source", "both"):
        keys.append("source_images")
    return {key: inputs.num_images(splits[key]) for key in keys if key in splits}


def resolve_source_predictions(mode, counts, image_size, num_classes, augment):
    """``("live" | "stored", reason)`` for ``--source-predictions``.

    ``counts`` is ``{option: number of images or None}`` of the sets whose
    source predictions the KL term needs. ``"auto"`` stores them when every
    count is known and the float16 predictions plus the uint8 images they
    are computed from fit in half the memory available now (the budget
    :func:`klseg.finetune.store_source_predictions` checks); otherwise the
    source model runs live. Every augmentation a run takes can be followed
    by stored maps: its geometric transforms and crops move them with the
    images (colour transforms leave them as the predictions of the
    un-augmented colours).
    """
    from klseg import finetune as ft
    from klseg.data.resize import size_pair

    if mode != "auto":
        return mode, f"--source-predictions {mode}"
    if not counts:
        return "live", "the KL term is off"
    unknown = [name for name, n in counts.items() if n is None]
    if unknown:
        return "live", (
            f"the number of images of --{unknown[0].replace('_', '-')} is not "
            "known before reading it (a streamed split)"
        )
    height, width = size_pair(image_size)
    images = sum(counts.values())
    predictions = ft.estimate_predictions_bytes(images, height, width, num_classes)
    pixels = images * height * width * 3
    needed = predictions + pixels
    available = ft.available_memory_bytes()
    if available is None:
        return "live", "the available memory is not known"
    budget = available // 2
    size = f"{images} images x {height}x{width} x {num_classes} classes"
    if needed > budget:
        return "live", (
            f"storing them ({size}: {ft.format_bytes(predictions)} of float16 "
            f"predictions and {ft.format_bytes(pixels)} of images) needs "
            f"{ft.format_bytes(needed)}, more than half the available memory "
            f"({ft.format_bytes(budget)})"
        )
    reason = (
        f"{size}: {ft.format_bytes(predictions)} of float16 predictions and "
        f"{ft.format_bytes(pixels)} of images, {ft.format_bytes(needed)} in all, "
        f"within half the available memory ({ft.format_bytes(budget)})"
    )
    if augment != "none":
        reason += f"; the {augment} augmentation moves them with the images"
    return "stored", reason


def _stored_maps(source, split, image_size, verbose):
    from klseg import data
    from klseg import finetune as ft

    images, _ = data.load_arrays(split, image_size)
    return {
        "source_probs": ft.store_source_predictions(source, images, verbose=verbose)
    }


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The KL and consistency settings of a run, defaults resolved."""

    kl_inputs: str
    kl_weight: float
    temperature: float
    consistency: dict | None

    @property
    def kl_on_target(self):
        return self.kl_inputs in ("target", "both") and self.kl_weight > 0

    @property
    def kl_on_source(self):
        return self.kl_inputs in ("source", "both") and self.kl_weight > 0


@dataclasses.dataclass(frozen=True)
class _Models:
    """The models of a fine-tuning run."""

    source: object
    model: object  # the training wrapper around the student
    names: list  # the target classes
    class_map: object  # source class -> target class, or None
    num_source_classes: int

    @property
    def num_classes(self):
        return len(self.names)


def _finetune(ctx, baseline):
    """Settings, models, streams, baseline, fit, scores, report."""
    import keras

    cfg = ctx.cfg
    keras.utils.set_random_seed(cfg.seed)
    plan = _settings(cfg)
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        nets = _models(ctx, plan, policy)
        stored = _source_predictions(ctx, plan, nets)
        train_ds, steps = _training_stream(ctx, plan, nets.source, stored)
        domains, source_forward = _evaluation_streams(ctx, nets)
        if baseline is None:
            baseline = domain_metrics(
                nets.source,
                domains,
                nets.num_classes,
                cfg.ignore_value,
                nets.names,
                forward=source_forward,
            )
        monitor = _monitor(cfg, plan)
        # With the consistency term model.keras holds the EMA teacher and
        # both models are validated.
        check, saved = mean_teacher.validation_of(
            nets.model,
            domains,
            ignore_value=cfg.ignore_value,
            baseline=(baseline.get("source") or {}).get("mean_iou"),
        )
        say(
            cfg.verbose,
            f"Fine-tuning {cfg.source} on {cfg.data}: kl_weight={plan.kl_weight:g}, "
            f"temperature={plan.temperature:g}, kl_inputs={plan.kl_inputs}, "
            f"{mean_teacher.describe(plan.consistency)}{steps} steps/epoch, "
            f"{cfg.epochs} epochs -> {ctx.run.path}",
        )
        final_state = fit(
            ctx,
            nets.model,
            save_model=saved,
            train_ds=train_ds,
            steps=steps,
            validation=check,
            monitor=monitor,
        )
    best = best_model(ctx.run, saved)
    after = domain_metrics(
        best, domains, nets.num_classes, cfg.ignore_value, nets.names
    )
    result_metrics = _result_metrics(
        ctx,
        plan,
        nets,
        {**after, "source_model": baseline},
        run_summary(ctx, final_state, monitor),
    )
    say(cfg.verbose, mean_teacher.student_note(result_metrics.get("last_epoch")))
    _write_report(ctx, best, domains, nets.names, result_metrics)
    return finish(ctx.run, cfg, result_metrics)


def _monitor(cfg, plan):
    """``cfg.monitor``; "auto" picks the target-domain mIoU of the saved model."""
    if cfg.monitor != "auto":
        return cfg.monitor
    return mean_teacher.EMA_MONITOR if plan.consistency else "val_target_mean_iou"


def _settings(cfg):
    """The run's :class:`_Settings`; says what the unlabelled images feed."""
    from klseg import finetune as ft

    kl_inputs = _resolve_kl_inputs(cfg)
    kl_weight = cfg.kl_weight[0] if cfg.kl_weight else ft.DEFAULT_KL_WEIGHT
    consistency = mean_teacher.settings(cfg)
    if consistency:
        say(cfg.verbose, mean_teacher.kl_note(cfg, kl_inputs, kl_weight))
    elif cfg.unlabeled_data and (kl_inputs == "source" or kl_weight == 0):
        say(
            cfg.verbose,
            f"Note: unlabeled_data ({cfg.unlabeled_data}) is not used: unlabelled "
            "target images only feed the KL term on target images "
            f"(kl_inputs='target' or 'both'; here kl_inputs={kl_inputs!r}, "
            f"kl_weight={kl_weight:g}).",
        )
    temperature = cfg.temperature or ft.DEFAULT_TEMPERATURE
    return _Settings(kl_inputs, kl_weight, temperature, consistency)


def _models(ctx, plan, policy):
    """The source model (checked against the sizes and the data), the
    student cloned from it for the target classes, and the training wrapper
    around both, compiled (and restored)."""
    from klseg import finetune as ft
    from klseg import models

    cfg, splits, image_size = ctx.cfg, ctx.splits, ctx.image_size
    changes = classmaps.changes_classes(cfg)
    with ctx.strategy.scope():
        source = inputs.load_model(cfg.source)
        num_source_classes, multiple = inputs.model_info(source, cfg.source)
        inputs.check_image_size(image_size, multiple)
        inputs.check_crop_size(cfg.crop_size, image_size, multiple)
        names, class_map = classmaps.target_classes(
            cfg, splits, models.get_class_names(source)
        )
        _check_classes(splits, cfg, len(names), num_source_classes if changes else None)
        student = ft.clone_student(
            source,
            class_names=names if class_map is not None else None,
            name=source.name,
            dtype_policy=policy,
        )
        models.set_training_size(student, image_size)
        model = mean_teacher.make_model(
            cfg,
            student,
            source,
            kl_weight=plan.kl_weight,
            temperature=plan.temperature,
            kl_inputs=plan.kl_inputs,
            class_map=class_map,
            student_bn=cfg.student_bn,
            ignore_class=cfg.ignore_value,
        )
        compile_model(
            ctx, model, policy, num_classes=len(names), scores=("target_mean_iou",)
        )
    return _Models(source, model, names, class_map, num_source_classes)


def _source_predictions(ctx, plan, nets):
    """Whether the KL term reads stored source predictions (the run says
    which, and why)."""
    cfg = ctx.cfg
    predictions, why = resolve_source_predictions(
        cfg.source_predictions,
        _prediction_counts(cfg, ctx.splits, plan.kl_inputs, plan.kl_weight),
        ctx.image_size,
        nets.num_source_classes,
        cfg.augment,
    )
    if plan.kl_weight > 0:
        say(cfg.verbose, f"Source predictions: {predictions} ({why}).")
    return predictions == "stored" and plan.kl_weight > 0


def _training_stream(ctx, plan, source, stored):
    """``(stream, steps per epoch)``: labelled target batches; unlabelled
    target images mixed in for the KL term or, with the consistency term,
    beside them; source-domain batches paired for the KL term on them."""
    cfg, splits = ctx.cfg, ctx.splits
    # With the consistency term the unlabelled images come in a stream of
    # their own (klseg.runs.mean_teacher), else they mix into the KL's batches.
    mixes = "unlabeled_data" in splits and plan.kl_on_target and not plan.consistency
    unlabeled = "mixed" if mixes else "paired" if plan.consistency else None
    steps = streams.steps_per_epoch(
        cfg, streams.images_per_epoch(splits, cfg.batch_size, unlabeled=unlabeled)
    )
    # A resumed run starts every stream where the checkpointed epoch left
    # it: the same batches, in the same order, with the same augmentation.
    drawn = streams.examples_drawn(ctx.state, steps, cfg.batch_size)
    made = streams.TrainingStreams(cfg, splits, ctx.image_size, skip=drawn)

    def maps(key):
        if not stored:
            return None
        return _stored_maps(source, splits[key], ctx.image_size, cfg.verbose)

    # Unlabelled target images only feed the KL term on target images.
    target_maps = maps if plan.kl_on_target else None
    if mixes:
        train_ds = made.mixed(target_maps)
    else:
        train_ds = made.stream("data", target_maps("data") if target_maps else None)
    if plan.consistency:
        train_ds = mean_teacher.with_unlabeled(train_ds, made.stream("unlabeled_data"))
    if plan.kl_on_source:
        source_ds = made.stream("source_images", maps("source_images"))
        train_ds = streams.with_source_images(train_ds, source_ds)
    return train_ds, steps


def _evaluation_streams(ctx, nets):
    """``({"target": stream, "source": stream or None}, forward)``: with a
    class change, source-domain masks and the source model's predictions
    (``forward``, else None) are scored in the target classes, merged or
    dropped as the KL term sees them."""
    cfg, splits, size = ctx.cfg, ctx.splits, ctx.image_size
    val_ds = streams.evaluation_stream(cfg, splits["val_data"], size)
    source_val_ds = streams.evaluation_stream(cfg, splits.get("source_val_data"), size)
    source_forward = None
    if nets.class_map is not None:
        source_forward = classmaps.mapped_forward(
            nets.source, nets.class_map, nets.num_classes
        )
        if source_val_ds is not None:
            source_val_ds = classmaps.map_masks(
                source_val_ds, nets.class_map, cfg.ignore_value
            )
    return {"target": val_ds, "source": source_val_ds}, source_forward


def _result_metrics(ctx, plan, nets, scores, summary):
    """``metrics.json``: the scores after and before (``source_model``), the
    settings, the run's summary, the forgetting, the consistency."""
    from klseg import models

    result = {
        **scores,
        "kl_weight": plan.kl_weight,
        "temperature": plan.temperature,
        "kl_inputs": plan.kl_inputs,
        "saved_model": "ema_teacher" if plan.consistency else "student",
        "class_map": classmaps.class_map_names(
            models.get_class_names(nets.source), nets.names, nets.class_map
        ),
        **summary,
    }
    baseline = scores["source_model"]
    if "source" in scores and "source" in baseline:
        result["forgetting"] = (
            baseline["source"]["mean_iou"] - scores["source"]["mean_iou"]
        )
    if plan.consistency:
        result["consistency"] = plan.consistency
        result["last_epoch"] = mean_teacher.last_epoch_scores(ctx.run.history)
    return result


def _write_report(ctx, model, domains, names, metrics):
    from klseg import report

    run = ctx.run
    table = _miou_table(metrics)
    out = RunReport(run, ctx.cfg, names=names)
    out.add(("Result", _result_text(table, metrics)))
    out.add(mean_teacher.report_section(metrics, pct))
    bars = report.plot_domain_miou(table, run.plots / "domains.png")
    out.add(("Mean IoU before and after", bars))
    out.add_curves()
    for domain, ds in domains.items():
        if ds is not None:
            out.add_overlays(
                model,
                first_batch(ds, 3),
                file=f"overlays_{domain}.png",
                heading=f"Predictions on {domain}-domain images",
                title=f"{domain}-domain validation images",
            )
    for domain in ("target", "source"):
        if domain in metrics:
            out.add_confusion(
                metrics[domain],
                name=domain,
                heading=f"Confusion matrix on {domain}-domain images",
            )
    out.write(f"Fine-tuning run {run.path.name}")


def _miou_table(metrics):
    """``{model: {domain: mIoU}}`` of the source model and the saved one."""
    label = f"fine-tuned (kl_weight={metrics['kl_weight']:g})"
    if metrics.get("consistency"):
        label = f"EMA teacher (kl_weight={metrics['kl_weight']:g})"
    return {
        "source model": {d: m["mean_iou"] for d, m in metrics["source_model"].items()},
        label: {
            d: metrics[d]["mean_iou"] for d in ("source", "target") if d in metrics
        },
    }


def _result_text(table, metrics):
    from klseg import report

    rows = [
        (name, pct(row.get("source")), pct(row.get("target")))
        for name, row in table.items()
    ]
    text = report.markdown_table(["model", "source mIoU", "target mIoU"], rows)
    if "forgetting" in metrics:
        text += (
            f"\n\nForgetting (source mIoU lost): "
            f"{100 * metrics['forgetting']:.1f} points."
        )
    return text
