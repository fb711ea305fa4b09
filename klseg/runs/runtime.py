"""How a run runs: strategy, precision, optimizer, XLA, and interrupts.

- :func:`make_strategy`: one device, ``MirroredStrategy`` or
  ``MultiWorkerMirroredStrategy`` (from ``TF_CONFIG``);
- :func:`precision`: the Keras dtype policy for the duration of a run;
- :func:`make_optimizer`: Adam, with loss scaling under float16;
- :func:`multi_worker_fit_fixes`: the contained workaround that lets Keras 3
  ``fit`` run under ``MultiWorkerMirroredStrategy``;
- :func:`disk_full`, :func:`out_of_memory`: what a failure from below
  (TensorFlow, the system) means, for klseg's own errors;
- :func:`interrupt_handler`: Ctrl-C that is never lost inside library code;
  :func:`uninterrupted` holds it back while a checkpoint is written.

TensorFlow and Keras are imported inside the functions.
"""

import contextlib
import errno
import json
import math
import os
import signal
import sys
import threading
import time
import warnings

from klseg import errors
from klseg.runs.checks import check_choice, fail
from klseg.runs.configs import STRATEGIES

__all__ = [
    "distribute_options",
    "interrupt_handler",
    "interrupts_at_batch_ends",
    "is_tensorflow",
    "jit_setting",
    "make_optimizer",
    "make_strategy",
    "build_before_fit",
    "disk_full",
    "first_line",
    "gather_from_workers",
    "lost_peers",
    "out_of_memory",
    "multi_worker_fit_fixes",
    "precision",
    "raise_if_interrupted",
    "uninterrupted",
    "wait_for_peers",
    "was_interrupted",
    "worker_timeout",
    "WORKER_TIMEOUT",
]


#: Seconds a multi-worker run waits for its peers before it gives up; the
#: environment variable ``KLSEG_WORKER_TIMEOUT`` (seconds) overrides it.
WORKER_TIMEOUT = 300.0

_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


def _cluster_spec():
    """``(cluster, task_type, index)`` from ``TF_CONFIG``, checked: JSON with
    a ``cluster`` of ``chief``/``worker`` lists of ``host:port`` addresses
    and a ``task`` that names one of them."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        fail(
            "strategy='multi-worker' needs the TF_CONFIG environment variable "
            f"(e.g. {_TF_CONFIG_EXAMPLE}). Received: TF_CONFIG unset"
        )

    def bad(what):
        fail(
            f"TF_CONFIG {what} (e.g. {_TF_CONFIG_EXAMPLE}). Received: TF_CONFIG={raw!r}"
        )

    try:
        spec = json.loads(raw)
    except ValueError as e:
        bad(f"is not valid JSON ({e})")
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        bad('has no "cluster" (an object of "worker" and "chief" address lists)')
    cluster, task = spec["cluster"], spec.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        bad('has no "task" with a "type" and an "index"')
    for job, addresses in cluster.items():
        if job not in ("chief", "worker") or not isinstance(addresses, list):
            bad(
                f'cluster has {job!r}: klseg runs "chief" and "worker" tasks, '
                "each a list of host:port addresses"
            )
        for address in addresses:
            if _address(address) is None:
                bad(f"cluster {job} address {address!r} is not host:port")
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        bad(f"task type {task_type!r} is not in the cluster ({', '.join(cluster)})")
    count = len(cluster[task_type])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        bad(
            f"task index {index!r} is past the {task_type} list ({count} "
            f"{task_type}{'s' if count != 1 else ''}: indices 0..{count - 1})"
        )
    if len(cluster.get("chief", [])) > 1:
        bad("cluster has more than one chief")
    return cluster, task_type, index


def _address(text):
    """``(host, port)`` of a ``host:port`` string, or None."""
    if not isinstance(text, str):
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def make_strategy(name):
    """``(strategy, is_chief)`` for ``"default"``, ``"mirrored"`` or
    ``"multi-worker"`` (MultiWorkerMirroredStrategy from ``TF_CONFIG``).

    On the JAX backend ``"mirrored"`` is ``keras.distribution.DataParallel``
    over the local devices (the same meaning: every local device, the
    weights mirrored, the batch split), and ``"multi-worker"`` is refused.

    The chief is the ``chief`` task, or worker 0 when the cluster names no
    chief. A multi-worker run first waits for its peers
    (:func:`wait_for_peers`), so that a peer that never comes ends it with
    a message instead of a silent wait that ignores signals.

    Raises:
        klseg.errors.InvalidArgumentError: ``TF_CONFIG`` is unset or invalid
            (JSON, cluster, task, index past its list), or
            ``KLSEG_WORKER_TIMEOUT`` is not a positive number.
        klseg.errors.RunError: a peer did not answer within the timeout, or
            this worker's port is in use.
    """
    global _multi_worker
    check_choice("strategy", name, STRATEGIES)
    import keras

    if keras.backend.backend() == "jax" and name != "default":
        return _jax_data_parallel(name), True
    if name == "multi-worker":
        cluster, task_type, index = _cluster_spec()
        timeout = worker_timeout()
        if _multi_worker is not None:
            return _joined_cluster(cluster, task_type, index)
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy(), True
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy(), True
        # No GPU: every logical CPU device is a replica (one, unless the
        # process split the CPU with tf.config.set_logical_device_configuration).
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus), True
    wait_for_peers(cluster, task_type, index, timeout)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    is_chief = task_type == "chief" or (
        task_type == "worker" and index == 0 and "chief" not in cluster
    )
    _multi_worker = ((cluster, task_type, index), (strategy, is_chief))
    return strategy, is_chief


#: ``((cluster, task type, index), (strategy, is_chief))`` of the cluster
#: this process joined: TensorFlow's server holds this task's port for the
#: life of the process, so later multi-worker jobs of the process (a
#: Python user training then fine-tuning) run in the same cluster.
_multi_worker = None


def _joined_cluster(cluster, task_type, index):
    """The strategy of the cluster this process joined, if ``TF_CONFIG``
    still names it; else a clear error (a process joins one cluster)."""
    joined, result = _multi_worker
    if joined != (cluster, task_type, index):
        fail(
            "this process already joined a multi-worker cluster as "
            f"{joined[1]} {joined[2]} of {json.dumps(joined[0])}; TensorFlow "
            "serves one cluster per process, so run a job on another cluster "
            "in a new process. Received: TF_CONFIG="
            f"{os.environ.get('TF_CONFIG')!r}"
        )
    return result


def gather_from_workers(strategy, values):
    """Every replica's ``values`` (a few small integers) on every worker of
    a multi-worker run, as a list of tuples (one per replica); a collective
    step, so each worker must call it at the same point."""
    import tensorflow as tf

    gather = getattr(strategy, "_klseg_gather", None)
    if gather is None:

        @tf.function
        def gather(local):
            return strategy.gather(strategy.run(tf.identity, args=(local,)), axis=0)

        strategy._klseg_gather = gather  # one trace per cluster
    gathered = gather(tf.constant([list(values)], tf.float32))
    return [tuple(int(v) for v in row) for row in gathered.numpy().tolist()]


def is_tensorflow():
    """Whether Keras runs on the TensorFlow backend."""
    import keras

    return keras.backend.backend() == "tensorflow"


class _JaxDataParallel:
    """The strategy object of a JAX run with ``--strategy mirrored``.

    ``keras.distribution.DataParallel`` over every local JAX device, set for
    the process: each step computes on the global batch, sharded along the
    batch axis, with the weights replicated. The losses and their gradients
    are those of the whole batch (no per-replica shares to sum), and
    BatchNorm statistics are the global batch's (synchronised). ``scope``
    is a no-op: the distribution is already set.
    """

    def __init__(self, distribution):
        self.distribution = distribution
        self.num_replicas_in_sync = len(distribution.device_mesh.devices.flat)

    def scope(self):
        return contextlib.nullcontext()


def _jax_data_parallel(name):
    """``mirrored`` on the JAX backend (see :class:`_JaxDataParallel`)."""
    if name == "multi-worker":
        fail(
            "strategy='multi-worker' is TensorFlow's MultiWorkerMirroredStrategy; "
            "on the JAX backend use strategy='mirrored' (keras.distribution "
            "DataParallel over this machine's devices), or run with "
            "KERAS_BACKEND=tensorflow. Received: strategy='multi-worker'"
        )
    import jax
    import keras

    distribution = keras.distribution.DataParallel(devices=jax.devices())
    keras.distribution.set_distribution(distribution)
    return _JaxDataParallel(distribution)


def worker_timeout():
    """Seconds to wait for multi-worker peers: ``KLSEG_WORKER_TIMEOUT``, else
    :data:`WORKER_TIMEOUT`."""
    raw = os.environ.get("KLSEG_WORKER_TIMEOUT", "").strip()
    if not raw:
        return WORKER_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        fail(
            "KLSEG_WORKER_TIMEOUT must be a positive number of seconds. "
            f"Received: KLSEG_WORKER_TIMEOUT={raw!r}"
        )
    return value


def wait_for_peers(cluster, task_type, index, timeout=WORKER_TIMEOUT):
    """Wait until every other task of ``cluster`` accepts TCP connections.

    TensorFlow's own wait for the workers (the collective set-up of
    ``MultiWorkerMirroredStrategy``) blocks in C++ without a deadline, says
    nothing and holds back SIGINT and SIGTERM. This wait runs first, in
    Python: it says which tasks it waits for and on which addresses,
    listens on this task's own port meanwhile (so that the peers, waiting
    the same way, see it), and gives up after ``timeout`` seconds. In the
    main thread SIGTERM then exits 143 at once (SIGINT raises
    ``KeyboardInterrupt``, 130 on the command line).

    Raises:
        klseg.errors.RunError: a peer did not answer in time (naming it and
            its address), or this task's port is taken.
    """
    me = cluster[task_type][index]
    peers = {
        f"{job} {i}": address
        for job, addresses in cluster.items()
        for i, address in enumerate(addresses)
        if (job, i) != (task_type, index)
    }
    if not peers:
        return
    waiting = ", ".join(f"{name} at {address}" for name, address in peers.items())
    print(
        f"Waiting up to {timeout:g} s for {waiting} (this is {task_type} {index} "
        f"at {me}; KLSEG_WORKER_TIMEOUT sets the wait).",
        file=sys.stderr,
        flush=True,
    )
    with _listening(me), _terminate_on_sigterm("waiting for the other workers"):
        deadline = time.monotonic() + timeout
        while peers:
            for name, address in list(peers.items()):
                left = deadline - time.monotonic()
                if _answers(address, max(0.05, min(1.0, left))):
                    del peers[name]
            if not peers:
                break
            if time.monotonic() >= deadline:
                missing = ", ".join(f"{n} at {a}" for n, a in peers.items())
                raise errors.RunError(
                    f"gave up after {timeout:g} s waiting for {missing} "
                    "(TF_CONFIG): start the same command there with its own "
                    "TF_CONFIG task, check the address and the firewall, or "
                    "wait longer with KLSEG_WORKER_TIMEOUT=SECONDS."
                )
            time.sleep(0.2)


def _answers(address, timeout):
    import socket

    host, port = _address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _listening(address):
    """Accept connections on ``address``'s port (all interfaces, as
    TensorFlow's server does) for the duration of the block."""
    import socket

    _, port = _address(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", port))
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise errors.RunError(
            f"cannot listen on port {port}, this task's address {address} in "
            f"TF_CONFIG ({e.strerror or e}): is another process using it?"
        ) from None
    try:
        yield
    finally:
        sock.close()


@contextlib.contextmanager
def _terminate_on_sigterm(what):
    """In the main thread, SIGTERM exits 143 at once (one line on stderr)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        sys.stderr.write(f"\nTerminated while {what}.\n")
        sys.stderr.flush()
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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

    Keras 3 ``fit`` builds the model and its metrics from a batch it takes
    from the training data: on TensorFlow under a distribution strategy
    (``_maybe_symbolic_build``), on JAX always (``_symbolic_build``). On
    TensorFlow that batch is never trained on: with a repeated dataset and
    ``steps_per_epoch`` every later step sees the next batch, so a mirrored
    run trained on other batches than a one-device run (measured: weights
    0.05 apart after 3 steps, identical losses at identical weights). On JAX
    the batch comes from an iterator that is then dropped while its
    background threads still read ahead; the seeds klseg's streams draw
    for each new pass over the data (``rerandomize_each_iteration``) are
    then taken by whichever thread comes first, and the run trained on other
    augmentations from run to run (measured: 3 of 16 runs of one config
    differed). Building from the spec reads nothing.
    """
    if is_tensorflow():
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=dataset.element_spec)
        model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    else:
        # JAX's fit skips its own build (and the batch it takes) once
        # every part is built. JAX traces with a known batch size (with an
        # unknown one, slicing the batch gave size 0).
        import tensorflow as tf

        def one_example(spec):
            if spec.shape.rank and spec.shape[0] is None:
                return tf.TensorSpec([1, *spec.shape[1:]], spec.dtype)
            return spec

        model._symbolic_build(
            data_batch=tf.nest.map_structure(one_example, dataset.element_spec)
        )


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
# Failures from below: a full disk, no memory
# --------------------------------------------------------------------------


def disk_full(error):
    """Whether ``error`` says the disk is full: ``OSError`` ENOSPC, or
    TensorFlow's ``ResourceExhaustedError`` saying "No space left on
    device" (SaveV2 on a full disk)."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    text = str(error).lower()
    return _is_resource_exhausted(error) and (
        "no space left" in text or "enospc" in text
    )


def out_of_memory(error):
    """Whether ``error`` is running out of memory: ``MemoryError``, or
    TensorFlow's ``ResourceExhaustedError`` other than a full disk (OOM
    when allocating a tensor)."""
    return isinstance(error, MemoryError) or (
        _is_resource_exhausted(error) and not disk_full(error)
    )


def _is_resource_exhausted(error):
    return _error_named(error, "ResourceExhaustedError")


def _error_named(error, *names):
    """Whether ``error``'s class or a base class has one of ``names`` (by
    name, so that this needs no TensorFlow import)."""
    return any(cls.__name__ in names for cls in type(error).__mro__)


def lost_peers(error):
    """The tasks a multi-worker step lost, as ``"worker 1"`` (or ``"a
    worker"`` when the message names none), if ``error`` is TensorFlow
    aborting the step's collectives because a peer stopped; else None."""
    import re

    text = str(error)
    if not _error_named(error, "UnavailableError", "AbortedError", "CancelledError"):
        return None
    if "unhealthy" not in text and "Collective ops is aborted" not in text:
        return None
    tasks = sorted(set(re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text)))
    return " and ".join(f"{job} {i}" for job, i in tasks) or "a worker"


def first_line(error):
    """The first line of an error's message (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------
# Interrupts
# --------------------------------------------------------------------------

_interrupted = threading.Event()
_held = 0  # depth of uninterrupted() blocks
_at_batch_ends = 0  # depth of interrupts_at_batch_ends() blocks


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


@contextlib.contextmanager
def interrupts_at_batch_ends():
    """Inside the block a Ctrl-C only sets the flag; the training loop's
    :class:`klseg.runs.callbacks.StopOnInterrupt` raises it at the next
    batch or epoch end.

    ``model.fit`` runs in such a block: a ``KeyboardInterrupt`` raised at an
    arbitrary point of TensorFlow's tracing, compilation or input pipeline
    can leave native state half torn down (a rare segmentation fault on the
    way out was seen under load), while one raised from a callback leaves
    through Keras's ordinary error path. The cost is that the first Ctrl-C
    waits for the running step (the first one includes its compilation). A
    second Ctrl-C still stops the process at once.
    """
    global _at_batch_ends
    _at_batch_ends += 1
    try:
        yield
    finally:
        _at_batch_ends -= 1
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
    and the block still ends with ``KeyboardInterrupt``, also when the
    Ctrl-C surfaced as another exception (an interrupted import can). Inside
    :func:`uninterrupted` the exception waits for the end of that block,
    inside :func:`interrupts_at_batch_ends` for the next batch end. A
    second Ctrl-C stops the process at once with status 130. The flag ends
    with the block: a later run in the same process (a second command in
    one Python session) starts uninterrupted.
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
        if not _held and not _at_batch_ends:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _ignore_lost_interrupts
    try:
        yield
        raise_if_interrupted()
    except Exception:
        if _interrupted.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = _previous_hook
        _interrupted.clear()
