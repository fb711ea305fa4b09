"""The fit sequence shared by the training jobs (``train``, ``finetune``,
``distill``).

:func:`in_run_folder` opens the run folder (new, reused or resumed, by the
policy of :mod:`klseg.runs.folder`) and runs the job in it, which sees the
run as a :class:`RunContext`. :func:`compile_model` compiles the job's model
with the task's loss and metrics and restores a resumed run's checkpoint.
:func:`fit` runs ``model.fit`` with klseg's callbacks in their order: the
interrupt check, validation, the non-finite-loss stop, the history file,
checkpoints and the best model, TensorBoard scalars, then the caller's. An
epoch that diverges or is interrupted writes none of the files after it; the
history row comes before the checkpoint so that a resumed run never misses
the row of a checkpointed epoch (it drops rows past the checkpoint).
:func:`best_model`, :func:`run_summary` and :func:`finish` close the run.
"""

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from klseg import errors, progress
from klseg.files import write_json
from klseg.runs import callbacks as cb
from klseg.runs import inputs, runtime
from klseg.runs.checkpoint import restore_checkpoint, settle_history
from klseg.runs.configs import DEFAULT_LEARNING_RATE, RESUMABLE_CHANGES
from klseg.runs.folder import RunFolder, holds_folders, open_run
from klseg.runs.reports import curves_section
from klseg.runs.results import RunResult
from klseg.runs.streams import examples_drawn

__all__ = [
    "RunContext",
    "best_model",
    "compile_model",
    "curves_section",
    "examples_drawn",
    "finish",
    "finished_result",
    "fit",
    "in_run_folder",
    "run_in_folder",
    "run_summary",
    "say",
]


def say(verbose, message):
    """Print ``message`` when ``verbose`` (nothing for None)."""
    if verbose and message is not None:
        print(message, flush=True)


@holds_folders
def in_run_folder(cfg, job, *, is_chief=True, strategy=None):
    """Run ``job(run, checkpoint)`` in the prepared run folder.

    The run folder is locked until the job returns or raises. Workers of a
    multi-worker run other than the chief take no lock and write to a private
    temporary folder that is removed at the end: the chief alone writes
    ``cfg.output``. To ``--resume``, every worker reads the chief's newest
    checkpoint in ``cfg.output`` (a file system they share), and the workers
    check that they start from the same epoch (:func:`_workers_agree`, with
    ``strategy``) before any of them trains.
    """
    if strategy is not None and cfg.strategy != "multi-worker":
        strategy = None  # one process: nobody to agree with
    if not is_chief:
        return _as_worker(cfg, job, strategy)

    def start():
        run, checkpoint = open_run(
            cfg, ignore=RESUMABLE_CHANGES, say=lambda message: say(cfg.verbose, message)
        )
        done = finished_result(run, checkpoint, cfg.epochs) if cfg.resume else None
        return run, checkpoint, done

    run, checkpoint, done = _start_together(strategy, cfg, start, chief=True)
    if done is not None:
        say(
            cfg.verbose,
            f"{run.path}: all {cfg.epochs} epochs are done; nothing to train "
            "(raise --epochs to train longer).",
        )
        return done
    # Progress of the long steps inside (scores, stored predictions) follows
    # the run's verbosity.
    with progress.verbosity(cfg.verbose):
        return job(run, checkpoint)


#: The prefix of the private folder of a multi-worker run's other workers.
_WORKER_FOLDER = "klseg-worker-"


def _as_worker(cfg, job, strategy):
    """A multi-worker run's job on a worker other than the chief: the
    chief's checkpoint to resume from, a private folder to write."""

    def start():
        if not cfg.resume:
            return None, None
        chief = RunFolder(cfg.output)
        checkpoint = chief.latest_checkpoint()
        return checkpoint, finished_result(chief, checkpoint, cfg.epochs)

    checkpoint, done = _start_together(strategy, cfg, start, chief=False)
    if done is not None:
        return done
    run = RunFolder(tempfile.mkdtemp(prefix=_WORKER_FOLDER))
    try:
        return job(run, checkpoint)
    finally:
        shutil.rmtree(run.path, ignore_errors=True)


def _start_together(strategy, cfg, start, *, chief):
    """``start()`` (a tuple ending in this worker's ``(checkpoint, done)``),
    then, on a multi-worker run (``strategy`` not None), the check that
    every worker starts from the same epoch (:func:`_workers_agree`). A
    worker whose ``start`` raises still takes part in the check, so that the
    others stop instead of waiting for it, then raises its own error."""
    try:
        started = start()
    except Exception:
        if strategy is not None:
            _workers_agree(strategy, cfg, None, chief=chief)
        raise
    if strategy is not None:
        _workers_agree(strategy, cfg, started[-2:], chief=chief)
    return started


def _workers_agree(strategy, cfg, start, *, chief):
    """Stop unless every worker starts the run from the same epoch.

    ``start`` is this worker's ``(checkpoint, done)`` (the checkpoint it
    resumes from and the result of a run already done, each None when
    there is none), or None when it failed to open the run. A worker that
    failed has its own error; the others stop with one that points to it.
    Workers that disagree on the epoch (one that cannot read
    ``cfg.output``) all stop, before the first step.
    """
    failed = start is None
    checkpoint, done = start or (None, None)
    epoch = int(checkpoint[1]["epoch"]) if checkpoint else 0
    rows = runtime.gather_from_workers(
        strategy, (int(not failed), epoch, int(done is not None), int(chief))
    )
    if failed:
        return
    if not all(row[0] for row in rows):
        who = "the chief" if any(r[3] and not r[0] for r in rows) else "a worker"
        raise errors.RunError(
            f"{who} of this multi-worker run stopped before training (its "
            "output says why); fix that and start every worker again."
        )
    starts = {(row[1], row[2]) for row in rows}
    if len(starts) > 1:
        chief_epoch = next((r[1] for r in rows if r[3]), None)
        raise errors.RunError(
            "the workers of this multi-worker run would resume from different "
            f"epochs (the chief from {chief_epoch or 'none'}, this worker from "
            f"{epoch or 'none'}): every worker reads the chief's checkpoints "
            f"in {cfg.output} to --resume, so that folder must be on a file "
            "system every worker shares, at the same path."
        )


def finished_result(run, checkpoint, epochs):
    """The :class:`RunResult` of ``run`` when it finished ``epochs`` (see
    :meth:`klseg.runs.folder.RunFolder.finished`), else None."""
    if not run.finished(checkpoint, epochs):
        return None
    metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
    return RunResult(run.path, run.model, metrics, metrics.get("best_epoch"), epochs)


def run_in_folder(cfg, step, *, job, strategy, is_chief, callbacks, **prepared):
    """Run ``step(ctx)`` in the prepared run folder (:func:`in_run_folder`),
    ``ctx`` the run's :class:`RunContext`: the learning rate is the
    config's, else the default of ``job`` (``"train"`` or ``"finetune"``);
    ``prepared`` holds ``started``, ``splits`` and ``image_size``."""

    def in_folder(run, checkpoint):
        learning_rate = cfg.learning_rate or DEFAULT_LEARNING_RATE[job]
        return step(
            RunContext(
                cfg=cfg,
                run=run,
                checkpoint=checkpoint,
                strategy=strategy,
                callbacks=callbacks,
                learning_rate=learning_rate,
                **prepared,
            )
        )

    return in_run_folder(cfg, in_folder, is_chief=is_chief, strategy=strategy)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunContext:
    """One training run, as the steps of its job see it.

    Attributes:
        cfg: the job's config.
        run: the :class:`klseg.runs.folder.RunFolder` written.
        checkpoint: ``(folder, state)`` of the checkpoint a resumed run
            starts from, else None.
        strategy: the ``tf.distribute`` strategy.
        callbacks: the caller's extra Keras callbacks (run after klseg's).
        started: ``time.time()`` when the job started.
        learning_rate: the run's learning rate (the config's, else the
            job's default).
        splits: ``{option: split}`` of the data sets read.
        image_size: the training size.
    """

    cfg: object
    run: RunFolder
    checkpoint: tuple | None
    strategy: object
    callbacks: list | None
    started: float
    learning_rate: float
    splits: dict
    image_size: object

    @property
    def state(self):
        """The state of the checkpoint resumed from, else None."""
        return self.checkpoint[1] if self.checkpoint else None


def compile_model(ctx, model, policy, *, num_classes, scores=None):
    """Compile ``model`` for the run, then restore a resumed run's state.

    The task's defaults: Adam at ``ctx.learning_rate`` (loss-scaled under
    ``mixed_float16``), :class:`klseg.losses.SparseKLDivergence` and the
    streaming ``scores`` (names ending in ``mean_iou`` or
    ``pixel_accuracy``; defaults to ``("mean_iou", "pixel_accuracy")``; ``()``
    for none, for batches without labels).
    Call it inside the strategy's scope.
    """
    from klseg import losses, metrics

    cfg = ctx.cfg
    ignore = cfg.ignore_value
    optimizer = runtime.make_optimizer(ctx.learning_rate, policy)

    def metric(name):
        if name.endswith("pixel_accuracy"):
            return metrics.PixelAccuracy(ignore_class=ignore, name=name)
        return metrics.MeanIoU(num_classes, ignore_class=ignore, name=name)

    model.compile(
        optimizer=optimizer,
        loss=losses.SparseKLDivergence(ignore_class=ignore),
        metrics=[
            metric(n)
            for n in (("mean_iou", "pixel_accuracy") if scores is None else scores)
        ],
        jit_compile=runtime.jit_setting(cfg),
    )
    if ctx.checkpoint:
        restore_checkpoint(ctx.checkpoint[0], model, optimizer)
    return optimizer


def _divergence_hint(cfg, learning_rate):
    hint = f"Lower --learning-rate (it was {learning_rate:g})"
    if cfg.mixed_precision != "off":
        hint += " or train without --mixed-precision"
    return hint + "."


def _after_divergence(run):
    """What a diverged run kept, and how to start it again."""
    latest = run.latest_checkpoint()
    if latest is None:
        return (
            "Then start the run again; no epoch was completed, so there is "
            "nothing to --resume."
        )
    state = latest[1]
    best = state.get("best_epoch")
    kept = (
        f"model.keras is the best of them (epoch {best})"
        if best
        else "no epoch gave a finite score, so there is no model.keras"
    )
    return (
        "Then start the run again with --overwrite. Epochs up to "
        f"{state['epoch']} are kept in {run.checkpoints}; {kept}."
    )


def fit(ctx, model, *, save_model, train_ds, steps, validation, monitor):
    """``model.fit`` with validation, checkpoints, history, logs and resume.

    ``train_ds`` is the training stream (this applies the distribution
    options). ``save_model`` is the model ``model.keras`` holds.
    ``validation`` is the validation callback (:func:`klseg.runs.callbacks.
    validation`); it runs before the checks and the writers, so the metrics
    it adds to the epoch logs are checked, then reach the history, the
    checkpoint and TensorBoard. It runs after every ``cfg.val_every``-th
    epoch and after the last (:class:`klseg.runs.callbacks.ValidateEvery`);
    the other epochs write a checkpoint and a history row with empty
    validation cells, and never replace ``model.keras``. The caller's
    callbacks (``ctx.callbacks``) run after klseg's own.

    Returns:
        The state of the last checkpoint (``None`` when no epoch ran).

    Raises:
        klseg.errors.InvalidArgumentError: ``monitor`` is not a column of
            the run's history (before the first epoch).
        klseg.errors.RunError: a resumed run's history cannot be made that
            of its checkpoint (see :func:`klseg.runs.checkpoint.
            settle_history`).
        klseg.errors.TrainingDiverged: the loss, a validation loss or a
            weight became NaN or infinite; the message names the epoch and
            the step, what to try, and what the run kept.
    """
    cfg, run, state = ctx.cfg, ctx.run, ctx.state
    train_ds = runtime.distribute_options(train_ds)
    initial_epoch = int(state["epoch"]) if state else 0
    cb.check_monitor(monitor, model, validation)
    _prepare_history(ctx, monitor, steps)
    validation = cb.ValidateEvery(
        validation, every=cfg.val_every, epochs=cfg.epochs, verbose=cfg.verbose
    )
    if initial_epoch >= cfg.epochs:
        say(
            cfg.verbose,
            f"{run.path}: all {cfg.epochs} epochs are done; nothing to train "
            "(raise --epochs to train longer).",
        )
        return state
    _say_start(cfg, initial_epoch)
    checkpoints = cb.RunCheckpoint(
        run,
        monitor,
        save_model=save_model,
        state=state,
        seed=cfg.seed,
        steps=steps,
        optional=validation.keys,
    )
    all_callbacks = [
        cb.StopOnInterrupt(),
        validation,
        cb.StopOnNonFinite(_divergence_hint(cfg, ctx.learning_rate), steps=steps),
        cb.HistoryFile(run.history, keys=validation.keys),
        checkpoints,
        cb.EpochScalars(run.logs),
        *list(ctx.callbacks or []),
    ]
    if cfg.strategy == "multi-worker":
        runtime.multi_worker_fit_fixes(model, train_ds)
    elif cfg.strategy == "mirrored" or not runtime.is_tensorflow():
        runtime.build_before_fit(model, train_ds)
    try:
        with runtime.interrupts_at_batch_ends():
            model.fit(
                train_ds,
                epochs=cfg.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                callbacks=all_callbacks,
                shuffle=False,  # the datasets shuffle themselves (run's seed)
                verbose=_fit_verbosity(cfg.verbose),
            )
    except errors.TrainingDiverged as e:
        raise errors.TrainingDiverged(
            f"{e} {_after_divergence(run)}", epoch=e.epoch, step=e.step
        ) from None
    except Exception as e:
        lost = runtime.lost_peers(e) if cfg.strategy == "multi-worker" else None
        if lost is None:
            raise
        raise errors.RunError(
            f"{lost} of this multi-worker run stopped during training "
            "(TensorFlow found it unresponsive). The checkpoints the chief "
            f"wrote in {cfg.output} are kept: start every worker again with "
            "--resume."
        ) from None
    # The state the run just wrote: no need to read back (and checksum) the
    # checkpoint files.
    return checkpoints.state


def _prepare_history(ctx, monitor, steps):
    """A resumed run keeps its monitor and the history rows it checkpointed
    (and says when its steps per epoch changed); a new run starts a new
    history."""
    cfg, run, state = ctx.cfg, ctx.run, ctx.state
    if state is None:
        if run.history.exists():
            run.history.unlink()
        return
    if state.get("monitor") and state["monitor"] != monitor:
        raise errors.RunError(
            f"the run in {run.path} picked its best model by "
            f"{state['monitor']!r}, not {monitor!r}; resume with the same "
            "--monitor."
        )
    rebuilt = settle_history(run.history, state, ctx.checkpoint[0].name)
    # A multi-worker run's other workers keep their history in a private
    # folder that starts empty: nothing worth saying there.
    if rebuilt and run.path.name.startswith(_WORKER_FOLDER):
        rebuilt = None
    if rebuilt:
        say(cfg.verbose, rebuilt)
    saved_steps = state.get("steps_per_epoch")
    if saved_steps is not None and saved_steps != steps:
        say(
            cfg.verbose,
            f"Note: the run in {run.path} had {saved_steps} steps per epoch, "
            f"now {steps}: its training data changed, so the resumed run "
            "continues on other batches than the interrupted one would have.",
        )


def _say_start(cfg, initial_epoch):
    if initial_epoch:
        # The run folder (on a multi-worker run's other workers too).
        output = Path(cfg.output)
        say(cfg.verbose, f"Resuming {output} after epoch {initial_epoch}.")
    if cfg.val_every > 1:
        say(
            cfg.verbose,
            f"Validating every {cfg.val_every} epochs and after the last one "
            f"(epoch {cfg.epochs}).",
        )


def _fit_verbosity(verbose):
    """A progress bar on a terminal; one line per epoch in a log file."""
    import sys

    if not verbose:
        return 0
    return 1 if sys.stdout.isatty() else 2


def best_model(run, fallback):
    """The model ``model.keras`` holds, else ``fallback`` (no epoch saved one)."""
    return inputs.load_model(run.model) if run.model.exists() else fallback


def run_summary(ctx, final_state, monitor):
    """The ``metrics.json`` entries every training run ends with."""
    return {
        "best_epoch": (final_state or {}).get("best_epoch"),
        "epochs": ctx.cfg.epochs,
        "monitor": monitor,
        "seconds": round(time.time() - ctx.started, 1),
    }


def finish(run, cfg, metrics):
    """Write ``metrics.json`` and return the run's :class:`RunResult`."""
    write_json(run.metrics, metrics)
    return RunResult(
        output=run.path,
        model_path=run.model,
        metrics=metrics,
        best_epoch=metrics["best_epoch"],
        epochs=cfg.epochs,
    )
