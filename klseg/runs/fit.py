"""The fit sequence shared by ``train`` and ``finetune``.

:func:`in_run_folder` opens the run folder (new, reused or resumed, by the
policy of :mod:`klseg.runs.folder`) and runs the job in it.
:func:`fit` runs ``model.fit`` with klseg's callbacks in their order: the
interrupt check, validation, the non-finite-loss stop, the history file,
checkpoints and the best model, TensorBoard scalars, then the caller's. An
epoch that diverges or is interrupted writes none of the files after it; the
history row comes before the checkpoint so that a resumed run never misses
the row of a checkpointed epoch (it drops rows past the checkpoint).
"""

import shutil
import tempfile

from klseg import errors, progress
from klseg.files import write_json
from klseg.runs import callbacks as cb
from klseg.runs import runtime
from klseg.runs.checkpoint import truncate_history
from klseg.runs.configs import RESUMABLE_CHANGES
from klseg.runs.folder import RunFolder, open_run
from klseg.runs.results import RunResult

__all__ = [
    "curves_section",
    "examples_drawn",
    "finish",
    "fit",
    "in_run_folder",
    "say",
]


def say(verbose, message):
    if verbose:
        print(message, flush=True)


def in_run_folder(cfg, job, *, is_chief=True):
    """Run ``job(run, checkpoint)`` in the prepared run folder.

    Workers of a multi-worker run other than the chief write to a private
    temporary folder that is removed at the end: the chief alone writes
    ``cfg.output``.
    """
    if not is_chief:
        run = RunFolder(tempfile.mkdtemp(prefix="klseg-worker-"))
        try:
            return job(run, None)
        finally:
            shutil.rmtree(run.path, ignore_errors=True)
    run, checkpoint = open_run(
        cfg, ignore=RESUMABLE_CHANGES, say=lambda message: say(cfg.verbose, message)
    )
    # Progress of the long steps inside (scores, stored predictions) follows
    # the run's verbosity.
    with progress.verbosity(cfg.verbose):
        return job(run, checkpoint)


def examples_drawn(state, steps, batch_size):
    """Training examples the checkpointed epochs took from their stream.

    A resumed run skips them, so that its batches are those the
    uninterrupted run would have drawn. The count uses the steps per epoch
    the checkpoint records (the steps those epochs ran), else ``steps``.
    """
    if not state:
        return 0
    done = int(state.get("steps_per_epoch") or steps)
    return int(state["epoch"]) * done * int(batch_size)


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


def fit(
    *,
    run,
    checkpoint,
    model,
    save_model,
    train_ds,
    steps,
    validation,
    cfg,
    monitor,
    callbacks,
    learning_rate,
):
    """``model.fit`` with validation, checkpoints, history, logs and resume.

    ``validation`` is the validation callback (:func:`klseg.runs.callbacks.
    validation`); it runs before the checks and the writers, so the metrics
    it adds to the epoch logs are checked, then reach the history, the
    checkpoint and TensorBoard. It runs after every ``cfg.val_every``-th
    epoch and after the last (:class:`klseg.runs.callbacks.ValidateEvery`);
    the other epochs write a checkpoint and a history row with empty
    validation cells, and never replace ``model.keras``. ``callbacks`` run
    after klseg's own.

    Returns:
        The state of the last checkpoint (``None`` when no epoch ran).

    Raises:
        klseg.errors.TrainingDiverged: the loss, a validation loss or a
            weight became NaN or infinite; the message names the epoch and
            the step, what to try, and what the run kept.
    """
    state = checkpoint[1] if checkpoint else None
    initial_epoch = int(state["epoch"]) if state else 0
    if state is not None:
        if state.get("monitor") and state["monitor"] != monitor:
            raise errors.RunError(
                f"the run in {run.path} picked its best model by "
                f"{state['monitor']!r}, not {monitor!r}; resume with the same "
                "--monitor."
            )
        truncate_history(run.history, initial_epoch)
        saved_steps = state.get("steps_per_epoch")
        if saved_steps is not None and saved_steps != steps:
            say(
                cfg.verbose,
                f"Note: the run in {run.path} had {saved_steps} steps per epoch, "
                f"now {steps}: its training data changed, so the resumed run "
                "continues on other batches than the interrupted one would have.",
            )
    elif run.history.exists():
        run.history.unlink()
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
    if initial_epoch:
        say(cfg.verbose, f"Resuming {run.path} after epoch {initial_epoch}.")
    if cfg.val_every > 1:
        say(
            cfg.verbose,
            f"Validating every {cfg.val_every} epochs and after the last one "
            f"(epoch {cfg.epochs}).",
        )
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
        cb.StopOnNonFinite(_divergence_hint(cfg, learning_rate), steps=steps),
        cb.HistoryFile(run.history, keys=validation.keys),
        checkpoints,
        cb.EpochScalars(run.logs),
        *list(callbacks or []),
    ]
    if cfg.strategy == "multi-worker":
        runtime.multi_worker_fit_fixes(model, train_ds)
    elif cfg.strategy == "mirrored":
        runtime.build_before_fit(model, train_ds)
    try:
        model.fit(
            train_ds,
            epochs=cfg.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=all_callbacks,
            shuffle=False,  # the datasets shuffle themselves, with the run's seed
            verbose=_fit_verbosity(cfg.verbose),
        )
    except errors.TrainingDiverged as e:
        raise errors.TrainingDiverged(
            f"{e} {_after_divergence(run)}", epoch=e.epoch, step=e.step
        ) from None
    # The state the run just wrote: no need to read back (and checksum) the
    # checkpoint files.
    return checkpoints.state


def _fit_verbosity(verbose):
    """A progress bar on a terminal; one line per epoch in a log file."""
    import sys

    if not verbose:
        return 0
    return 1 if sys.stdout.isatty() else 2


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


def curves_section(run):
    """The report section with the history's training curves, or None."""
    from klseg import report

    rows = report.read_history(run.history) if run.history.is_file() else None
    if not rows:
        return None
    return (
        "Training curves",
        report.plot_history(rows, run.plots / "training_curves.png"),
    )
