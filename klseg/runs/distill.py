"""``klseg distill``: train a smaller student from a teacher's predictions."""

import contextlib
import json
import math
import statistics
import time
import zipfile
from pathlib import Path

from klseg import errors
from klseg.files import yaml_text
from klseg.runs import hub, inputs, runtime
from klseg.runs.callbacks import validation
from klseg.runs.checks import check_crop_fits, fail, size_text
from klseg.runs.configs import DEFAULT_LEARNING_RATE
from klseg.runs.finetune import _mix_unlabeled
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
from klseg.runs.train import _model_kwargs

__all__ = ["distill", "images_per_second"]


def distill(cfg, *, callbacks=None):
    """Train a student model on labels and on a frozen teacher's predictions.

    The student (``cfg.model``, usually much smaller than the teacher) is
    built from scratch for the teacher's classes and trained with
    :class:`klseg.distill.DistillationModel`: the task loss on the labelled
    pixels of ``cfg.data`` plus ``kl_weight`` times the KL term between the
    teacher's and the student's predictions on every training image,
    labelled (``cfg.data``) or not (``cfg.unlabeled_data``). ``model.keras``
    is the student of the best validated epoch; ``metrics.json`` and
    ``report.md`` put the teacher and the student side by side (mean IoU,
    pixel accuracy, parameters, inference images per second).

    Args:
        cfg: a :class:`klseg.runs.DistillConfig`.
        callbacks: extra Keras callbacks, run after klseg's own.

    Returns:
        A :class:`klseg.runs.RunResult`.

    Raises:
        klseg.errors.ModelError: the teacher is missing, not a segmentation
            model, or outputs probabilities.
        klseg.errors.InvalidArgumentError: ``num_classes`` differs from the
            teacher's, or an image size the models cannot take.
        klseg.errors.DataError, klseg.errors.RunError,
        klseg.errors.TrainingDiverged: as for :func:`klseg.runs.train`.
    """
    started = time.time()
    check_inputs_not_outputs(
        {"output": cfg.output},
        {
            "teacher": None if _is_hub(cfg.teacher) else cfg.teacher,
            "data": cfg.data,
            "unlabeled_data": cfg.unlabeled_data,
            "val_data": cfg.val_data,
            "class_map": cfg.class_map,
        },
    )
    if isinstance(cfg.teacher, (str, Path)):
        # A missing file or preset folder fails here, before any work.
        inputs.check_model_file(cfg.teacher)
        if not _is_hub(cfg.teacher):
            _check_num_classes(cfg, _archive_num_classes(cfg.teacher))
    # Every data set is read and checked before the run folder is touched.
    splits = {
        "data": inputs.load_split(cfg.data, cfg),
        "val_data": inputs.load_split(cfg.val_data, cfg),
    }
    if cfg.unlabeled_data:
        splits["unlabeled_data"] = inputs.load_split(
            cfg.unlabeled_data, cfg, require_masks=False
        )
    image_size = _training_size(cfg, splits["data"])
    strategy, is_chief = runtime.make_strategy(cfg.strategy)

    def job(run, checkpoint):
        return _distill(
            cfg, strategy, run, checkpoint, callbacks, started, splits, image_size
        )

    return in_run_folder(cfg, job, is_chief=is_chief)


def _is_hub(value):
    return hub.is_hub_spec(value)


def _archive_num_classes(path):
    """The class count of a ``.keras`` file's ``ClassLogits`` head, read from
    the archive's ``config.json`` without Keras; None where not found."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "ClassLogits":
                config = node.get("config") or {}
                names = config.get("class_names")
                found.append(config.get("num_classes") or (names and len(names)))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    with contextlib.suppress(Exception):
        with zipfile.ZipFile(path) as archive:
            walk(json.loads(archive.read("config.json")))
    counts = [c for c in found if isinstance(c, int) and c > 0]
    return counts[-1] if counts else None


def _check_num_classes(cfg, teacher_classes):
    if teacher_classes is None or cfg.num_classes in (None, teacher_classes):
        return
    fail(
        f"num_classes must equal the teacher's number of classes: the teacher "
        f"{cfg.teacher} predicts {teacher_classes} classes, and the student "
        "learns the teacher's classes. Drop --num-classes or give "
        f"{teacher_classes}. Received: num_classes={cfg.num_classes}"
    )


def _training_size(cfg, split):
    """``cfg.image_size``, else the teacher's training size, else the size of
    the training images (one for all)."""
    size = cfg.image_size
    if size is None and not _is_hub(cfg.teacher):
        model = None if isinstance(cfg.teacher, (str, Path)) else cfg.teacher
        size = inputs.run_image_size(cfg.teacher, model)
    if size is None:
        size = inputs.data_image_size(split)
    if cfg.crop_size is not None:
        check_crop_fits(cfg.crop_size, size)
    return size


def _class_names(model, count):
    from klseg import models

    with contextlib.suppress(errors.KlsegError):
        return models.get_class_names(model)
    return [f"class_{i}" for i in range(count)]


def _build_student(cfg, num_classes, names):
    from klseg import models

    if _is_hub(cfg.model):
        return hub.load_segmenter(cfg.model, num_classes=num_classes, class_names=names)
    return models.build(cfg.model, **_model_kwargs(cfg, num_classes, names))


def images_per_second(model, images, *, batch_size=8, repeats=3):
    """Inference throughput of ``model`` on ``images`` (a numpy array).

    One pass over the images warms up (traces) the forward function; then
    the median of ``repeats`` timed passes gives images per second on this
    machine.
    """
    import numpy as np

    from klseg.runs.scoring import inference_function

    forward = inference_function(model)

    def one_pass():
        for start in range(0, len(images), batch_size):
            np.asarray(forward(images[start : start + batch_size]))

    one_pass()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - begin)
    return len(images) / max(statistics.median(times), 1e-9)


def _summary(scores, model, speed):
    return {
        "mean_iou": scores["mean_iou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "parameters": int(model.count_params()),
        "images_per_second": round(speed, 2),
    }


def _distill(cfg, strategy, run, checkpoint, callbacks, started, splits, image_size):
    import keras

    from klseg import data, losses, metrics, models
    from klseg.distill import DistillationModel

    state = checkpoint[1] if checkpoint else None
    keras.utils.set_random_seed(cfg.seed)
    learning_rate = cfg.learning_rate or DEFAULT_LEARNING_RATE["train"]
    temperature = cfg.resolved_temperature
    batch = cfg.batch_size
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        with strategy.scope():
            teacher = inputs.load_model(cfg.teacher)
            num_classes, multiple = inputs.model_info(teacher, cfg.teacher)
            _check_num_classes(cfg, num_classes)
            names = _class_names(teacher, num_classes)
            for key in ("data", "val_data"):
                inputs.check_labels(
                    splits[key],
                    num_classes,
                    "--" + key.replace("_", "-"),
                    f"The teacher {cfg.teacher} predicts {num_classes} classes: "
                    "map the mask values with --class-map.",
                )
            student = _build_student(cfg, num_classes, names)
            with contextlib.suppress(errors.KlsegError):
                multiple = math.lcm(multiple, models.size_multiple(student))
            inputs.check_image_size(image_size, multiple)
            inputs.check_crop_size(cfg.crop_size, image_size, multiple)
            with contextlib.suppress(errors.KlsegError):
                models.set_training_size(student, image_size)
            model = DistillationModel(
                student,
                teacher,
                kl_weight=cfg.kl_weight,
                temperature=temperature,
                kl_type=cfg.kl_type,
                # Several replicas train as one device would.
                student_bn="trainable" if cfg.strategy == "default" else "synchronized",
                ignore_class=cfg.ignore_value,
            )
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

        def train_stream(key, skip):
            split = splits[key]
            return data.make_dataset(
                split,
                batch_size=batch,
                image_size=image_size,
                crop_size=cfg.crop_size,
                augment=cfg.augment,
                shuffle=True,
                seed=cfg.seed + (1 if key == "unlabeled_data" else 0),
                repeat=True,
                drop_remainder=True,
                ignore_value=cfg.ignore_value,
                cache=inputs.cache_in_memory(split, image_size),
                skip=skip,
            )

        n_labeled = inputs.num_images(splits["data"]) or batch
        n_total = n_labeled
        # Unlabelled images feed the KL term only.
        mixes = "unlabeled_data" in splits and cfg.kl_weight > 0
        if "unlabeled_data" in splits and not mixes:
            say(
                cfg.verbose,
                f"Note: unlabeled_data ({cfg.unlabeled_data}) is not used: "
                "unlabelled images only feed the KL term, and kl_weight=0.",
            )
        if mixes:
            n_total += inputs.num_images(splits["unlabeled_data"]) or batch
        steps = cfg.steps_per_epoch or max(1, math.ceil(n_total / batch))
        # A resumed run starts every stream where the checkpointed epoch left
        # it: the same batches, in the same order, with the same augmentation.
        drawn = examples_drawn(state, steps, batch)
        if mixes:
            train_ds = _mix_unlabeled(
                train_stream, n_labeled, n_total - n_labeled, batch, cfg.seed, drawn
            )
        else:
            train_ds = train_stream("data", drawn)
        val_ds = runtime.distribute_options(
            data.make_dataset(
                splits["val_data"],
                batch_size=batch,
                image_size=image_size,
                ignore_value=cfg.ignore_value,
                cache=inputs.cache_in_memory(splits["val_data"], image_size),
            )
        )
        monitor = "val_mean_iou" if cfg.monitor == "auto" else cfg.monitor
        say(
            cfg.verbose,
            f"Distilling {cfg.teacher} ({teacher.count_params():,} parameters) "
            f"into {cfg.model} ({student.count_params():,} parameters) on "
            f"{cfg.data}: kl_type={cfg.kl_type}, kl_weight={cfg.kl_weight:g}, "
            f"temperature={temperature:g}, {steps} steps/epoch, {cfg.epochs} "
            f"epochs -> {run.path}",
        )
        final_state = fit(
            run=run,
            checkpoint=checkpoint,
            model=model,
            save_model=student,
            train_ds=runtime.distribute_options(train_ds),
            steps=steps,
            validation=validation(
                {"": val_ds}, eval_model=student, ignore_value=cfg.ignore_value
            ),
            cfg=cfg,
            monitor=monitor,
            callbacks=callbacks,
            learning_rate=learning_rate,
        )
    best = inputs.load_model(run.model) if run.model.exists() else student
    scores = {
        role: domain_metrics(
            net, {"val": val_ds}, num_classes, cfg.ignore_value, names
        )["val"]
        for role, net in (("teacher", teacher), ("student", best))
    }
    # Throughput on (up to 64) validation images at the training size.
    val_images, _ = first_batch(val_ds, 64)
    speed = {
        role: images_per_second(net, val_images, batch_size=batch)
        for role, net in (("teacher", teacher), ("student", best))
    }
    result_metrics = {
        "teacher": _summary(scores["teacher"], teacher, speed["teacher"]),
        "student": _summary(scores["student"], best, speed["student"]),
        "val": scores["student"],
        "kl_weight": cfg.kl_weight,
        "temperature": temperature,
        "kl_type": cfg.kl_type,
        "image_size": list(image_size) if isinstance(image_size, tuple) else image_size,
        "best_epoch": (final_state or {}).get("best_epoch"),
        "epochs": cfg.epochs,
        "monitor": monitor,
        "seconds": round(time.time() - started, 1),
    }
    _write_report(run, cfg, (teacher, best), val_ds, names, result_metrics, scores)
    return finish(run, cfg, result_metrics)


def _write_report(run, cfg, nets, val_ds, names, metrics, scores):
    from klseg import report

    teacher, student = nets
    rows = [
        (
            f"{role} ({what})",
            pct(metrics[role]["mean_iou"]),
            pct(metrics[role]["pixel_accuracy"]),
            f"{metrics[role]['parameters']:,}",
            f"{metrics[role]['images_per_second']:.1f}",
        )
        for role, what in (("teacher", cfg.teacher), ("student", cfg.model))
    ]
    ratio = metrics["student"]["parameters"] / max(metrics["teacher"]["parameters"], 1)
    text = report.markdown_table(
        ["model", "mIoU", "pixel accuracy", "parameters", "images/s"], rows
    ) + (
        f"\n\nValidation data `{cfg.val_data}` ({scores['student']['num_images']} "
        f"images at {size_text(metrics['image_size'])}). "
        f"The student has {ratio:.1%} of the teacher's parameters. Images/s is "
        "inference throughput on this machine (median of 3 timed passes over "
        "up to 64 validation images after a warm-up pass). Distillation: "
        f"kl_type={metrics['kl_type']}, kl_weight={metrics['kl_weight']:g}, "
        f"temperature={metrics['temperature']:g}."
    )
    sections = [("Teacher and student", text)]
    curves = curves_section(run)
    if curves:
        sections.append(curves)
    images, masks = first_batch(val_ds, 3)
    for role, net in (("teacher", teacher), ("student", student)):
        path = report.plot_overlays(
            images,
            predict_classes(net, images),
            run.plots / f"overlays_{role}.png",
            masks=masks,
            class_names=names,
            ignore_value=cfg.ignore_value,
            title=f"{role} on validation images",
        )
        sections.append((f"Predictions of the {role}", path))
    for role in ("student", "teacher"):
        sections.append(
            report.confusion_section(
                scores[role],
                run.plots / f"confusion_{role}.png",
                heading=f"Confusion matrix of the {role} on the validation images",
            )
        )
    sections.append(("Settings", "```yaml\n" + yaml_text(cfg.to_dict()) + "```"))
    report.write_report(
        run.report, title=f"Distillation run {run.path.name}", sections=sections
    )
