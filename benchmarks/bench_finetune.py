"""Fine-tuning benchmarks: step-time overhead and the forgetting trade-off.

Two measurements, each run by its own sub-command:

``overhead`` (issue: scale and speed) times training steps of the same
model and batch, in the same process, at 256x256:

- plain fine-tuning (the student alone, compiled with the task loss);
- KL fine-tuning with the live source model (``KLRegularizedModel``,
  ``kl_inputs="target"``: the source model runs on the same images);
- KL fine-tuning with stored source predictions (``x["source_probs"]``);
- ``auto``: the one of the two that ``klseg finetune --source-predictions
  auto`` (the default) picks for ``--images`` training images of this size.

and prints the median step time of each and the ratios to plain. The three
variants are interleaved in rounds so that load changes on a shared machine
hit them alike.

``tradeoff`` trains a small U-Net on the built-in synthetic source domain,
then fine-tunes copies of it on a few target images with plain fine-tuning
and with the KL term on target or on unlabelled source images at several
weights, and prints target and source validation mean IoU for each.

Usage::

    python benchmarks/bench_finetune.py overhead [--size 256 --batch 4]
    python benchmarks/bench_finetune.py tradeoff [--epochs 15 ...]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _quiet_keras():
    import keras

    keras.utils.set_random_seed(0)
    return keras


# Overhead ------------------------------------------------------------------


def overhead(args):
    keras = _quiet_keras()
    import numpy as np

    from klseg import losses, models
    from klseg.finetune import KLRegularizedModel, store_source_predictions
    from klseg.runs.finetune import resolve_source_predictions

    size, batch = args.size, args.batch
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, 6, (batch, size, size)).astype("int32")

    def unet():
        return models.unet(6, base_filters=args.base_filters, depth=args.depth)

    source = unet()
    stored = store_source_predictions(source, images, verbose=0)

    def compiled(model):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=losses.SparseKLDivergence(ignore_class=255),
        )
        return model

    plain = compiled(unet())
    live = compiled(KLRegularizedModel(unet(), source, kl_inputs="target"))
    kept = compiled(KLRegularizedModel(unet(), source, kl_inputs="target"))
    variants = {
        "plain": (plain, images),
        "live": (live, {"images": images}),
        "stored": (kept, {"images": images, "source_probs": stored}),
    }
    # What `klseg finetune --source-predictions auto` (the default) picks for
    # a training set of --images images of this size with the default
    # (light) augmentation, decided by the function the run uses.
    chosen, why = resolve_source_predictions(
        "auto", {"data": args.images}, size, 6, "light"
    )
    print(f"auto ({args.images} training images): {chosen}, because {why}")
    auto = compiled(KLRegularizedModel(unet(), source, kl_inputs="target"))
    variants["auto"] = (auto, variants[chosen][1])
    times = {name: [] for name in variants}
    for model, x in variants.values():  # compile and warm up
        for _ in range(2):
            model.train_on_batch(x, masks)
    for _ in range(args.rounds):
        for name, (model, x) in variants.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                model.train_on_batch(x, masks)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"U-Net base_filters={args.base_filters} depth={args.depth} "
        f"({plain.count_params():,} parameters), batch {batch} of {size}x{size}, "
        f"{args.rounds} rounds x {args.steps} steps, backend "
        f"{keras.backend.backend()}"
    )
    print(f"{'variant':<8} {'median step (ms)':>18} {'ratio to plain':>15}")
    for name, median in medians.items():
        ratio = median / medians["plain"]
        print(f"{name:<8} {1000 * median:>18.1f} {ratio:>15.3f}")


# Trade-off -----------------------------------------------------------------


def _source_model(args, keras, data):
    from klseg import losses, metrics, models
    from klseg.data import synthetic

    path = args.cache
    if path and os.path.exists(path):  # klseg.metrics is imported: loadable
        return keras.saving.load_model(path, compile=False)
    model = models.unet(
        synthetic.NUM_CLASSES,
        base_filters=args.base_filters,
        depth=args.depth,
        class_names=list(synthetic.CLASS_NAMES),
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=losses.SparseKLDivergence(ignore_class=255),
        metrics=[metrics.MeanIoU(synthetic.NUM_CLASSES, ignore_class=255)],
    )
    start = time.perf_counter()
    images, masks = data["source_train"]
    model.fit(images, masks, batch_size=16, epochs=args.source_epochs, verbose=0)
    print(f"source model trained in {time.perf_counter() - start:.0f} s")
    if path:
        model.save(path)
    return model


def tradeoff(args):
    keras = _quiet_keras()

    from klseg import losses, metrics
    from klseg.data import synthetic
    from klseg.finetune import KLRegularizedModel, clone_student, evaluate_domains

    size = args.size
    gen = synthetic.generate
    n_lab, n_unl = args.labelled, args.unlabelled
    tgt_x, tgt_y = gen("target", n_lab + n_unl, image_size=size, seed=1)
    tgt_y = tgt_y.astype("int32")
    tgt_y[n_lab:] = 255  # unlabelled target images
    src_x, src_y = gen("source", args.source_images, image_size=size, seed=0)
    data = {
        "source_train": (src_x, src_y.astype("int32")),
        "target": (tgt_x, tgt_y),
        # Unlabelled source-domain images for rehearsal (no masks used).
        "source_unlabelled": gen("source", n_lab + n_unl, image_size=size, seed=2)[0],
        "val": {
            "target": gen("target", args.val, image_size=size, seed=100),
            "source": gen("source", args.val, image_size=size, seed=100),
        },
    }
    source = _source_model(args, keras, data)
    base = evaluate_domains(source, data["val"])
    print(
        f"source model: source {100 * base['source_mean_iou']:.1f} / target "
        f"{100 * base['target_mean_iou']:.1f} mIoU"
    )

    variants = [("plain", None, 0.0)]
    for weight in args.weights:
        variants.append(("target", "target", weight))
    for weight in args.weights:
        variants.append(("source", "source", weight))
    if args.only:
        variants = [v for v in variants if f"{v[0]}:{v[2]:g}" in args.only]

    rows = []
    for label, kl_inputs, weight in variants:
        keras.utils.set_random_seed(args.seed)
        student = clone_student(source)
        model = KLRegularizedModel(
            student,
            source,
            kl_weight=weight,
            temperature=args.temperature,
            kl_inputs=kl_inputs or "target",
        )
        model.compile(
            optimizer=keras.optimizers.Adam(args.lr),
            loss=losses.SparseKLDivergence(ignore_class=255),
            metrics=[metrics.MeanIoU(synthetic.NUM_CLASSES, ignore_class=255)],
        )
        x = {"images": data["target"][0]}
        if kl_inputs == "source":
            x["source_images"] = data["source_unlabelled"]
        start = time.perf_counter()
        model.fit(
            x,
            data["target"][1],
            batch_size=args.batch,
            epochs=args.epochs,
            shuffle=True,
            verbose=0,
        )
        seconds = time.perf_counter() - start
        scores = evaluate_domains(
            model, data["val"], source_baseline=base["source_mean_iou"]
        )
        name = "plain" if label == "plain" else f"KL {label} w={weight:g}"
        rows.append((name, scores, seconds))
        print(
            f"{name:<22} source {100 * scores['source_mean_iou']:5.1f}  target "
            f"{100 * scores['target_mean_iou']:5.1f}  ({seconds:.0f} s)",
            flush=True,
        )
    print()
    print("| fine-tuning | source val mIoU | target val mIoU | time (s) |")
    print("|---|---:|---:|---:|")
    print(
        f"| none (source model) | {100 * base['source_mean_iou']:.1f} | "
        f"{100 * base['target_mean_iou']:.1f} | |"
    )
    for name, scores, seconds in rows:
        print(
            f"| {name} | {100 * scores['source_mean_iou']:.1f} | "
            f"{100 * scores['target_mean_iou']:.1f} | {seconds:.0f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("overhead", help="step time of KL vs plain fine-tuning")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--images", type=int, default=200, help="training images auto decides for"
    )

    p = sub.add_parser("tradeoff", help="source/target mIoU of each variant")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--source-images", type=int, default=256)
    p.add_argument("--source-epochs", type=int, default=10)
    p.add_argument("--labelled", type=int, default=48)
    p.add_argument("--unlabelled", type=int, default=48)
    p.add_argument("--val", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="e.g. plain:0 source:0.3")
    p.add_argument("--cache", help="save/load the source model here (.keras)")

    args = parser.parse_args(argv)
    {"overhead": overhead, "tradeoff": tradeoff}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
