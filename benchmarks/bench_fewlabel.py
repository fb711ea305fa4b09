"""Few labels: KL consistency to an EMA teacher against plain and KL fine-tuning.

On the built-in synthetic two-domain benchmark (strong domain gap: the
target domain reuses source colours for other classes), a small U-Net is
trained once on the source domain, then fine-tuned on N labelled target
images (N in ``--labels``) with ``--unlabelled`` unlabelled target images
and unlabelled source images, three ways:

- ``plain``: the task loss only (``KLRegularizedModel``, ``kl_weight=0``);
- ``kl``: plus the KL term to the frozen source model on unlabelled source
  images (``kl_inputs="source"``, ``--kl-weight``, ``--temperature``);
- ``mt``: ``kl`` plus the consistency term to an EMA teacher on the
  unlabelled target images (``klseg.consistency.MeanTeacherModel``); its
  EMA teacher is the model scored (``klseg finetune`` saves it), the
  student's scores are printed beside it.

Every run takes the same number of optimizer steps (``--steps``) with the
same batch size: a labelled batch (the labelled images cycled in a seeded
random order, flipped left-right at random) plus, for ``kl`` and ``mt``, a
batch of unlabelled source images and, for ``mt``, a batch of unlabelled
target images (flipped at random: the weak view). ``--student-bn frozen``
keeps the student's BatchNorm statistics at the source model's in every
variant. Each seed draws which
labelled images are used (out of a fixed pool of ``max(--labels)``), the
batch order and the model's random state; the source model and the
validation sets are shared. Scores: mean IoU on ``--val`` validation images
per domain (one confusion matrix over the set); the table gives the mean over
seeds and the min-max range.

Usage::

    python benchmarks/bench_fewlabel.py [--steps 150 --seeds 0 1 2 ...]
    # the runs in docs/finetune.md (the recommended settings; about 70 min
    # for the first on a shared 2-core CPU):
    python benchmarks/bench_fewlabel.py --steps 900 --student-bn frozen \
        --kl-weight 1 --ema-decay 0.97 --consistency-rampup 100 --labels 8 48
    python benchmarks/bench_fewlabel.py --steps 900 --student-bn frozen \
        --kl-weight 1 --ema-decay 0.97 --consistency-rampup 100 --labels 4 16 \
        --seeds 0
    # the earlier, shorter runs there (34 min):
    python benchmarks/bench_fewlabel.py --ema-decay 0.95 --consistency-rampup 100
    python benchmarks/bench_fewlabel.py --labels 8 --seeds 0 --variants mt \\
        --consistency-threshold 0.8        # one variation
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = ("plain", "kl", "mt")
NAMES = {
    "plain": "(a) plain fine-tuning",
    "kl": "(b) KL to source on source images",
    "mt": "(c) (b) + consistency to EMA teacher",
}


def _data(args):
    from klseg.data import synthetic

    gen, size = synthetic.generate, args.size
    pool = max(args.labels)
    tgt_x, tgt_y = gen("target", pool, image_size=size, seed=1)
    return {
        "source_train": gen("source", args.source_images, image_size=size, seed=0),
        "target_pool": (tgt_x, tgt_y.astype("int32")),
        "target_unlabelled": gen("target", args.unlabelled, image_size=size, seed=3)[0],
        "source_unlabelled": gen(
            "source", args.source_unlabelled, image_size=size, seed=2
        )[0],
        "val": {
            "target": gen("target", args.val, image_size=size, seed=100),
            "source": gen("source", args.val, image_size=size, seed=100),
        },
    }


def _source_model(args, keras, data):
    from klseg import losses, metrics, models
    from klseg.data import synthetic

    if args.cache and os.path.exists(args.cache):
        return keras.saving.load_model(args.cache, compile=False)
    keras.utils.set_random_seed(0)
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
    images, masks = data["source_train"]
    start = time.perf_counter()
    model.fit(
        images,
        masks.astype("int32"),
        batch_size=16,
        epochs=args.source_epochs,
        verbose=0,
    )
    print(f"source model trained in {time.perf_counter() - start:.0f} s", flush=True)
    if args.cache:
        model.save(args.cache)
    return model


class _Batches:
    """Seeded batches of an array: a new random order each pass, cycled."""

    def __init__(self, n, batch, rng):
        self.n, self.batch, self.rng = n, batch, rng
        self.order = []

    def next(self):
        import numpy as np

        while len(self.order) < self.batch:
            self.order = [*self.order, *self.rng.permutation(self.n)]
        picked, self.order = self.order[: self.batch], self.order[self.batch :]
        return np.asarray(picked)


def _flip(rng, *arrays):
    """Flip each image (and its mask) left-right with probability 1/2."""
    flip = rng.random(len(arrays[0])) < 0.5
    return [a.copy() if not flip.any() else _flipped(a, flip) for a in arrays]


def _flipped(a, flip):
    a = a.copy()
    a[flip] = a[flip][:, :, ::-1]
    return a


def _one_run(args, keras, source, data, variant, labels, seed):
    import numpy as np

    from klseg import losses
    from klseg.consistency import MeanTeacherModel
    from klseg.finetune import KLRegularizedModel, clone_student, evaluate_domains

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    pool_x, pool_y = data["target_pool"]
    chosen = rng.permutation(len(pool_x))[:labels]
    lab_x, lab_y = pool_x[chosen], pool_y[chosen]
    student = clone_student(source)
    common = {
        "temperature": args.temperature,
        "kl_inputs": "source",
        "student_bn": args.student_bn,
    }
    if variant == "plain":
        model = KLRegularizedModel(student, source, kl_weight=0.0, **common)
    elif variant == "kl":
        model = KLRegularizedModel(student, source, kl_weight=args.kl_weight, **common)
    else:
        model = MeanTeacherModel(
            student,
            source,
            kl_weight=args.kl_weight,
            consistency_weight=args.consistency_weight,
            ema_decay=args.ema_decay,
            consistency_threshold=args.consistency_threshold,
            consistency_rampup=args.consistency_rampup,
            mix=args.mix,
            seed=seed + 1,
            **common,
        )
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss=losses.SparseKLDivergence(ignore_class=255),
    )
    batch = args.batch
    labelled = _Batches(labels, batch, rng)
    src = _Batches(len(data["source_unlabelled"]), batch, rng)
    unl = _Batches(len(data["target_unlabelled"]), batch, rng)
    logs = {}
    start = time.perf_counter()
    for _ in range(args.steps):
        i = labelled.next()
        images, masks = _flip(rng, lab_x[i], lab_y[i])
        x = {"images": images}
        if variant != "plain":
            x["source_images"] = data["source_unlabelled"][src.next()]
        if variant == "mt":
            (x["unlabeled_images"],) = _flip(rng, data["target_unlabelled"][unl.next()])
        logs = model.train_on_batch(x, masks, return_dict=True)
    seconds = time.perf_counter() - start
    scores = {"student": evaluate_domains(model.student, data["val"])}
    if variant == "mt":
        scores["ema"] = evaluate_domains(model.ema_model, data["val"])
        scores["teacher_confidence"] = float(logs.get("teacher_confidence", 0.0))
    return scores, seconds


def _summary(values):
    values = [100 * v for v in values]
    return statistics.mean(values), min(values), max(values)


def _cell(values):
    mean, low, high = _summary(values)
    return f"{mean:.1f} ({low:.1f}-{high:.1f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--source-images", type=int, default=256)
    parser.add_argument("--source-epochs", type=int, default=10)
    parser.add_argument("--labels", type=int, nargs="+", default=[4, 8, 16, 48])
    parser.add_argument("--unlabelled", type=int, default=200)
    parser.add_argument("--source-unlabelled", type=int, default=200)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--kl-weight", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--consistency-weight", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--consistency-threshold", type=float, default=0.9)
    parser.add_argument("--consistency-rampup", type=int, default=0)
    parser.add_argument(
        "--mix", default="classmix", choices=("classmix", "cutmix", "none")
    )
    parser.add_argument(
        "--student-bn", default="trainable", choices=("trainable", "frozen")
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--cache", help="save/load the source model here (.keras)")
    parser.add_argument("--json", help="also write every run's scores here")
    args = parser.parse_args(argv)

    import keras

    started = time.perf_counter()
    data = _data(args)
    source = _source_model(args, keras, data)
    from klseg.finetune import evaluate_domains

    base = evaluate_domains(source, data["val"])
    print(
        f"source model: source {100 * base['source_mean_iou']:.1f} / target "
        f"{100 * base['target_mean_iou']:.1f} mIoU",
        flush=True,
    )
    runs = []
    for labels in args.labels:
        for variant in args.variants:
            for seed in args.seeds:
                scores, seconds = _one_run(
                    args, keras, source, data, variant, labels, seed
                )
                runs.append(
                    {
                        "labels": labels,
                        "variant": variant,
                        "seed": seed,
                        "seconds": round(seconds, 1),
                        **scores,
                    }
                )
                line = " ".join(
                    f"{who} source {100 * s['source_mean_iou']:5.1f} target "
                    f"{100 * s['target_mean_iou']:5.1f}"
                    for who, s in scores.items()
                    if isinstance(s, dict)
                )
                print(
                    f"labels={labels:<3} {variant:<5} seed={seed} {line} "
                    f"({seconds:.0f} s)",
                    flush=True,
                )
    print()
    print(
        f"{args.steps} steps of batch {args.batch} per run; mean over seeds "
        f"{args.seeds} with the (min-max) range; mIoU in %."
    )
    print()
    print(
        "| labelled target images | fine-tuning | source val mIoU | target val mIoU |"
    )
    print("|---:|---|---:|---:|")
    print(
        f"| 0 | none (the source model) | {100 * base['source_mean_iou']:.1f} | "
        f"{100 * base['target_mean_iou']:.1f} |"
    )
    means = {}
    for labels in args.labels:
        for variant in args.variants:
            rows = [
                r for r in runs if r["labels"] == labels and r["variant"] == variant
            ]
            whos = ["ema", "student"] if variant == "mt" else ["student"]
            for who in whos:
                source_m = [r[who]["source_mean_iou"] for r in rows]
                target_m = [r[who]["target_mean_iou"] for r in rows]
                name = NAMES[variant]
                if variant == "mt":
                    name += ", EMA teacher" if who == "ema" else ", its student"
                means[(labels, variant, who)] = (
                    _summary(source_m)[0],
                    _summary(target_m)[0],
                )
                print(f"| {labels} | {name} | {_cell(source_m)} | {_cell(target_m)} |")
    goal = (8, "mt", "ema"), (max(args.labels), "plain", "student")
    if all(key in means for key in goal):
        mt, plain = means[goal[0]], means[goal[1]]
        kept = 100 * base["source_mean_iou"] - mt[0]
        print()
        print(
            f"8 labels + consistency (EMA teacher): target {mt[1]:.1f} vs plain "
            f"fine-tuning with {goal[1][0]} labels {plain[1]:.1f} "
            f"({'reached' if mt[1] >= plain[1] else 'not reached'}); source "
            f"{mt[0]:.1f}, {kept:.1f} points below the source model "
            f"({'within' if kept <= 1 else 'not within'} 1 point)."
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"settings": vars(args), "source_model": base, "runs": runs},
                f,
                indent=1,
            )


if __name__ == "__main__":
    sys.exit(main())
