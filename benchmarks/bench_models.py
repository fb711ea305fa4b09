"""Training throughput (images/second) of the klseg models.

One training step = forward + backward + Adam update with
``klseg.losses.SparseKLDivergence``, through ``model.train_on_batch`` (the
step ``fit`` runs). The first ``--warmup`` steps (tracing/compilation) are
not timed; the result is the median over ``--steps`` timed steps.

CPU (default): 256x256, batch 8, float32, the backend Keras is set to::

    python benchmarks/bench_models.py            # about 8 min on 2 cores
    python benchmarks/bench_models.py --models unet-small unet
    python benchmarks/bench_models.py --size 64 --batch 16 \
        --models unet-tiny unet-small unet     # the demo's image size

GPU: 512x512, batch 8, mixed precision, meant for the JAX backend::

    KERAS_BACKEND=jax python benchmarks/bench_models.py --gpu

``--gpu`` only changes the defaults (size, policy); ``--gpu --size 64
--batch 2`` runs the same code path on a CPU.
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

MODELS = {
    "unet-tiny": ("unet", {"base_filters": 8, "depth": 3}),
    "unet-small": ("unet", {"base_filters": 16, "depth": 3}),
    "unet": ("unet", {}),
    "unet-mobilenetv2": ("unet", {"backbone": "mobilenetv2"}),
    "unet-resnet50": ("unet", {"backbone": "resnet50"}),
    "deeplab-plain": ("deeplabv3_plus", {"backbone": "plain"}),
    "deeplab-mobilenetv2": ("deeplabv3_plus", {"backbone": "mobilenetv2"}),
    "deeplab-resnet50": ("deeplabv3_plus", {"backbone": "resnet50"}),
}
NUM_CLASSES = 21


def _device():
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"gpu: {details.get('device_name', gpus[0].name)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def bench(name, *, size, batch, steps, warmup, seed=0):
    import keras

    import klseg.models
    from klseg.losses import SparseKLDivergence

    builder, kwargs = MODELS[name]
    keras.utils.set_random_seed(seed)
    model = klseg.models.build(builder, num_classes=NUM_CLASSES, **kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=SparseKLDivergence(ignore_class=255),
    )
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, size, size, 3)).astype("uint8")
    labels = rng.integers(0, NUM_CLASSES, size=(batch, size, size)).astype("int32")

    start = time.perf_counter()
    for _ in range(warmup):
        loss = model.train_on_batch(images, labels)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.train_on_batch(images, labels)
        float(np.asarray(loss))  # wait for the step to finish
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "model": name,
        "params_m": round(model.count_params() / 1e6, 2),
        "images_per_s": round(batch / median, 2),
        "step_s_median": round(median, 3),
        "step_s_min": round(min(times), 3),
        "step_s_max": round(max(times), 3),
        "warmup_s": round(warmup_s, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--gpu", action="store_true", help="512x512, mixed precision")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps")
    parser.add_argument(
        "--policy",
        default=None,
        help="Keras dtype policy (default float32; mixed_bfloat16 with --gpu)",
    )
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)

    import keras

    size = args.size or (512 if args.gpu else 256)
    policy = args.policy or ("mixed_bfloat16" if args.gpu else "float32")
    if args.gpu and keras.backend.backend() != "jax":
        print("note: --gpu is meant for KERAS_BACKEND=jax")
    keras.mixed_precision.set_global_policy(policy)
    names = args.models or [n for n in MODELS if n != "unet-tiny"]
    header = {
        "backend": keras.backend.backend(),
        "device": _device(),
        "policy": policy,
        "image_size": size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    print("| model | params (M) | images/s | step s (median, min-max) |")
    print("|---|---:|---:|---|")
    results = []
    for name in names:
        r = bench(
            name, size=size, batch=args.batch, steps=args.steps, warmup=args.warmup
        )
        results.append(r)
        print(
            f"| {name} | {r['params_m']} | {r['images_per_s']} | "
            f"{r['step_s_median']} ({r['step_s_min']}-{r['step_s_max']}) |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
