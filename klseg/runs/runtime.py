"""How a run runs: strategy, precision, optimizer, XLA, and interrupts.

- :func:`make_strategy`: one device, ``MirroredStrategy`` or
  ``MultiWorkerMirroredStrategy`` (from ``TF_CONFIG``);
- :func:`precision`: the Keras dtype policy for the duration of a run;
- :func:`make_optimizer`: Adam, with loss scaling under float16;
- :func:`multi_worker_fit_fixes`: the contained workaround that lets Keras 3
  ``fit`` run under ``MultiWorkerMirroredStrategy``;
- :func:`interrupt_handler`: Ctrl-C that is never lost inside library code;
  :func:`uninterrupted` holds it back while a checkpoint is written.

TensorFlow and Keras are imported inside the functions.
"""

import contextlib
import json
import os
import signal
import sys
import threading
import warnings

from klseg.runs.checks import check_choice, fail
from klseg.runs.configs import STRATEGIES

__all__ = [
    "distribute_options",
    "interrupt_handler",
    "jit_setting",
    "make_optimizer",
    "make_strategy",
    "build_before_fit",
    "multi_worker_fit_fixes",
    "precision",
    "raise_if_interrupted",
    "uninterrupted",
    "was_interrupted",
]


def _cluster_spec():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        fail(
            "strategy='multi-worker' needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}). Received: TF_CONFIG unset'
        )
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"TF_CONFIG is not valid ({e}). Received: TF_CONFIG={raw!r}")
    return cluster, task_type, index


def make_strategy(name):
    """``(strategy, is_chief)`` for ``"default"``, ``"mirrored"`` or
    ``"multi-worker"`` (MultiWorkerMirroredStrategy from ``TF_CONFIG``).

    The chief is the ``chief`` task, or worker 0 when the cluster names no
    chief.
    """
    import tensorflow as tf

    check_choice("strategy", name, STRATEGIES)
    if name == "default":
        return tf.distribute.get_strategy(), True
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy(), True
        # No GPU: every logical CPU device is a replica (one, unless the
        # process split the CPU with tf.config.set_logical_device_configuration).
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus), True
    cluster, task_type, index = _cluster_spec()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    is_chief = task_type == "chief" or (
        task_type == "worker" and index == 0 and "chief" not in cluster
    )
    return strategy, is_chief


@contextlib.contextmanager
def precision(mode, verbose=1):
    """Set the global Keras dtype policy for the duration of a run."""
    import keras

    if mode in (None, "off", False):
        yield None
        return
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    policy = {
        "auto": "mixed_float16" if gpu else "mixed_bfloat16",
        "float16": "mixed_float16",
        "bfloat16": "mixed_bfloat16",
    }[mode]
    if not gpu:
        warnings.warn(
            f"mixed precision ({policy}) on a CPU is slower than float32 "
            "(measured: about 1.5x for bfloat16, 6x for float16); it pays off "
            "on GPUs.",
            stacklevel=3,
        )
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield policy
    finally:
        keras.config.set_dtype_policy(previous)


def make_optimizer(learning_rate, policy):
    import keras

    optimizer = keras.optimizers.Adam(learning_rate)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def jit_setting(cfg):
    return True if cfg.jit else "auto"


def distribute_options(dataset):
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def build_before_fit(model, dataset):
    """Build ``model`` from the dataset's ``element_spec`` before ``fit``.

    Under a distribution strategy Keras 3 ``fit`` builds the model and its
    metrics from a batch it takes from the training iterator
    (``_maybe_symbolic_build``), and that batch is never trained on: with a
    repeated dataset and ``steps_per_epoch`` every later step sees the next
    batch, so a mirrored run trained on other batches than a one-device
    run (measured: weights 0.05 apart after 3 steps, identical losses at
    identical weights). Building from the spec consumes nothing.
    """
    strategy = model.distribute_strategy
    with strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


def multi_worker_fit_fixes(model, dataset):
    """Work around two failures of Keras 3 ``fit`` under MultiWorkerMirroredStrategy.

    Seen with Keras 3.15 and TensorFlow 2.21 (tensorflow/tensorflow#72388):

    1. ``fit`` builds the metrics from the first batch after averaging it
       with ``strategy.reduce``, which fails for an ``(images, masks)``
       tuple ("Attempt to convert a value (PerReplica ...) to a Tensor").
       Here the model is built from the dataset's ``element_spec``
       (:func:`build_before_fit`).
    2. Each step's logs are averaged with ``strategy.reduce("MEAN", v,
       axis=0)``, which fails for scalars ("Invalid reduction dimension 0").
       Here the train function returns the first local replica's values
       instead. The per-step values on the progress bar are then this
       worker's; the epoch's values (history, checkpoints) are read from the
       metrics at the end of the epoch, summed over every replica.
    """
    import tensorflow as tf
    from keras import tree

    strategy = model.distribute_strategy
    build_before_fit(model, dataset)

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    @tf.function(reduce_retracing=True)
    def one_step(data):
        outputs = strategy.run(model.train_step, args=(data,))
        return tree.map_structure(first, outputs)

    def train_function(iterator):
        return one_step(next(iterator))

    model.train_function = train_function


# --------------------------------------------------------------------------
# Interrupts
# --------------------------------------------------------------------------

_interrupted = threading.Event()
_held = 0  # depth of uninterrupted() blocks


def raise_if_interrupted():
    """Raise ``KeyboardInterrupt`` if a Ctrl-C was caught and not yet raised."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def was_interrupted():
    """Whether a Ctrl-C was caught inside the current interrupt handler."""
    return _interrupted.is_set()


@contextlib.contextmanager
def uninterrupted():
    """Hold back a Ctrl-C until the block is done, then raise it.

    Inside :func:`interrupt_handler`, the files an epoch end writes (the
    best model, the checkpoint) are then written completely or not at all
    by the same Ctrl-C. A second Ctrl-C still stops the process at once.
    """
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held:
        raise_if_interrupted()


def _ignore_lost_interrupts(unraisable):
    # Python prints a traceback for an exception it cannot raise, for example
    # a KeyboardInterrupt arriving inside a garbage-collection callback. The
    # interrupt is not lost (the flag is set); the traceback is noise.
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    _previous_hook(unraisable)


_previous_hook = sys.unraisablehook


@contextlib.contextmanager
def interrupt_handler():
    """Ctrl-C handling for a command that trains.

    The first Ctrl-C raises ``KeyboardInterrupt`` as usual and also sets a
    flag; where library code swallows the exception (Python ignores
    exceptions in garbage-collection callbacks), the flag makes the next
    training batch raise it (:class:`klseg.runs.callbacks.StopOnInterrupt`)
    and the block still ends with ``KeyboardInterrupt``. Inside
    :func:`uninterrupted` the exception waits for the end of that block. A
    second Ctrl-C stops the process at once with status 130.
    """
    global _previous_hook
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()

    def handle(signum, frame):
        if _interrupted.is_set():
            sys.stderr.write("\nInterrupted again: stopping now.\n")
            sys.stderr.flush()
            os._exit(130)
        _interrupted.set()
        if not _held:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _ignore_lost_interrupts
    try:
        yield
        raise_if_interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = _previous_hook
