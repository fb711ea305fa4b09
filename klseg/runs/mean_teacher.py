"""The EMA teacher of a fine-tuning run (``consistency_weight > 0``).

With the consistency term on, ``klseg finetune`` trains a
:class:`klseg.consistency.MeanTeacherModel` instead of a
:class:`klseg.finetune.KLRegularizedModel`. This module holds what the run
adds for it:

- the unlabelled target images come in a seeded stream of their own,
  batched like the labelled images and zipped beside them as
  ``x["unlabeled_images"]``: every step has a full labelled batch and a full
  unlabelled batch, and an epoch is one pass over the larger of the two sets
  (unless ``steps_per_epoch`` is given). Both streams skip the examples the
  checkpointed epochs drew, so a resumed run draws the batches of the
  uninterrupted one;
- validation of the EMA teacher beside the student every validated epoch:
  ``val_<domain>_<score>`` for the student, ``val_ema_<domain>_<score>``
  (and ``val_ema_forgetting``) for the teacher;
- ``model.keras`` holds the EMA teacher (``model.ema_model``), picked by its
  target-domain validation mIoU (``val_ema_target_mean_iou``) unless
  ``monitor`` says otherwise; ``metrics.json`` and the report say so and
  give both models' scores after the last epoch.
"""

from klseg.finetune import DomainEvaluation, evaluate_domains
from klseg.runs.scoring import inference_function

__all__ = [
    "EMA_MONITOR",
    "TeacherEvaluation",
    "consistency_weight",
    "describe",
    "kl_note",
    "last_epoch_scores",
    "make_model",
    "report_section",
    "settings",
    "student_note",
    "validation_of",
    "with_unlabeled",
]

#: The column ``monitor="auto"`` picks ``model.keras`` by when the teacher is on.
EMA_MONITOR = "val_ema_target_mean_iou"

#: Prefix of the teacher's validation columns (``val_ema_target_mean_iou``).
PREFIX = "ema_"


def consistency_weight(cfg):
    """The run's consistency weight; 0 when the term is off."""
    return cfg.consistency_weight[0] if cfg.consistency_weight else 0.0


def settings(cfg):
    """The consistency settings of a run (``metrics.json``), or None when off."""
    weight = consistency_weight(cfg)
    if weight <= 0:
        return None
    return {
        "weight": weight,
        "ema_decay": cfg.ema_decay,
        "threshold": cfg.consistency_threshold,
        "rampup": cfg.consistency_rampup,
        "mix": cfg.consistency_mix,
    }


def make_model(cfg, student, source, **kwargs):
    """The training wrapper: a ``MeanTeacherModel`` with the term on, else a
    ``KLRegularizedModel``; ``kwargs`` are the wrapper's KL arguments."""
    from klseg import finetune as ft

    weight = consistency_weight(cfg)
    if weight <= 0:
        return ft.KLRegularizedModel(student, source, **kwargs)
    from klseg.consistency import MeanTeacherModel

    return MeanTeacherModel(
        student,
        source,
        consistency_weight=weight,
        ema_decay=cfg.ema_decay,
        consistency_threshold=cfg.consistency_threshold,
        consistency_rampup=cfg.consistency_rampup,
        mix=cfg.consistency_mix,
        # The strong view's generator follows the run's seed (its state is
        # checkpointed with the other random states).
        seed=cfg.seed % (2**31 - 1),
        **kwargs,
    )


def with_unlabeled(labeled, unlabeled):
    """Zip a labelled and an unlabelled stream of batches into one.

    Each labelled batch ``(x, masks)`` gets ``x["unlabeled_images"]``: the
    images of the unlabelled stream's batch at the same position (its
    masks, all ignored, are dropped).
    """
    import tensorflow as tf

    def join(batch, extra):
        x, masks = batch
        x = dict(x) if isinstance(x, dict) else {"images": x}
        images = extra[0]
        x["unlabeled_images"] = images["images"] if isinstance(images, dict) else images
        return x, masks

    return tf.data.Dataset.zip((labeled, unlabeled)).map(join).prefetch(2)


def kl_note(cfg, kl_inputs, kl_weight):
    """What the run says about the images the KL term sees beside the
    consistency term."""
    if kl_inputs == "source" or kl_weight == 0:
        return (
            f"Unlabelled target images ({cfg.unlabeled_data}) feed the "
            "consistency term to the EMA teacher."
        )
    return (
        f"Note: the KL term on target images (kl_inputs={kl_inputs!r}) sees the "
        "labelled target images; the unlabelled ones "
        f"({cfg.unlabeled_data}) feed the consistency term to the EMA teacher."
    )


def describe(consistency):
    """The consistency part of the run's opening line ("" when off)."""
    if not consistency:
        return ""
    return (
        f"consistency_weight={consistency['weight']:g} (EMA teacher, decay "
        f"{consistency['ema_decay']:g}, threshold {consistency['threshold']:g}; "
        "model.keras holds the teacher), "
    )


def validation_of(model, domains, *, ignore_value, baseline):
    """``(validation callback, model that model.keras holds)`` of a run.

    The student alone (:func:`klseg.runs.callbacks.validation`) for a
    ``KLRegularizedModel``; student and EMA teacher
    (:class:`TeacherEvaluation`), and the teacher saved, for a
    ``MeanTeacherModel``.
    """
    from klseg.runs.callbacks import validation

    ema = getattr(model, "ema_model", None)
    if ema is None:
        check = validation(
            domains,
            eval_model=model.student,
            ignore_value=ignore_value,
            baseline=baseline,
        )
        return check, model.student
    check = TeacherEvaluation(
        domains,
        student=model.student,
        teacher=ema,
        ignore_value=ignore_value,
        baseline=baseline,
    )
    return check, ema


class TeacherEvaluation(DomainEvaluation):
    """Validation of the student and of its EMA teacher, every validated epoch.

    ``datasets`` hold each domain twice (``"target"`` and ``"ema_target"``,
    ...), so that the run's history knows every column in advance: the
    student is scored on the first, the teacher on the second, through the
    same evaluation path (the teacher's ``"source"`` domain is scored as the
    student's and gets its own forgetting, ``ema_forgetting``).

    Args:
        domains: ``{domain: dataset or None}`` as for
            :func:`klseg.runs.callbacks.validation`.
        student, teacher: the two models to score.
        ignore_value: the mask value to ignore.
        baseline: the source model's source-domain mean IoU, if known.
    """

    def __init__(self, domains, *, student, teacher, ignore_value, baseline=None):
        domains = {k: v for k, v in domains.items() if v is not None}
        super().__init__(
            {**domains, **{PREFIX + k: v for k, v in domains.items()}},
            ignore_class=ignore_value,
            scores=("loss", "mean_iou", "pixel_accuracy"),
            forward=inference_function(student),
            source_baseline=baseline,
        )
        self.teacher_forward = inference_function(teacher)

    def _evaluate(self):
        own = {k: v for k, v in self.datasets.items() if not _is_ema(k)}
        ema = {k[len(PREFIX) :]: v for k, v in self.datasets.items() if _is_ema(k)}
        options = {
            "ignore_class": self.ignore_class,
            "batch_size": self.batch_size,
            "scores": self.scores,
        }
        results = evaluate_domains(
            self.model,
            own,
            source_baseline=self.source_baseline,
            forward=self.forward,
            **options,
        )
        baseline = results.get("source_model_mean_iou", self.source_baseline)
        taught = evaluate_domains(
            self.model,
            ema,
            source_baseline=baseline,
            forward=self.teacher_forward,
            **options,
        )
        taught.pop("source_model_mean_iou", None)
        results.update({PREFIX + k: v for k, v in taught.items()})
        return results


def _is_ema(key):
    return key.startswith(PREFIX)


def last_epoch_scores(history_path):
    """``{"student": {domain: mIoU}, "ema": {domain: mIoU}, "epoch": n}`` of the
    last validated epoch in the run's history, or None."""
    from klseg import report

    if not history_path.is_file():
        return None
    rows = [r for r in report.read_history(history_path) if "val_target_mean_iou" in r]
    if not rows:
        return None
    row = rows[-1]
    scores = {"epoch": int(row["epoch"]) + 1}
    for model, prefix in (("student", ""), ("ema", PREFIX)):
        scores[model] = {
            domain: row[f"val_{prefix}{domain}_mean_iou"]
            for domain in ("target", "source")
            if f"val_{prefix}{domain}_mean_iou" in row
        }
    return scores


def student_note(last):
    """The line that says the student beat the EMA teacher (``model.keras``)
    on the target at the last validated epoch (``last``: from
    :func:`last_epoch_scores`), or None. The saved model is the teacher, by
    the documented rule; the user should know what the run left behind."""
    if not last:
        return None
    student = last["student"].get("target")
    teacher = last["ema"].get("target")
    if student is None or teacher is None or student <= teacher:
        return None
    return (
        f"Note: at the last validated epoch ({last['epoch']}) the student "
        f"scored {100 * student:.1f} target mIoU against the EMA teacher's "
        f"{100 * teacher:.1f}; model.keras holds the EMA teacher of the best "
        "epoch (metrics.json last_epoch has both). A higher --ema-decay "
        "smooths more and lags more; with a short run, try a lower one."
    )


def report_section(metrics, pct):
    """The report's "Student and EMA teacher" section (markdown), or None."""
    from klseg import report

    cons = metrics.get("consistency")
    if not cons:
        return None
    rows = [
        (
            f"EMA teacher, epoch {metrics.get('best_epoch')} (model.keras)",
            pct((metrics.get("source") or {}).get("mean_iou")),
            pct((metrics.get("target") or {}).get("mean_iou")),
        )
    ]
    last = metrics.get("last_epoch") or {}
    for model, label in (("ema", "EMA teacher"), ("student", "student")):
        if model in last:
            rows.append(
                (
                    f"{label}, last epoch ({last['epoch']})",
                    pct(last[model].get("source")),
                    pct(last[model].get("target")),
                )
            )
    text = report.markdown_table(["model", "source mIoU", "target mIoU"], rows)
    text += (
        f"\n\nConsistency to the EMA teacher: weight {cons['weight']:g}, EMA decay "
        f"{cons['ema_decay']:g}, confidence threshold {cons['threshold']:g}, "
        f"ramp-up {cons['rampup']} steps, {cons['mix']} mixing. model.keras "
        f"holds the EMA teacher, picked by {metrics.get('monitor')}. The "
        "training curves show consistency_loss and teacher_confidence (the "
        "teacher's mean max probability on the unlabelled images)."
    )
    return ("Student and EMA teacher", text)
