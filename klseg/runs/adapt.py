"""``klseg adapt``: adapt a trained model to a target domain without target labels.

Three methods (docs/adapt.md):

- ``self-training``: a :class:`klseg.adaptation.SelfTrainingModel`. With
  ``source_data`` (labelled source images) it is unsupervised domain
  adaptation: a labelled source batch and a target batch every step, the
  source batch's pixels of half its classes pasted onto the target images
  with their labels; without, it is source-free: two independent target
  batches every step, one for the KL term (and the class balance), one for
  the pseudo-labels. ``model.keras`` is the EMA teacher.
- ``tent``: AdaBN, then a :class:`klseg.adaptation.TentModel` on target
  batches; ``model.keras`` is the student.
- ``bn-stats``: AdaBN in one pass over the target images, no training.

Both domains are scored each validated epoch when ``val_data`` /
``source_val_data`` are given; ``model.keras`` is picked by the target
mIoU, else it is the last epoch's (without target labels no score can
choose, and the collapse signal is printed every epoch instead).
"""

import dataclasses
import time

import keras

from klseg import errors
from klseg.runs import inputs, mean_teacher, runtime, streams
from klseg.runs.configs.bounds import mode_defaults_text
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

__all__ = ["adapt", "input_paths"]

#: The history column that keeps the last epoch when no target labels can
#: choose (``monitor="auto"`` without ``val_data``).
LAST_EPOCH_MONITOR = "val_epoch"


def adapt(cfg, *, callbacks=None):
    """Adapt a trained model to a target domain from unlabelled target images.

    Args:
        cfg: a :class:`klseg.runs.AdaptConfig`.
        callbacks: extra Keras callbacks.

    Returns:
        A :class:`klseg.runs.RunResult`.

    Raises:
        klseg.errors.ModelError: the source model is missing or not a klseg
            segmentation model, or has no BatchNorm layer (``bn-stats``,
            ``tent``).
        klseg.errors.DataError, klseg.errors.RunError,
        klseg.errors.TrainingDiverged: as for :func:`klseg.runs.finetune`.
    """
    started = time.time()
    strategy, is_chief = runtime.make_strategy(cfg.strategy)
    check_inputs_not_outputs({"output": cfg.output}, input_paths(cfg))
    if isinstance(cfg.source, str) or hasattr(cfg.source, "__fspath__"):
        inputs.check_model_file(cfg.source)
    splits = _load_inputs(cfg)
    image_size = inputs.default_image_size(cfg, splits["target_images"], cfg.source)
    step = _bn_stats if cfg.method == "bn-stats" else _adapt
    return run_in_folder(
        cfg,
        step,
        job="adapt",
        strategy=strategy,
        is_chief=is_chief,
        callbacks=callbacks,
        started=started,
        splits=splits,
        image_size=image_size,
    )


def input_paths(cfg):
    """``{option: path}`` of everything an adaptation run reads."""
    return {
        "source": cfg.source,
        "target_images": cfg.target_images,
        "source_data": cfg.source_data,
        "val_data": cfg.val_data,
        "source_val_data": cfg.source_val_data,
        "style_references": cfg.style_references,
        "class_map": cfg.class_map,
    }


def _load_inputs(cfg):
    """Every data set, read and checked before the run folder is touched."""
    splits = {
        "target_images": inputs.load_split(cfg.target_images, cfg, require_masks=False)
    }
    for key in ("source_data", "val_data", "source_val_data"):
        if getattr(cfg, key):
            splits[key] = inputs.load_split(getattr(cfg, key), cfg)
    if cfg.style_references:
        splits["style_references"] = inputs.load_split(
            cfg.style_references, cfg, require_masks=False
        )
    return splits


# Settings and models ------------------------------------------------------


def recipe(cfg):
    """The one line that says what the run does, with every value it uses
    (and which of them are the mode's defaults)."""
    text = _recipe(cfg)
    applied = getattr(cfg, "applied", None)
    if applied:
        text += f" [{mode_defaults_text(cfg.mode, applied)}]"
    return text


def _recipe(cfg):
    head = f"method={cfg.method}"
    if cfg.method == "bn-stats":
        return head + " (BatchNorm statistics re-estimated on the target images)"
    kl = f"kl_weight={cfg.kl_weight:g} (temperature {cfg.temperature:g})"
    rate = f"learning_rate={cfg.learning_rate:g}"
    if cfg.method == "tent":
        return f"{head}: entropy_weight={cfg.entropy_weight:g}, {kl}, {rate}"
    mode = (
        "unsupervised domain adaptation (source labels, ClassMix of source "
        "pixels onto target images)"
        if not cfg.source_free
        else f"source-free ({cfg.consistency_mix} between target images)"
    )
    text = (
        f"{head}, {mode}: {kl} on {'source' if not cfg.source_free else 'target'} "
        f"images, pseudo-labels weight {cfg.consistency_weight:g} (EMA decay "
        f"{cfg.ema_decay:g}, threshold {cfg.consistency_threshold:g}, ramp-up "
        f"{cfg.consistency_rampup} steps), student_bn={cfg.student_bn}, {rate}"
    )
    if cfg.source_free:
        text += f", balance_weight={cfg.balance_weight:g}"
        text += ", classifier frozen" if cfg.freeze_head else ""
    if cfg.style != "none":
        text += f", style={cfg.style}"
    return text


@dataclasses.dataclass(frozen=True)
class _Models:
    source: object
    student: object
    model: object  # the training wrapper (None for bn-stats)
    names: list

    @property
    def num_classes(self):
        return len(self.names)


def _check_classes(splits, cfg, num_classes):
    for key in ("source_data", "val_data", "source_val_data"):
        inputs.check_labels(
            splits.get(key),
            num_classes,
            "--" + key.replace("_", "-"),
            f"The source model {cfg.source} predicts {num_classes} classes: map "
            "the mask values with --class-map.",
        )


def _models(ctx, policy):
    """The source model (checked), the student cloned from it, and the
    training wrapper of the method, compiled (and restored)."""
    from klseg import finetune as ft
    from klseg import models

    cfg, image_size = ctx.cfg, ctx.image_size
    with ctx.strategy.scope():
        source = inputs.load_model(cfg.source)
        num_classes, multiple = inputs.model_info(source, cfg.source)
        inputs.check_image_size(image_size, multiple)
        inputs.check_crop_size(cfg.crop_size, image_size, multiple)
        names = models.get_class_names(source) or [
            f"class_{i}" for i in range(num_classes)
        ]
        _check_classes(ctx.splits, cfg, num_classes)
        student = ft.clone_student(source, name=source.name, dtype_policy=policy)
        models.set_training_size(student, image_size)
        if cfg.method != "self-training":
            # TENT starts from the target's statistics (AdaBN); so does
            # bn-stats, which stops there.
            _re_estimate(ctx, student)
        model = _wrapper(cfg, student, source)
        if model is not None:
            labelled = cfg.method == "self-training" and not cfg.source_free
            compile_model(
                ctx,
                model,
                policy,
                num_classes=num_classes,
                scores=("source_mean_iou",) if labelled else (),
            )
    return _Models(source, student, model, list(names))


def _wrapper(cfg, student, source):
    from klseg import adaptation

    if cfg.method == "bn-stats":
        return None
    common = {
        "kl_weight": cfg.kl_weight,
        "temperature": cfg.temperature,
        "ignore_class": cfg.ignore_value,
    }
    if cfg.method == "tent":
        try:
            return adaptation.TentModel(
                student,
                source,
                entropy_weight=cfg.entropy_weight,
                student_bn=cfg.student_bn,
                **common,
            )
        except errors.InvalidArgumentError as e:
            raise errors.ModelError(f"{cfg.source}: {e}") from None
    if cfg.freeze_head:
        adaptation.freeze_classifier(student)
    return adaptation.SelfTrainingModel(
        student,
        source,
        cross_domain_mix=not cfg.source_free,
        balance_weight=cfg.balance_weight,
        consistency_weight=cfg.consistency_weight,
        ema_decay=cfg.ema_decay,
        consistency_threshold=cfg.consistency_threshold,
        consistency_rampup=cfg.consistency_rampup,
        mix=cfg.consistency_mix,
        student_bn=cfg.student_bn,
        seed=cfg.seed % (2**31 - 1),
        **common,
    )


def _re_estimate(ctx, student):
    """AdaBN over the target images, in order, at the training size."""
    from klseg import adaptation

    cfg = ctx.cfg
    ds = streams.evaluation_stream(cfg, ctx.splits["target_images"], ctx.image_size)
    try:
        seen = adaptation.adapt_batchnorm(student, ds)
    except errors.InvalidArgumentError as e:
        raise errors.ModelError(f"{cfg.source}: {e}") from None
    say(cfg.verbose, f"BatchNorm statistics re-estimated on {seen} target images.")


# Streams ------------------------------------------------------------------


def _training_stream(ctx):
    """``(stream, steps per epoch)`` of the method (see the module docstring)."""
    cfg, splits = ctx.cfg, ctx.splits
    target = splits["target_images"]
    if cfg.method == "tent":
        sets = {"data": target}
        steps = streams.steps_per_epoch(
            cfg, streams.images_per_epoch(sets, cfg.batch_size)
        )
    else:
        sets = {"data": splits.get("source_data", target), "unlabeled_data": target}
        steps = streams.steps_per_epoch(
            cfg, streams.images_per_epoch(sets, cfg.batch_size, unlabeled="paired")
        )
    drawn = streams.examples_drawn(ctx.state, steps, cfg.batch_size)
    made = streams.TrainingStreams(cfg, sets, ctx.image_size, skip=drawn)
    if cfg.method == "tent":
        return made.stream("data"), steps
    labelled = made.stream("data", style=_style(ctx))
    return mean_teacher.with_unlabeled(labelled, made.stream("unlabeled_data")), steps


def _style(ctx):
    """The restyling of the labelled source images, or None."""
    splits = ctx.splits
    references = splits.get("style_references", splits["target_images"])
    return streams.domain_style(ctx.cfg, references, ctx.image_size)


def _evaluation_streams(ctx):
    cfg, splits, size = ctx.cfg, ctx.splits, ctx.image_size
    return {
        "target": streams.evaluation_stream(cfg, splits.get("val_data"), size),
        "source": streams.evaluation_stream(cfg, splits.get("source_val_data"), size),
    }


def _source_shares(ctx, nets):
    """The source model's share of target pixels per class (the reference of
    the collapse signal), counted as the pseudo-labels are."""
    from klseg.adaptation import ClassShares
    from klseg.runs.scoring import inference_function

    forward = inference_function(nets.source)
    shares = ClassShares(nets.num_classes)
    ds = streams.evaluation_stream(ctx.cfg, ctx.splits["target_images"], ctx.image_size)
    for x, _ in ds:
        shares.update_state(forward(x))
    return keras.ops.convert_to_numpy(shares.shares())


# The run ------------------------------------------------------------------


def _adapt(ctx):
    """Settings, models, streams, baseline, fit, scores, report."""
    cfg = ctx.cfg
    ctx = dataclasses.replace(ctx, learning_rate=cfg.learning_rate)
    keras.utils.set_random_seed(cfg.seed)
    say(cfg.verbose, f"Adapting {cfg.source} to {cfg.target_images}: {recipe(cfg)}.")
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        nets = _models(ctx, policy)
        train_ds, steps = _training_stream(ctx)
        domains = _evaluation_streams(ctx)
        baseline = _baseline(ctx, nets, domains)
        watch = None
        if cfg.method == "self-training":
            # Not in the checkpoint: a resumed run counts it again (the same).
            nets.model.set_reference_shares(_source_shares(ctx, nets))
            watch = CollapseWatch(nets.names, verbose=cfg.verbose)
            ctx = dataclasses.replace(
                ctx, callbacks=[watch, *list(ctx.callbacks or [])]
            )
        check, saved = _validation(ctx, nets, domains, baseline)
        monitor = _monitor(cfg, domains)
        say(
            cfg.verbose,
            f"{steps} steps/epoch, {cfg.epochs} epochs; model.keras: "
            f"{_kept(cfg, monitor)} -> {ctx.run.path}",
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
    scores = domain_metrics(
        best, domains, nets.num_classes, cfg.ignore_value, nets.names
    )
    metrics = _result_metrics(
        ctx,
        nets,
        {**scores, "source_model": baseline},
        run_summary(ctx, final_state, monitor),
        watch,
    )
    say(cfg.verbose, mean_teacher.student_note(metrics.get("last_epoch")))
    _write_report(ctx, best, domains, nets.names, metrics)
    return finish(ctx.run, cfg, metrics)


def _bn_stats(ctx):
    """AdaBN in one pass; the model, its scores and the report."""
    from klseg.files import save_model

    cfg = ctx.cfg
    say(cfg.verbose, f"Adapting {cfg.source} to {cfg.target_images}: {recipe(cfg)}.")
    with runtime.precision(cfg.mixed_precision, cfg.verbose) as policy:
        nets = _models(ctx, policy)
        domains = _evaluation_streams(ctx)
        baseline = _baseline(ctx, nets, domains)
    save_model(nets.student, ctx.run.model)
    scores = domain_metrics(
        nets.student, domains, nets.num_classes, cfg.ignore_value, nets.names
    )
    summary = {
        "best_epoch": None,
        "epochs": 0,
        "monitor": None,
        "seconds": round(time.time() - ctx.started, 1),
    }
    metrics = _result_metrics(
        ctx, nets, {**scores, "source_model": baseline}, summary, None
    )
    _write_report(ctx, nets.student, domains, nets.names, metrics)
    return finish(ctx.run, cfg, metrics)


def _baseline(ctx, nets, domains):
    cfg = ctx.cfg
    return domain_metrics(
        nets.source, domains, nets.num_classes, cfg.ignore_value, nets.names
    )


def _monitor(cfg, domains):
    """``cfg.monitor``; "auto" picks the target mIoU of the saved model, else
    the last epoch."""
    if cfg.monitor != "auto":
        return cfg.monitor
    if domains["target"] is None:
        return LAST_EPOCH_MONITOR
    if cfg.method == "self-training":
        return mean_teacher.EMA_MONITOR
    return "val_target_mean_iou"


def _kept(cfg, monitor):
    who = "the EMA teacher" if cfg.method == "self-training" else "the student"
    if monitor == LAST_EPOCH_MONITOR:
        return f"{who} of the last epoch (no --val-data to choose by)"
    return f"{who} of the best epoch by {monitor}"


def _validation(ctx, nets, domains, baseline):
    """``(validation callback, model model.keras holds)``."""
    cfg = ctx.cfg
    source_miou = (baseline.get("source") or {}).get("mean_iou")
    if any(ds is not None for ds in domains.values()):
        return mean_teacher.validation_of(
            nets.model, domains, ignore_value=cfg.ignore_value, baseline=source_miou
        )
    saved = getattr(nets.model, "ema_model", None) or nets.model.student
    return LastEpoch(), saved


class LastEpoch:
    """The validation of a run without labelled validation data: it logs
    ``val_epoch`` (the epoch's number), so that ``model.keras`` is the last
    validated epoch's model."""

    datasets = {"": ()}
    scores = ("epoch",)

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[LAST_EPOCH_MONITOR] = float(epoch + 1)


class CollapseWatch(keras.callbacks.Callback):
    """Says, after every epoch, which classes the pseudo-labels lost.

    The model logs ``lost_classes`` (classes the source model predicts on at
    least 1% of the target pixels whose share of the teacher's pseudo-labels
    fell below a tenth of it, :meth:`klseg.adaptation.SelfTrainingModel.
    lost_classes`); this prints them by name and keeps the epochs.
    """

    def __init__(self, names, *, verbose=1):
        super().__init__()
        self.names = names
        self.verbose = verbose
        self.warnings = []

    def on_epoch_end(self, epoch, logs=None):
        import numpy as np

        lost = np.asarray(self.model.lost_classes(), dtype=bool)
        if not lost.any():
            return
        shares = self.model.pseudo_label_shares()
        reference = np.asarray(self.model.reference_shares)
        lost_names = [self.names[c] for c in np.flatnonzero(lost)]
        detail = ", ".join(
            f"{self.names[c]} {100 * shares[c]:.1f}% (source model "
            f"{100 * reference[c]:.1f}%)"
            for c in np.flatnonzero(lost)
        )
        self.warnings.append({"epoch": epoch + 1, "lost_classes": lost_names})
        say(
            self.verbose,
            f"Warning: epoch {epoch + 1}: the pseudo-labels lost {detail} of the "
            "target pixels: self-training is collapsing onto fewer classes "
            "(history column lost_classes). Raise --kl-weight or "
            "--consistency-threshold, or lower the learning rate.",
        )


# Results ------------------------------------------------------------------


def _mode(cfg):
    if cfg.method != "self-training":
        return "test-time"
    return "source-free" if cfg.source_free else "unsupervised"


def _result_metrics(ctx, nets, scores, summary, watch):
    """``metrics.json``: the scores after and before (``source_model``), the
    settings, the run's summary, the forgetting, the pseudo-labels."""
    cfg = ctx.cfg
    result = {
        **scores,
        "method": cfg.method,
        "mode": _mode(cfg),
        # The recipe itself: which values were the mode's defaults is a
        # remark for the console (a resumed run reads them from config.yaml).
        "recipe": _recipe(cfg),
        "saved_model": "ema_teacher" if cfg.method == "self-training" else "student",
        **summary,
    }
    if cfg.method != "bn-stats":
        result["kl_weight"] = cfg.kl_weight
        result["temperature"] = cfg.temperature
    baseline = scores["source_model"]
    if "source" in scores and "source" in baseline:
        result["forgetting"] = (
            baseline["source"]["mean_iou"] - scores["source"]["mean_iou"]
        )
    if watch is not None:
        result["pseudo_labels"] = _pseudo_labels(nets, watch)
        result["last_epoch"] = mean_teacher.last_epoch_scores(ctx.run.history)
    return result


def _pseudo_labels(nets, watch):
    """The last epoch's pseudo-label statistics and the collapse warnings."""
    import numpy as np

    model = nets.model
    shares = model.pseudo_label_shares()
    reference = np.asarray(model.reference_shares)
    return {
        "confident_share": float(model.confident_share_tracker.result()),
        "class_shares": {n: float(v) for n, v in zip(nets.names, shares)},
        "source_model_class_shares": {
            n: float(v) for n, v in zip(nets.names, reference)
        },
        "lost_classes": [
            nets.names[c] for c in np.flatnonzero(np.asarray(model.lost_classes()))
        ],
        "warnings": watch.warnings,
    }


def _write_report(ctx, model, domains, names, metrics):
    from klseg import report

    run = ctx.run
    table = {
        "source model": {d: m["mean_iou"] for d, m in metrics["source_model"].items()},
        f"adapted ({metrics['method']})": {
            d: metrics[d]["mean_iou"] for d in ("source", "target") if d in metrics
        },
    }
    out = RunReport(run, ctx.cfg, names=names)
    out.add(("Result", _result_text(table, metrics)))
    out.add(_pseudo_label_section(metrics, names))
    if any(row for row in table.values()):
        out.add(
            (
                "Mean IoU before and after",
                report.plot_domain_miou(table, run.plots / "domains.png"),
            )
        )
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
            out.add_confusion(
                metrics[domain],
                name=domain,
                heading=f"Confusion matrix on {domain}-domain images",
            )
    out.write(f"Adaptation run {run.path.name}")


def _result_text(table, metrics):
    from klseg import report

    rows = [
        (name, pct(row.get("source")), pct(row.get("target")))
        for name, row in table.items()
    ]
    text = f"{metrics['recipe']}.\n\n"
    if any(row for row in table.values()):
        text += report.markdown_table(["model", "source mIoU", "target mIoU"], rows)
    else:
        text += "No labelled validation data was given: nothing was scored."
    if "forgetting" in metrics:
        text += (
            f"\n\nForgetting (source mIoU lost): "
            f"{100 * metrics['forgetting']:.1f} points."
        )
    return text


def _pseudo_label_section(metrics, names):
    from klseg import report

    pseudo = metrics.get("pseudo_labels")
    if not pseudo:
        return None
    rows = [
        (
            name,
            pct(pseudo["source_model_class_shares"][name]),
            pct(pseudo["class_shares"][name]),
        )
        for name in names
    ]
    text = report.markdown_table(
        ["class", "source model on target (%)", "pseudo-labels, last epoch (%)"], rows
    )
    text += (
        f"\n\nShare of confident target pixels (teacher confidence at least the "
        f"threshold), last epoch: {pct(pseudo['confident_share'])}%. "
    )
    if pseudo["warnings"]:
        epochs = ", ".join(str(w["epoch"]) for w in pseudo["warnings"])
        text += (
            f"**Collapse warning** at epochs {epochs}: the pseudo-labels lost "
            f"{', '.join(pseudo['warnings'][-1]['lost_classes'])}."
        )
    else:
        text += "No class was lost (history column lost_classes stayed 0)."
    return ("Pseudo-labels (the collapse signal)", text)
