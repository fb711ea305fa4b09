"""Forward+backward cost of klseg's KL divergence against the alternatives.

Measures, on a Cityscapes-like batch of logits (default 4x256x256x19 and
16x256x256x19, float32), the time and the peak extra memory of one
forward+backward step (gradient with respect to the student logits) of:

- ``klseg``: ``klseg.losses.KLDivergence(target="logits")(teacher, student)``;
- ``keras``: ``keras.losses.KLDivergence()`` fed ``softmax`` outputs (the
  softmax is part of the step, as it is for a user holding logits);
- ``naive``: ``mean(sum(p * log(p / q)))`` on the same softmax outputs.

All three run in the same process, interleaved, compiled the way Keras
compiles a training step on the current backend (``tf.function`` without
XLA on TensorFlow, ``--xla`` to add it; ``jax.jit`` on JAX). Times are
medians over ``--repeats`` runs. The memory-traffic floor is the bytes one
step must move (read teacher and student logits, write the gradient:
3 x the logits' size) divided by the copy bandwidth measured here: with
NumPy on a CPU, with a compiled on-device copy when JAX or TensorFlow runs
on a GPU. Peak memory is measured in a fresh child process per variant: the
largest resident-set growth during a step on a CPU (sampled every 0.2 ms),
the device allocator's peak over what was in use before the step on a GPU
with JAX.

Usage:
    python benchmarks/bench_losses.py [--batches 4 16] [--repeats 10] [--xla]
    KERAS_BACKEND=jax python benchmarks/bench_losses.py     # also on a GPU
    python benchmarks/bench_losses.py --batches 1 --size 32 --repeats 1  # smoke
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

VARIANTS = ("klseg", "keras", "naive")
CLASSES = 19
SIZE = 256  # height and width; --size changes it


def make_inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, SIZE, SIZE, CLASSES)
    teacher = (rng.normal(size=shape) * 3).astype("float32")
    student = (rng.normal(size=shape) * 3).astype("float32")
    return teacher, student


def loss_fn(variant):
    import keras
    from keras import ops

    from klseg import losses

    if variant == "klseg":
        loss = losses.KLDivergence(target="logits")
        return lambda teacher, student: loss(teacher, student)
    if variant == "keras":
        loss = keras.losses.KLDivergence()
        return lambda teacher, student: loss(ops.softmax(teacher), ops.softmax(student))
    if variant == "naive":

        def naive(teacher, student):
            p, q = ops.softmax(teacher), ops.softmax(student)
            return ops.mean(ops.sum(p * ops.log(p / q), axis=-1))

        return naive
    raise ValueError(f"Unknown variant. Received: variant={variant}")


def make_step(variant, xla):
    """A compiled ``step(teacher, student) -> (loss, grad)`` for the backend."""
    import keras

    fn = loss_fn(variant)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=xla)
        def step(teacher, student):
            with tf.GradientTape() as tape:
                tape.watch(student)
                value = fn(teacher, student)
            return value, tape.gradient(value, student)

        def run(teacher, student):
            value, grad = step(teacher, student)
            return float(value), grad.numpy()

        convert = tf.constant
    elif backend == "jax":
        import jax

        step = jax.jit(jax.value_and_grad(lambda s, t: fn(t, s)))

        def run(teacher, student):
            value, grad = step(student, teacher)
            grad.block_until_ready()
            return float(value), grad

        convert = jax.numpy.asarray
    else:
        raise SystemExit(f"Unsupported backend for this benchmark: {backend}")
    return run, convert


def accelerator():
    """``"gpu"`` (or another device kind) when the backend computes there."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return None if jax.default_backend() == "cpu" else jax.default_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else None
    return None


def device_copy_bandwidth(nbytes=256 * 2**20, repeats=7):
    """Bytes moved (read + write) per second by a compiled on-device copy."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        src = jax.numpy.ones(nbytes // 4, dtype="float32")
        copy = jax.jit(lambda x: x * 2.0)

        def run():
            copy(src).block_until_ready()

    else:
        import tensorflow as tf

        src = tf.ones(nbytes // 4, dtype="float32")
        copy = tf.function(lambda x: x * 2.0)

        def run():
            copy(src)[:1].numpy()  # wait for the copy; fetch one element

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def copy_bandwidth(nbytes=256 * 2**20, repeats=7):
    """Bytes moved (read + write) per second by a large copy on the device."""
    if accelerator():
        return device_copy_bandwidth(nbytes, repeats)
    src = np.ones(nbytes // 4, dtype="float32")
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_peak_memory(variant, batch, xla):
    """Run in a child process: peak memory growth during one step, in bytes."""
    run, convert = make_step(variant, xla)
    teacher, student = (convert(x) for x in make_inputs(batch))
    run(teacher, student)  # trace / compile
    run(teacher, student)
    if accelerator():
        import jax  # GPU memory statistics: JAX only

        device = jax.devices()[0]
        base = device.memory_stats()["bytes_in_use"]
        for _ in range(3):
            run(teacher, student)
        return device.memory_stats()["peak_bytes_in_use"] - base
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample)
    thread.start()
    for _ in range(3):
        run(teacher, student)
    done.set()
    thread.join()
    return peak[0] - base


def peak_memory(variant, batch, xla):
    env = dict(os.environ)
    # Return freed buffers to the system at once so that RSS tracks live data.
    env.update(MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, __file__, "--child", variant, "--batches", str(batch)]
    cmd += ["--size", str(SIZE)]
    if xla:
        cmd.append("--xla")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def time_variants(batch, repeats, xla):
    steps = {v: make_step(v, xla) for v in VARIANTS}
    convert = steps["klseg"][1]
    teacher, student = (convert(x) for x in make_inputs(batch))
    values = {}
    for variant, (run, _) in steps.items():
        values[variant] = run(teacher, student)[0]  # trace / compile
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant, (run, _) in steps.items():
            start = time.perf_counter()
            run(teacher, student)
            times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}, values


def main():
    global SIZE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=SIZE, help="height = width")
    parser.add_argument("--xla", action="store_true", help="jit_compile on TF")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    SIZE = args.size
    if args.child:
        peak = child_peak_memory(args.child, args.batches[0], args.xla)
        print(json.dumps({"peak": peak}))
        return

    import keras

    backend = keras.backend.backend()
    mode = "jax.jit" if backend == "jax" else ("XLA" if args.xla else "tf.function")
    bandwidth = copy_bandwidth()
    device = accelerator() or "cpu"
    print(f"backend: {backend} ({mode}) on {device}; cpu count: {os.cpu_count()}")
    print(f"measured copy bandwidth: {bandwidth / 1e9:.2f} GB/s (read + write)")
    memory_ok = not args.no_memory and (device == "cpu" or backend == "jax")
    for batch in args.batches:
        logits_bytes = batch * SIZE * SIZE * CLASSES * 4
        floor = 3 * logits_bytes / bandwidth
        medians, values = time_variants(batch, args.repeats, args.xla)
        memory = {}
        if memory_ok:
            memory = {v: peak_memory(v, batch, args.xla) for v in VARIANTS}
        print()
        print(
            f"batch {batch}x{SIZE}x{SIZE}x{CLASSES} float32 "
            f"({logits_bytes / 2**20:.0f} MiB per logits tensor); "
            f"memory-traffic floor {floor * 1e3:.1f} ms; "
            f"median of {args.repeats}"
        )
        print(
            "| variant | loss | time (ms) | vs keras | vs floor "
            "| peak extra memory (MiB) | memory / logits size |"
        )
        print("|---|---|---|---|---|---|---|")
        for v in VARIANTS:
            mem = memory.get(v)
            mem_cols = (
                f"{mem / 2**20:.0f} | {mem / logits_bytes:.1f}x"
                if mem is not None
                else "- | -"
            )
            print(
                f"| {v} | {values[v]:.4f} | {medians[v] * 1e3:.1f} "
                f"| {medians[v] / medians['keras']:.2f}x "
                f"| {medians[v] / floor:.1f}x | {mem_cols} |"
            )


if __name__ == "__main__":
    main()
