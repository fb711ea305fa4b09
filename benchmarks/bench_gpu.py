"""GPU training throughput: U-Net, DeepLabV3+ and every training step of klseg.

Runs on any Keras backend; on a GPU machine without TensorFlow use JAX::

    KERAS_BACKEND=jax python benchmarks/bench_gpu.py            # 512x512
    KERAS_BACKEND=jax python benchmarks/bench_gpu.py --devices one,all
    KERAS_BACKEND=jax python benchmarks/bench_gpu.py --size 64 --batch 2 \
        --steps 2 --warmup 1                                      # smoke run

For each configuration it prints images/second of one training step
(forward + backward + optimizer update, jit-compiled by Keras), the median
over ``--repeats`` timed blocks of ``--steps`` steps after ``--warmup``
steps, with float32 and with a mixed-precision policy (``mixed_bfloat16`` by
default; ``--mixed mixed_float16`` uses Keras' loss-scale optimizer). For the
U-Net it times every training step klseg has, each as a ratio to plain
training of the same network measured in the same run: ``kl_finetune``
(``KLRegularizedModel``, live source model, KL on the batch's images),
``kl_stored`` (the same with the source probabilities stored, as
``--source-predictions stored`` feeds them), ``consistency``
(``MeanTeacherModel``: an unlabelled batch beside the labelled one, ClassMix,
EMA teacher) and ``distill`` (``DistillationModel``, a student of half the
width).

``--devices all`` (JAX) repeats every row under
``keras.distribution.DataParallel`` over all local devices with
``--batch`` images per device, and prints the scaling efficiency
(images/s on all devices / (devices x images/s on one)). ``peak GiB`` is
the accelerator's peak memory in use so far in the process (JAX
``memory_stats``; ``-`` where the device reports none, as CPUs do).
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


def _steps(name, args, policy, unet_kwargs, x, y):
    """``{step: (model, x)}`` of the rows measured for ``name``."""
    plain = _build(name, args.classes, policy, unet_kwargs)
    plain.compile(optimizer=keras.optimizers.Adam(1e-4), loss=_task_loss())
    steps = {"train": (plain, x)}
    if name != "unet":
        return steps
    import klseg.consistency
    import klseg.distill

    def student():
        source_weights = plain.get_weights()
        model = _build(name, args.classes, policy, unet_kwargs)
        model.set_weights(source_weights)
        return model

    source = student()
    compile_args = {"optimizer": keras.optimizers.Adam(1e-4), "loss": _task_loss()}
    kl = {"kl_weight": 1.0, "temperature": 2.0, "kl_inputs": "target"}
    live = klseg.finetune.KLRegularizedModel(student(), source, **kl)
    live.compile(**compile_args)
    steps["kl_finetune"] = (live, x)
    logits = source.predict(x, verbose=0).astype("float32") / 2.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype("float16")
    stored = klseg.finetune.KLRegularizedModel(student(), source, **kl)
    stored.compile(optimizer=keras.optimizers.Adam(1e-4), loss=_task_loss())
    steps["kl_stored"] = (stored, {"images": x, "source_probs": probs})
    teacher = klseg.consistency.MeanTeacherModel(
        student(), source, kl_weight=1.0, kl_inputs="target", student_bn="frozen",
        ema_decay=0.97, consistency_rampup=100, seed=0,
    )  # fmt: skip
    teacher.compile(optimizer=keras.optimizers.Adam(1e-4), loss=_task_loss())
    steps["consistency"] = (teacher, {"images": x, "unlabeled_images": x[::-1]})
    half = dict(
        unet_kwargs, base_filters=max(1, unet_kwargs.get("base_filters", 32) // 2)
    )
    small = _build(name, args.classes, policy, half)
    distill = klseg.distill.DistillationModel(small, source, kl_type="pixel")
    distill.compile(optimizer=keras.optimizers.Adam(1e-4), loss=_task_loss())
    steps["distill"] = (distill, x)
    return steps


def _peak_gib():
    if keras.backend.backend() != "jax":
        return None
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 2**30 if peaks else None


def _set_devices(devices):
    """Set DataParallel over all local devices (JAX) for ``"all"``; returns
    the device count."""
    if devices == "one":
        if keras.backend.backend() == "jax":
            keras.distribution.set_distribution(None)
        return 1
    if keras.backend.backend() != "jax":
        raise SystemExit("--devices all needs the JAX backend (keras.distribution)")
    import jax

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices())
    )
    return len(jax.devices())


def _rows(args, devices, unet_kwargs, timing):
    count = _set_devices(devices)
    batch = args.batch * count
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8)
    y = rng.integers(0, args.classes, (batch, args.size, args.size)).astype("int32")
    rows = []
    for name in args.models.split(","):
        for policy in ("float32",) if args.mixed == "none" else ("float32", args.mixed):
            plain_seconds = None
            for step, (model, inputs) in _steps(
                name, args, policy, unet_kwargs, x, y
            ).items():
                seconds, logs = _time_steps(model, inputs, y, **timing)
                plain_seconds = plain_seconds or seconds
                row = {
                    "model": name,
                    "policy": policy,
                    "step": step,
                    "devices": count,
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "loss": float(logs["loss"]),
                    "peak_gib": _peak_gib(),
                }
                if step != "train":
                    row["ratio_vs_plain"] = seconds / plain_seconds
                rows.append(row)
            keras.backend.clear_session()
    _set_devices("one")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="images per device")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mixed", default="mixed_bfloat16", help="the mixed policy, or none"
    )
    parser.add_argument("--models", default="unet,deeplabv3_plus")
    parser.add_argument("--unet-filters", type=int, help="base filters (default 32)")
    parser.add_argument("--unet-depth", type=int, help="(default 4)")
    parser.add_argument(
        "--devices", default="one", help="one, all, or one,all (all: JAX DataParallel)"
    )
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)
    unet_kwargs = {"base_filters": args.unet_filters, "depth": args.unet_depth}
    unet_kwargs = {k: v for k, v in unet_kwargs.items() if v is not None}
    timing = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    print(
        f"backend={keras.backend.backend()} size={args.size} "
        f"batch={args.batch}/device classes={args.classes}"
    )
    results = []
    for devices in args.devices.split(","):
        if devices not in ("one", "all"):
            raise SystemExit(f"--devices: one, all or one,all. Received: {devices!r}")
        results += _rows(args, devices, unet_kwargs, timing)
    one = {
        (r["model"], r["policy"], r["step"]): r["images_per_s"]
        for r in results
        if r["devices"] == 1
    }
    print(
        f"{'model':16s} {'policy':15s} {'step':12s} {'dev':>3s} {'img/s':>9s} "
        f"{'vs plain':>9s} {'scaling':>8s} {'peak GiB':>9s}"
    )
    for row in results:
        ratio = row.get("ratio_vs_plain")
        ratio = f"{ratio:8.2f}x" if ratio is not None else ""
        base = one.get((row["model"], row["policy"], row["step"]))
        scaling = ""
        if row["devices"] > 1 and base:
            row["scaling_efficiency"] = row["images_per_s"] / (row["devices"] * base)
            scaling = f"{row['scaling_efficiency']:8.2f}"
        peak = f"{row['peak_gib']:9.2f}" if row["peak_gib"] is not None else "-"
        print(
            f"{row['model']:16s} {row['policy']:15s} {row['step']:12s} "
            f"{row['devices']:3d} {row['images_per_s']:9.1f} {ratio:>9s} "
            f"{scaling:>8s} {peak:>9s}"
        )
        if not np.isfinite(row["loss"]):
            raise SystemExit(f"non-finite loss in {row}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
