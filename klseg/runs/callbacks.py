"""Keras callbacks of the training jobs.

Validation is ``klseg.finetune.DomainEvaluation`` (the one validation
callback; see :func:`validation`); it runs before :class:`StopOnNonFinite`
and :class:`RunCheckpoint`, so the scores it adds to the epoch logs are
checked, then reach the history file, the checkpoint and
:class:`EpochScalars`. :class:`StopOnNonFinite` and :class:`StopOnInterrupt`
raise from the batch in which the problem appears, and
:class:`StopOnNonFinite` again at the end of an epoch that left the model
broken, before any later callback can save a checkpoint or a "best" model
from it.
"""

import csv
import math
import time
from pathlib import Path

import keras

from klseg import errors, progress
from klseg.files import save_model
from klseg.runs import runtime
from klseg.runs.checkpoint import history_record, save_checkpoint, to_numpy
from klseg.runs.scoring import inference_function

__all__ = [
    "EpochScalars",
    "HistoryFile",
    "RunCheckpoint",
    "StopOnInterrupt",
    "StopOnNonFinite",
    "ValidateEvery",
    "check_monitor",
    "lower_is_better",
    "training_keys",
    "validation",
    "validation_keys",
]


def lower_is_better(monitor):
    """Losses and the forgetting improve downwards; everything else upwards."""
    return monitor.endswith("loss") or monitor.endswith("forgetting")


class RunCheckpoint(keras.callbacks.Callback):
    """Best model by ``monitor`` plus a resumable checkpoint every epoch.

    ``model.keras`` is replaced only by an epoch whose monitored value is
    finite and better than every earlier one. A monitor among ``optional``
    (the validation scores, absent from the logs of an epoch that was not
    validated) leaves ``model.keras`` alone in the epochs without it; the
    checkpoint is written all the same.
    """

    def __init__(
        self, run, monitor, *, save_model, state, seed, steps=None, optional=()
    ):
        super().__init__()
        self.steps = steps
        self.optional = frozenset(optional)
        self.run = run
        self.monitor = monitor
        self.save_model = save_model
        self.best = state.get("best") if state else None
        self.best_epoch = state.get("best_epoch") if state else None
        self.seed = seed
        self.state = state  # of the last checkpoint written (or restored)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs and self.monitor not in self.optional:
            names = ", ".join(sorted(set(logs) | self.optional)) or "none"
            raise errors.RunError(
                f"monitor {self.monitor!r} is not a history column. Columns: {names}."
            )
        value = float(logs.get(self.monitor, math.nan))
        if lower_is_better(self.monitor):
            better = self.best is None or value < self.best
        else:
            better = self.best is None or value > self.best
        # A Ctrl-C waits until both files are written: model.keras never
        # holds an epoch that the checkpoint does not record.
        with runtime.uninterrupted():
            if math.isfinite(value) and better:
                self.best, self.best_epoch = value, epoch + 1
                save_model(self.save_model, self.run.model)
            state = {
                "epoch": epoch + 1,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "monitor": self.monitor,
                "seed": self.seed,
                "steps_per_epoch": self.steps,
                "optimizer_iterations": int(to_numpy(self.model.optimizer.iterations)),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                # Written after this epoch's row (HistoryFile runs first): a
                # resumed run rebuilds a damaged history.csv from it.
                "history": history_record(self.run.history),
            }
            save_checkpoint(self.run, self.model, self.model.optimizer, state)
            self.state = state


class ValidateEvery(keras.callbacks.Callback):
    """Run the validation callback after every ``every``-th epoch and the last.

    The epochs in between have no validation scores in their logs (the
    history file leaves those cells empty; nothing treats them as NaN).

    Args:
        validation: the validation callback (see :func:`validation`).
        every: validate every ``every`` epochs (epochs ``every``, ``2 *
            every``, ... counted from 1, as in the history). Defaults to 1.
        epochs: the run's last epoch, always validated. Defaults to None.
        verbose: 0 shows no progress of the validation (see
            :mod:`klseg.progress`: a bar that clears itself on a terminal,
            a few lines elsewhere if it is slow). Defaults to 1.
    """

    def __init__(self, validation, every=1, epochs=None, verbose=1):
        super().__init__()
        self.validation = validation
        self.every = int(every)
        self.epochs = epochs
        datasets = getattr(validation, "datasets", None)
        if verbose and isinstance(datasets, dict):
            validation.datasets = {
                domain: data
                if isinstance(data, (tuple, list))
                else progress.iterate(
                    data,
                    label=f"Validating{' on ' + domain if domain else ''}",
                    verbose=verbose,
                    transient=True,
                )
                for domain, data in datasets.items()
            }

    @property
    def keys(self):
        """The log entries a validated epoch gets, known before it runs."""
        return validation_keys(self.validation)

    def due(self, epoch):
        """Whether epoch ``epoch`` (0-based, as Keras counts) is validated."""
        number = epoch + 1
        return number % self.every == 0 or number == self.epochs

    def set_model(self, model):
        super().set_model(model)
        self.validation.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.validation.set_params(params)

    def on_train_begin(self, logs=None):
        self.validation.on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.due(epoch):
            self.validation.on_epoch_end(epoch, logs)


def validation_keys(callback):
    """``val_...`` log entries a ``DomainEvaluation`` adds (sorted)."""
    datasets = getattr(callback, "datasets", None)
    if datasets is None:
        return ()
    keys = {
        f"val_{domain}_{score}" if domain else f"val_{score}"
        for domain in datasets
        for score in callback.scores
    }
    for domain in datasets:
        # "source" gives val_forgetting; a model's prefixed copy of it
        # ("ema_source", see klseg.runs.mean_teacher) gives val_ema_forgetting.
        if domain == "source" or domain.endswith("_source"):
            keys.add(f"val_{domain[: -len('source')]}forgetting")
    return tuple(sorted(keys))


def training_keys(model):
    """The log entries a training epoch of the compiled ``model`` gets, known
    before it runs: ``loss``, the model's own trackers (``task_loss``,
    ``kl_loss``, ...) and the compiled metrics; None when they cannot be
    told (a compile-metrics container of another Keras version)."""
    keys = {"loss"}
    for metric in model.metrics:
        if type(metric).__name__ != "CompileMetrics":
            if not metric.name.startswith("_"):  # hidden from the logs
                keys.add(metric.name)
            continue
        compiled = getattr(metric, "_user_metrics", None)
        weighted = getattr(metric, "_user_weighted_metrics", None)
        if compiled is None and weighted is None:
            return None
        for item in keras.tree.flatten([compiled or [], weighted or []]):
            name = getattr(item, "name", item)
            if not isinstance(name, str):
                return None
            keys.add(name)
    return keys


def check_monitor(monitor, model, validation):
    """Refuse a ``monitor`` that is not a column of the run's history,
    before the first epoch (the columns are the training logs of the
    compiled ``model`` and the entries of the ``validation`` callback).

    Raises:
        klseg.errors.InvalidArgumentError: naming ``--monitor``, the value
            and the valid columns.
    """
    trained = training_keys(model)
    if trained is None:
        return  # RunCheckpoint checks it after the first epoch
    columns = sorted(trained | set(validation_keys(validation)))
    if monitor not in columns:
        raise errors.InvalidArgumentError(
            f"--monitor names the history column that picks the best epoch; "
            f"{monitor!r} is not one of this run's columns: "
            f"{', '.join(columns)}. Received: monitor={monitor!r}"
        )


class HistoryFile(keras.callbacks.Callback):
    """One row per epoch in ``history.csv``, with fixed columns.

    The columns are ``epoch`` (0-based, as Keras counts) then the sorted
    names of the first epoch's logs together with ``keys`` (the validation
    scores, which an epoch that is not validated lacks). A missing value is
    an empty cell; a NaN score is written ``nan``. A resumed run appends to
    the file under its existing header.

    Args:
        path: the CSV file.
        keys: columns to have even when the first epoch lacks them.
    """

    def __init__(self, path, keys=()):
        super().__init__()
        self.path = Path(path)
        self.keys = tuple(keys)
        self.columns = None

    def on_train_begin(self, logs=None):
        self.columns = None
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            self.columns = header or None

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        new = self.columns is None
        if new:
            self.columns = ["epoch", *sorted(set(logs) | set(self.keys))]
        row = [epoch] + [_cell(logs.get(key, "")) for key in self.columns[1:]]
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.columns)
            writer.writerow(row)


def _cell(value):
    if isinstance(value, str):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class StopOnNonFinite(keras.callbacks.Callback):
    """Stop at the first batch whose loss is NaN or infinite.

    Raises ``klseg.errors.TrainingDiverged`` naming the epoch and the step,
    so the epoch is never completed: no checkpoint, history row or "best"
    model comes from it, and the last good checkpoint stays in place.

    Checked after every batch: each log entry whose name ends in ``loss``.
    Checked at the end of each epoch, so that it must run after the
    validation callback and before the checkpoint: the same entries, the
    validation losses, and the model's weights. The last step's update can
    leave NaN weights behind a finite loss, and float16 inference can
    overflow where training did not; either makes the epoch bad. A
    validation loss is NaN without a fault when its data has no labelled
    pixel; that is recognised by its pixel accuracy being NaN too.

    Args:
        hint: sentence appended to the message (what to try).
        steps: steps per epoch, for the message. Defaults to None.
    """

    def __init__(self, hint="", steps=None):
        super().__init__()
        self.hint = hint
        self.steps = steps
        self.epoch = 0
        self.step = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.step = 0

    def _diverged(self, what, step):
        of = f" of {self.steps}" if self.steps else ""
        return errors.TrainingDiverged(
            f"training diverged: {what} at epoch {self.epoch + 1}, step "
            f"{step}{of}. {self.hint}".rstrip(),
            epoch=self.epoch + 1,
            step=step,
        )

    def on_train_batch_end(self, batch, logs=None):
        self.step = batch + 1
        for key, value in _losses(logs):
            if not math.isfinite(value):
                raise self._diverged(f"{key} became {value}", batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        step = self.step or self.steps
        for key, value in _losses(logs):
            if math.isfinite(value):
                continue
            if key.startswith("val_"):
                accuracy = logs.get(key[: -len("loss")] + "pixel_accuracy")
                if accuracy is not None and not math.isfinite(float(accuracy)):
                    continue  # no labelled pixel to score
            raise self._diverged(f"{key} became {value} (after the last step)", step)
        bad = _non_finite_weight(self.model)
        if bad is not None:
            raise self._diverged(
                f"the weights of {bad} are no longer finite (after the last step)",
                step,
            )


def _losses(logs):
    for key, value in (logs or {}).items():
        if not key.endswith("loss"):
            continue
        try:
            yield key, float(value)
        except (TypeError, ValueError):
            continue


def _non_finite_weight(model):
    """The path of the first floating-point weight holding NaN or inf."""
    ops = keras.ops
    for weight in model.weights:
        if "float" not in str(weight.dtype):
            continue
        if not bool(ops.all(ops.isfinite(weight.value))):
            return weight.path
    return None


class StopOnInterrupt(keras.callbacks.Callback):
    """Raise ``KeyboardInterrupt`` at the next batch after a Ctrl-C that an
    interrupt handler (:func:`klseg.runs.runtime.interrupt_handler`) caught
    but that got lost inside library code (for example a garbage-collection
    callback, where Python ignores exceptions)."""

    def on_train_batch_end(self, batch, logs=None):
        runtime.raise_if_interrupted()

    on_test_batch_end = on_predict_batch_end = on_train_batch_end

    def on_epoch_end(self, epoch, logs=None):
        runtime.raise_if_interrupted()


class EpochScalars(keras.callbacks.Callback):
    """Per-epoch TensorBoard scalars (``train/`` and ``validation/``).

    Written with ``tf.summary.write``, which needs no ``tensorboard``
    package (``pip install tensorboard`` to view the logs).
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = Path(log_dir)
        self._writers = {}

    def _writer(self, name):
        import tensorflow as tf

        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(
                str(self.log_dir / name)
            )
        return self._writers[name]

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        for key, value in (logs or {}).items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if key.startswith("val_"):
                group, tag = "validation", key[4:]
            else:
                group, tag = "train", key
            with self._writer(group).as_default():
                tf.summary.write(
                    f"epoch_{tag}",
                    tf.constant(value, tf.float32),
                    step=epoch,
                    metadata=metadata,
                )
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def validation(datasets, *, eval_model, ignore_value, baseline=None):
    """The per-epoch validation callback of a run.

    Adds ``val_{domain}_loss``, ``val_{domain}_mean_iou`` and
    ``val_{domain}_pixel_accuracy`` for each ``{domain: dataset}`` (``""``
    gives ``val_loss``, ...), computed on the whole set through the one
    evaluation path, and ``val_forgetting`` when a source-domain
    ``baseline`` mean IoU is given.
    """
    from klseg.finetune import DomainEvaluation

    return DomainEvaluation(
        datasets,
        ignore_class=ignore_value,
        scores=("loss", "mean_iou", "pixel_accuracy"),
        forward=inference_function(eval_model),
        source_baseline=baseline,
    )
