"""``klseg finetune``: fine-tune a source model on a target domain with the KL term."""

import math
import time
from pathlib import Path

from klseg.files import yaml_text
from klseg.runs import classmaps, inputs, mean_teacher, runtime
from klseg.runs.checks import check_crop_fits
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
from klseg.runs.scoring import domain_metrics, first_batch, predict_classes

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
    if cfg.is_sweep:
        from klseg.runs.sweep import sweep

        return sweep(cfg, strategy, is_chief, callbacks)
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

    def job(run, checkpoint):
        return _finetune(
            cfg,
            strategy,
            run,
            checkpoint,
            callbacks,
            baseline,
            started,
            splits,
            image_size=image_size,
        )

    return in_run_folder(cfg, job, is_chief=is_chief)


def training_size(cfg, split):
    """``cfg.image_size``, else the source model's training size (recorded in
    the model, else in its run's config.yaml), else the size of the target
    training images (one for all)."""
    size = cfg.image_size
    if size is None:
        model = None if isinstance(cfg.source, (str, Path)) else cfg.source
        size = inputs.run_image_size(cfg.source, model)
    if size is None:
        size = inputs.data_image_size(split)
    if cfg.crop_size is not None:
        check_crop_fits(cfg.crop_size, size)
    return size


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


def _mix_unlabeled(stream, n_labeled, n_unlabeled, batch_size, seed, skip):
    """One stream of batches drawing images from both sets in proportion.

    Whether each example comes from the labelled or the unlabelled set is
    drawn from a seeded stream of its own, so a resumed run can count how
    many of the first ``skip`` examples each set gave and start both sets
    there: the batches that follow are those of the uninterrupted run.
    ``stream(key, skip)`` makes the stream of one set.
    """
    import numpy as np
    import tensorflow as tf

    total = n_labeled + n_unlabeled

    def choices():
        return tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.cast(r % total >= n_labeled, tf.int64)
        )

    from_unlabeled = 0
    if skip:
        from_unlabeled = int(
            choices().take(skip).reduce(np.int64(0), lambda count, c: count + c)
        )
    mixed = tf.data.Dataset.choose_from_datasets(
        [
            stream("data", skip - from_unlabeled).unbatch(),
            stream("unlabeled_data", from_unlabeled).unbatch(),
        ],
        choices().skip(skip),
    )
    return mixed.batch(batch_size, drop_remainder=True).prefetch(2)


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
    needed = ft.estimate_predictions_bytes(images, height, width, num_classes)
    needed += images * height * width * 3
    available = ft.available_memory_bytes()
    if available is None:
        return "live", "the available memory is not known"
    budget = available // 2
    size = f"{images} images x {height}x{width} x {num_classes} classes"
    if needed > budget:
        return "live", (
            f"storing them ({size}) needs {ft.format_bytes(needed)}, more than "
            f"half the available memory ({ft.format_bytes(budget)})"
        )
    reason = (
        f"{size} need {ft.format_bytes(needed)}, within half the available "
        f"memory ({ft.format_bytes(budget)})"
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


def _finetune(
    cfg, strategy, run, checkpoint, callbacks, baseline, started, splits, *, image_size
):
    import keras

    from klseg import data, losses, metrics, models
    from klseg import finetune as ft

    state = checkpoint[1] if checkpoint else None
    keras.utils.set_random_seed(cfg.seed)
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
    learning_rate = cfg.learning_rate or DEFAULT_LEARNING_RATE["finetune"]
    batch = cfg.batch_size
    changes = classmaps.changes_classes(cfg)
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        with strategy.scope():
            source = inputs.load_model(cfg.source)
            num_source_classes, multiple = inputs.model_info(source, cfg.source)
            inputs.check_image_size(image_size, multiple)
            inputs.check_crop_size(cfg.crop_size, image_size, multiple)
            names, class_map = classmaps.target_classes(
                cfg, splits, models.get_class_names(source)
            )
            num_classes = len(names)
            _check_classes(
                splits, cfg, num_classes, num_source_classes if changes else None
            )
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
                kl_weight=kl_weight,
                temperature=temperature,
                kl_inputs=kl_inputs,
                class_map=class_map,
                student_bn=cfg.student_bn,
                ignore_class=cfg.ignore_value,
            )
            optimizer = runtime.make_optimizer(learning_rate, policy)
            model.compile(
                optimizer=optimizer,
                loss=losses.SparseKLDivergence(ignore_class=cfg.ignore_value),
                metrics=[
                    metrics.MeanIoU(
                        num_classes,
                        ignore_class=cfg.ignore_value,
                        name="target_mean_iou",
                    ),
                ],
                jit_compile=runtime.jit_setting(cfg),
            )
            if checkpoint:
                from klseg.runs.checkpoint import restore_checkpoint

                restore_checkpoint(checkpoint[0], model, optimizer)
        predictions, why = resolve_source_predictions(
            cfg.source_predictions,
            _prediction_counts(cfg, splits, kl_inputs, kl_weight),
            image_size,
            num_source_classes,
            cfg.augment,
        )
        stored = predictions == "stored" and kl_weight > 0
        if kl_weight > 0:
            say(cfg.verbose, f"Source predictions: {predictions} ({why}).")

        def train_stream(split, seed, maps=None, skip=0):
            return data.make_dataset(
                split,
                batch_size=batch,
                image_size=image_size,
                crop_size=cfg.crop_size,
                augment=cfg.augment,
                shuffle=True,
                seed=seed,
                repeat=True,
                drop_remainder=True,
                ignore_value=cfg.ignore_value,
                extra_maps=maps,
                cache=inputs.cache_in_memory(split, image_size),
                skip=skip,
            )

        seed = cfg.seed
        n_labeled = inputs.num_images(splits["data"]) or batch
        n_total = n_labeled
        uses_target = kl_inputs in ("target", "both") and kl_weight > 0
        # With the consistency term the unlabelled images come in a stream of
        # their own (klseg.runs.mean_teacher), else they mix into the KL's batches.
        mixes = "unlabeled_data" in splits and uses_target and not consistency
        if mixes:
            n_total += inputs.num_images(splits["unlabeled_data"]) or batch
        elif consistency:
            n_unlabeled = inputs.num_images(splits["unlabeled_data"]) or batch
            n_total = max(n_labeled, n_unlabeled)
        steps = cfg.steps_per_epoch or max(1, math.ceil(n_total / batch))
        # A resumed run starts every stream where the checkpointed epoch left
        # it: the same batches, in the same order, with the same augmentation.
        drawn = examples_drawn(state, steps, batch)

        def maps_for(key):
            if not stored:
                return None
            return _stored_maps(source, splits[key], image_size, cfg.verbose)

        streams = {"data": seed, "unlabeled_data": seed + 1}

        def target_stream(key, skip):
            maps = maps_for(key) if uses_target else None
            return train_stream(splits[key], streams[key], maps, skip)

        # Unlabelled target images only feed the KL term on target images.
        if mixes:
            train_ds = _mix_unlabeled(
                target_stream, n_labeled, n_total - n_labeled, batch, seed, drawn
            )
        else:
            train_ds = target_stream("data", drawn)
        if consistency:
            unlabeled = train_stream(
                splits["unlabeled_data"], streams["unlabeled_data"], skip=drawn
            )
            train_ds = mean_teacher.with_unlabeled(train_ds, unlabeled)
        if kl_weight > 0 and kl_inputs in ("source", "both"):
            import tensorflow as tf

            source_ds = train_stream(
                splits["source_images"],
                seed + 2,
                maps_for("source_images"),
                skip=drawn,
            )
            train_ds = tf.data.Dataset.zip((train_ds, source_ds)).map(ft.pair_batches)

        def eval_stream(split):
            if split is None:
                return None
            return runtime.distribute_options(
                data.make_dataset(
                    split,
                    batch_size=batch,
                    image_size=image_size,
                    ignore_value=cfg.ignore_value,
                    cache=inputs.cache_in_memory(split, image_size),
                )
            )

        val_ds = eval_stream(splits["val_data"])
        source_val_ds = eval_stream(splits.get("source_val_data"))
        source_forward = None
        if class_map is not None:
            # Score in the target classes: source-domain masks mapped, the
            # source model's probabilities merged / dropped as the KL sees them.
            source_forward = classmaps.mapped_forward(source, class_map, num_classes)
            if source_val_ds is not None:
                import tensorflow as tf

                lut = tf.constant(
                    classmaps.label_lut(class_map, cfg.ignore_value), tf.int32
                )
                source_val_ds = source_val_ds.map(
                    lambda images, masks: (images, tf.gather(lut, masks))
                )
        domains = {"target": val_ds, "source": source_val_ds}
        if baseline is None:
            baseline = domain_metrics(
                source,
                domains,
                num_classes,
                cfg.ignore_value,
                names,
                forward=source_forward,
            )
        monitor = cfg.monitor
        if monitor == "auto":
            monitor = mean_teacher.EMA_MONITOR if consistency else "val_target_mean_iou"
        # With the consistency term model.keras holds the EMA teacher and
        # both models are validated.
        check, saved = mean_teacher.validation_of(
            model,
            domains,
            ignore_value=cfg.ignore_value,
            baseline=(baseline.get("source") or {}).get("mean_iou"),
        )
        say(
            cfg.verbose,
            f"Fine-tuning {cfg.source} on {cfg.data}: kl_weight={kl_weight:g}, "
            f"temperature={temperature:g}, kl_inputs={kl_inputs}, "
            f"{mean_teacher.describe(consistency)}{steps} steps/epoch, "
            f"{cfg.epochs} epochs -> {run.path}",
        )
        final_state = fit(
            run=run,
            checkpoint=checkpoint,
            model=model,
            save_model=saved,
            train_ds=runtime.distribute_options(train_ds),
            steps=steps,
            validation=check,
            cfg=cfg,
            monitor=monitor,
            callbacks=callbacks,
            learning_rate=learning_rate,
        )
    best = inputs.load_model(run.model) if run.model.exists() else saved
    after = domain_metrics(best, domains, num_classes, cfg.ignore_value, names)
    result_metrics = {
        **after,
        "source_model": baseline,
        "kl_weight": kl_weight,
        "temperature": temperature,
        "kl_inputs": kl_inputs,
        "saved_model": "ema_teacher" if consistency else "student",
        "class_map": classmaps.class_map_names(
            models.get_class_names(source), names, class_map
        ),
        "best_epoch": (final_state or {}).get("best_epoch"),
        "epochs": cfg.epochs,
        "monitor": monitor,
        "seconds": round(time.time() - started, 1),
    }
    if "source" in after and "source" in baseline:
        result_metrics["forgetting"] = (
            baseline["source"]["mean_iou"] - after["source"]["mean_iou"]
        )
    if consistency:
        result_metrics["consistency"] = consistency
        result_metrics["last_epoch"] = mean_teacher.last_epoch_scores(run.history)
    _write_report(run, cfg, best, domains, names, result_metrics)
    return finish(run, cfg, result_metrics)


def _write_report(run, cfg, model, domains, names, metrics):
    from klseg import report

    sections = []
    label = f"fine-tuned (kl_weight={metrics['kl_weight']:g})"
    if metrics.get("consistency"):
        label = f"EMA teacher (kl_weight={metrics['kl_weight']:g})"
    table = {
        "source model": {d: m["mean_iou"] for d, m in metrics["source_model"].items()},
        label: {
            d: metrics[d]["mean_iou"] for d in ("source", "target") if d in metrics
        },
    }
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
    sections.append(("Result", text))
    both = mean_teacher.report_section(metrics, pct)
    if both:
        sections.append(both)
    bars = report.plot_domain_miou(table, run.plots / "domains.png")
    sections.append(("Mean IoU before and after", bars))
    curves = curves_section(run)
    if curves:
        sections.append(curves)
    for domain, ds in domains.items():
        if ds is None:
            continue
        images, masks = first_batch(ds, 3)
        path = report.plot_overlays(
            images,
            predict_classes(model, images),
            run.plots / f"overlays_{domain}.png",
            masks=masks,
            class_names=names,
            ignore_value=cfg.ignore_value,
            title=f"{domain}-domain validation images",
        )
        sections.append((f"Predictions on {domain}-domain images", path))
    for domain in ("target", "source"):
        if domain in metrics:
            sections.append(
                report.confusion_section(
                    metrics[domain],
                    run.plots / f"confusion_{domain}.png",
                    heading=f"Confusion matrix on {domain}-domain images",
                )
            )
    sections.append(("Settings", "```yaml\n" + yaml_text(cfg.to_dict()) + "```"))
    report.write_report(
        run.report, title=f"Fine-tuning run {run.path.name}", sections=sections
    )
