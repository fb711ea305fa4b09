"""GPU training throughput: U-Net, DeepLabV3+ and the KL fine-tuning step.

Runs on any Keras backend; on a GPU machine without TensorFlow use JAX::

    KERAS_BACKEND=jax python benchmarks/bench_gpu.py            # 512x512
    KERAS_BACKEND=jax python benchmarks/bench_gpu.py --size 64 --batch 2 \
        --steps 2 --warmup 1                                      # smoke run

For each configuration it prints images/second of one training step
(forward + backward + optimizer update, jit-compiled by Keras), the median
over ``--repeats`` timed blocks of ``--steps`` steps after ``--warmup``
steps, with float32 and with a mixed-precision policy (``mixed_bfloat16`` by
default; ``--mixed mixed_float16`` uses Keras' loss-scale optimizer). The KL
fine-tuning step (``KLRegularizedModel`` with a live source model, KL on the
student's own batch) is reported next to plain fine-tuning of the same
student as a ratio measured in the same run.
"""

import argparse
import json
import statistics
import time

import keras
import numpy as np

import klseg.finetune
import klseg.losses
import klseg.models


def _block_until_ready(value):
    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(value)
    return value


def _time_steps(model, x, y, *, steps, warmup, repeats):
    for _ in range(warmup):
        _block_until_ready(model.train_on_batch(x, y, return_dict=True))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            logs = model.train_on_batch(x, y, return_dict=True)
        _block_until_ready(logs)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), logs


def _build(name, num_classes, policy, unet_kwargs):
    keras.mixed_precision.set_global_policy(policy)
    try:
        if name == "unet":
            return klseg.models.build("unet", num_classes=num_classes, **unet_kwargs)
        return klseg.models.build(
            "deeplabv3_plus", num_classes=num_classes, backbone="resnet50"
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _task_loss():
    return klseg.losses.SparseKLDivergence(ignore_class=255)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mixed", default="mixed_bfloat16")
    parser.add_argument("--models", default="unet,deeplabv3_plus")
    parser.add_argument("--unet-filters", type=int, help="base filters (default 32)")
    parser.add_argument("--unet-depth", type=int, help="(default 4)")
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)
    unet_kwargs = {"base_filters": args.unet_filters, "depth": args.unet_depth}
    unet_kwargs = {k: v for k, v in unet_kwargs.items() if v is not None}

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    y = rng.integers(0, args.classes, (args.batch, args.size, args.size))
    y = y.astype("int32")
    timing = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    print(
        f"backend={keras.backend.backend()} size={args.size} batch={args.batch} "
        f"classes={args.classes}"
    )
    results = []
    for name in args.models.split(","):
        for policy in ("float32", args.mixed):
            model = _build(name, args.classes, policy, unet_kwargs)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=_task_loss())
            seconds, logs = _time_steps(model, x, y, **timing)
            row = {
                "model": name,
                "policy": policy,
                "step": "train",
                "images_per_s": args.batch / seconds,
                "loss": float(logs["loss"]),
            }
            if name == "unet":
                source = _build(name, args.classes, policy, unet_kwargs)
                student = _build(name, args.classes, policy, unet_kwargs)
                student.set_weights(source.get_weights())
                wrapped = klseg.finetune.KLRegularizedModel(
                    student, source, kl_weight=1.0, temperature=2.0, kl_inputs="target"
                )
                wrapped.compile(
                    optimizer=keras.optimizers.Adam(1e-4), loss=_task_loss()
                )
                kl_seconds, kl_logs = _time_steps(wrapped, x, y, **timing)
                results.append(row)
                row = {
                    "model": name,
                    "policy": policy,
                    "step": "kl_finetune",
                    "images_per_s": args.batch / kl_seconds,
                    "ratio_vs_plain": kl_seconds / seconds,
                    "loss": float(kl_logs["loss"]),
                }
            results.append(row)
            keras.backend.clear_session()
    print(f"{'model':16s} {'policy':15s} {'step':12s} {'img/s':>9s} {'vs plain':>9s}")
    for row in results:
        ratio = row.get("ratio_vs_plain")
        ratio = f"{ratio:8.2f}x" if ratio is not None else ""
        print(
            f"{row['model']:16s} {row['policy']:15s} {row['step']:12s} "
            f"{row['images_per_s']:9.1f} {ratio:>9s}"
        )
        if not np.isfinite(row["loss"]):
            raise SystemExit(f"non-finite loss in {row}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
