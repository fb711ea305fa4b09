"""``klseg distill``: train a smaller student from a teacher's predictions."""

import contextlib
import dataclasses
import math
import statistics
import time
from pathlib import Path

from klseg import errors
from klseg.runs import hub, inputs, runtime, streams
from klseg.runs.callbacks import validation
from klseg.runs.checks import fail, size_text
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
            "teacher": None if hub.is_hub_spec(cfg.teacher) else cfg.teacher,
            "data": cfg.data,
            "unlabeled_data": cfg.unlabeled_data,
            "val_data": cfg.val_data,
            "class_map": cfg.class_map,
        },
    )
    if isinstance(cfg.teacher, (str, Path)):
        # A missing file or preset folder fails here, before any work.
        inputs.check_model_file(cfg.teacher)
        if not hub.is_hub_spec(cfg.teacher):
            _check_num_classes(cfg, inputs.archive_num_classes(cfg.teacher))
    # Every data set is read and checked before the run folder is touched.
    splits = {
        "data": inputs.load_split(cfg.data, cfg),
        "val_data": inputs.load_split(cfg.val_data, cfg),
    }
    if cfg.unlabeled_data:
        splits["unlabeled_data"] = inputs.load_split(
            cfg.unlabeled_data, cfg, require_masks=False
        )
    # Without --image-size, the teacher's training size, else the images' size.
    image_size = inputs.default_image_size(cfg, splits["data"], cfg.teacher)
    strategy, is_chief = runtime.make_strategy(cfg.strategy)

    return run_in_folder(
        cfg,
        _distill,
        job="train",
        strategy=strategy,
        is_chief=is_chief,
        callbacks=callbacks,
        started=started,
        splits=splits,
        image_size=image_size,
    )


def _check_num_classes(cfg, teacher_classes):
    if teacher_classes is None or cfg.num_classes in (None, teacher_classes):
        return
    fail(
        f"num_classes must equal the teacher's number of classes: the teacher "
        f"{cfg.teacher} predicts {teacher_classes} classes, and the student "
        "learns the teacher's classes. Drop --num-classes or give "
        f"{teacher_classes}. Received: num_classes={cfg.num_classes}"
    )


def _class_names(model, count):
    from klseg import models

    with contextlib.suppress(errors.KlsegError):
        return models.get_class_names(model)
    return [f"class_{i}" for i in range(count)]


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


@dataclasses.dataclass(frozen=True)
class _Models:
    """The models of a distillation run."""

    teacher: object
    student: object
    model: object  # the DistillationModel that trains the student
    num_classes: int
    names: list


def _distill(ctx):
    """Settings, models, streams, fit, scores, report."""
    import keras

    cfg = ctx.cfg
    keras.utils.set_random_seed(cfg.seed)
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        nets = _models(ctx, policy)
        train_ds, steps = _training_stream(ctx)
        val_ds = streams.evaluation_stream(cfg, ctx.splits["val_data"], ctx.image_size)
        monitor = "val_mean_iou" if cfg.monitor == "auto" else cfg.monitor
        say(
            cfg.verbose,
            f"Distilling {cfg.teacher} ({nets.teacher.count_params():,} parameters) "
            f"into {cfg.model} ({nets.student.count_params():,} parameters) on "
            f"{cfg.data}: kl_type={cfg.kl_type}, kl_weight={cfg.kl_weight:g}, "
            f"temperature={cfg.resolved_temperature:g}, {steps} steps/epoch, "
            f"{cfg.epochs} epochs -> {ctx.run.path}",
        )
        final_state = fit(
            ctx,
            nets.model,
            save_model=nets.student,
            train_ds=train_ds,
            steps=steps,
            validation=validation(
                {"": val_ds}, eval_model=nets.student, ignore_value=cfg.ignore_value
            ),
            monitor=monitor,
        )
    best = best_model(ctx.run, nets.student)
    scores, summaries = _scores(ctx, nets, best, val_ds)
    image_size = ctx.image_size
    result_metrics = {
        **summaries,
        "val": scores["student"],
        "kl_weight": cfg.kl_weight,
        "temperature": cfg.resolved_temperature,
        "kl_type": cfg.kl_type,
        "image_size": list(image_size) if isinstance(image_size, tuple) else image_size,
        **run_summary(ctx, final_state, monitor),
    }
    _write_report(ctx, nets, best, val_ds, result_metrics, scores)
    return finish(ctx.run, cfg, result_metrics)


def _models(ctx, policy):
    """The teacher (checked against the data), the new student, and the
    distillation model that trains it, compiled (and restored)."""
    from klseg import models
    from klseg.distill import DistillationModel

    cfg = ctx.cfg
    with ctx.strategy.scope():
        teacher = inputs.load_model(cfg.teacher)
        num_classes, multiple = inputs.model_info(teacher, cfg.teacher)
        _check_num_classes(cfg, num_classes)
        names = _class_names(teacher, num_classes)
        for key in ("data", "val_data"):
            inputs.check_labels(
                ctx.splits[key],
                num_classes,
                "--" + key.replace("_", "-"),
                f"The teacher {cfg.teacher} predicts {num_classes} classes: "
                "map the mask values with --class-map.",
            )
        student = inputs.build_model(cfg, num_classes, names)
        with contextlib.suppress(errors.KlsegError):
            multiple = math.lcm(multiple, models.size_multiple(student))
        inputs.check_image_size(ctx.image_size, multiple)
        inputs.check_crop_size(cfg.crop_size, ctx.image_size, multiple)
        with contextlib.suppress(errors.KlsegError):
            models.set_training_size(student, ctx.image_size)
        model = DistillationModel(
            student,
            teacher,
            kl_weight=cfg.kl_weight,
            temperature=cfg.resolved_temperature,
            kl_type=cfg.kl_type,
            # Several replicas train as one device would.
            student_bn="trainable" if cfg.strategy == "default" else "synchronized",
            ignore_class=cfg.ignore_value,
        )
        compile_model(ctx, model, policy, num_classes=num_classes)
    return _Models(teacher, student, model, num_classes, names)


def _training_stream(ctx):
    """``(stream, steps per epoch)``: the labelled images, mixed with the
    unlabelled ones when the KL term is on."""
    cfg, splits = ctx.cfg, ctx.splits
    # Unlabelled images feed the KL term only.
    mixes = "unlabeled_data" in splits and cfg.kl_weight > 0
    if "unlabeled_data" in splits and not mixes:
        say(
            cfg.verbose,
            f"Note: unlabeled_data ({cfg.unlabeled_data}) is not used: "
            "unlabelled images only feed the KL term, and kl_weight=0.",
        )
    images = streams.images_per_epoch(
        splits, cfg.batch_size, unlabeled="mixed" if mixes else None
    )
    steps = streams.steps_per_epoch(cfg, images)
    # A resumed run starts every stream where the checkpointed epoch left
    # it: the same batches, in the same order, with the same augmentation.
    drawn = streams.examples_drawn(ctx.state, steps, cfg.batch_size)
    made = streams.TrainingStreams(cfg, splits, ctx.image_size, skip=drawn)
    return (made.mixed() if mixes else made.stream("data")), steps


def _summary(scores, model, speed):
    return {
        "mean_iou": scores["mean_iou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "parameters": int(model.count_params()),
        "images_per_second": round(speed, 2),
    }


def _scores(ctx, nets, best, val_ds):
    """``(scores, summaries)`` of the teacher and the best student: their
    scores on the validation data, and ``metrics.json``'s summary of each
    (with parameters and inference throughput)."""
    cfg = ctx.cfg
    roles = (("teacher", nets.teacher), ("student", best))
    scores = {
        role: domain_metrics(
            net, {"val": val_ds}, nets.num_classes, cfg.ignore_value, nets.names
        )["val"]
        for role, net in roles
    }
    # Throughput on (up to 64) validation images at the training size.
    val_images, _ = first_batch(val_ds, 64)
    speed = {
        role: images_per_second(net, val_images, batch_size=cfg.batch_size)
        for role, net in roles
    }
    summaries = {role: _summary(scores[role], net, speed[role]) for role, net in roles}
    return scores, summaries


def _comparison(cfg, metrics, scores):
    """The "Teacher and student" section's table and text."""
    from klseg import report

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
    return report.markdown_table(
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


def _write_report(ctx, nets, student, val_ds, metrics, scores):
    run, cfg = ctx.run, ctx.cfg
    out = RunReport(run, cfg, names=nets.names)
    out.add(("Teacher and student", _comparison(cfg, metrics, scores)))
    out.add_curves()
    batch = first_batch(val_ds, 3)
    for role, net in (("teacher", nets.teacher), ("student", student)):
        out.add_overlays(
            net,
            batch,
            file=f"overlays_{role}.png",
            heading=f"Predictions of the {role}",
            title=f"{role} on validation images",
        )
    for role in ("student", "teacher"):
        out.add_confusion(
            scores[role],
            name=role,
            heading=f"Confusion matrix of the {role} on the validation images",
        )
    out.write(f"Distillation run {run.path.name}")
