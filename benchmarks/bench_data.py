"""Data pipeline throughput against the training step rate of the default model.

Writes the built-in benchmark at 256x256 as PNG files, then measures images
per second through the whole pipeline (``klseg.data.make_dataset``: PNG
decode, class map, resize check, augmentation in parallel tf.data workers,
batching) for each augmentation preset, and, in the same process, the
training rate (images per second) of the default model
(``klseg.models.unet(num_classes)``: plain encoder, 32 base filters, depth 4)
at the same size and batch. The ratio pipeline / training says whether the
pipeline could starve training: it should be >= 2 for the ``light`` preset.

Both are measured alone (the pipeline without training, training on a
batch already in memory), in interleaved rounds; the medians over rounds are
reported (the ratio is the median of the per-round ratios).

``gap`` measures the domain gap of the built-in two-domain benchmark: a
small U-Net trained on the source domain is scored on both domains' validation
sets, then fine-tuned on the few labelled target images (plain fine-tuning),
and a second one is trained on those target images alone, from scratch.

Usage::

    python benchmarks/bench_data.py throughput [--size 256 --batch 8 --repeats 3]
    python benchmarks/bench_data.py gap [--source-epochs 12 --finetune-epochs 8 30]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class PipelineMeter:
    """Keeps one running pipeline and times a number of its batches."""

    def __init__(self, split, args, augment, style=None):
        from klseg.data import make_dataset

        dataset = make_dataset(
            split,
            batch_size=args.batch,
            image_size=args.size,
            augment=augment,
            style=style,
            shuffle=True,
            repeat=True,
            seed=0,
        )
        self.args = args
        self.iterator = iter(dataset)
        for _ in range(args.warmup_batches):
            next(self.iterator)

    def rate(self):
        # batches prefetched while the meter was idle come back at once;
        # drain them untimed so that only the steady state is timed
        for _ in range(self.args.warmup_batches):
            next(self.iterator)
        start = time.perf_counter()
        for _ in range(self.args.batches):
            next(self.iterator)
        elapsed = time.perf_counter() - start
        return self.args.batches * self.args.batch / elapsed


class TrainingMeter:
    """Training steps of the default U-Net on one batch held in memory."""

    def __init__(self, args, num_classes):
        import keras
        import numpy as np

        from klseg import models

        keras.utils.set_random_seed(0)
        self.model = models.unet(num_classes)
        self.model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=255
            ),
        )
        rng = np.random.default_rng(0)
        shape = (args.batch, args.size, args.size)
        self.images = rng.integers(0, 256, (*shape, 3), np.uint8)
        self.masks = rng.integers(0, num_classes, shape).astype(np.int32)
        self.args = args
        for _ in range(2):
            self.model.train_on_batch(self.images, self.masks)

    def rate(self):
        start = time.perf_counter()
        for _ in range(self.args.train_steps):
            self.model.train_on_batch(self.images, self.masks)
        elapsed = time.perf_counter() - start
        return self.args.train_steps * self.args.batch / elapsed


def throughput(args):
    from klseg.data import DomainStyle, load_split, synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic.write_benchmark(
            os.path.join(tmp, "bench"),
            image_size=args.size,
            num_train=args.images,
            num_val=1,
            num_unlabeled=16,
            num_target_train=1,
        )
        split = load_split(root / "source" / "train")
        style = DomainStyle("histogram", root / "target" / "unlabeled")
        meters = {
            "none": PipelineMeter(split, args, "none"),
            "light": PipelineMeter(split, args, "light"),
            "strong": PipelineMeter(split, args, "strong"),
            "light + histogram style": PipelineMeter(split, args, "light", style),
        }
        trainer = TrainingMeter(args, synthetic.NUM_CLASSES)
        # rounds interleave training and each pipeline, so that load changes
        # on a shared machine hit all of them alike; ratios are per round
        train_rates, rates, ratios = (
            [],
            {n: [] for n in meters},
            {n: [] for n in meters},
        )
        for _ in range(args.repeats):
            train = trainer.rate()
            train_rates.append(train)
            for name, meter in meters.items():
                rate = meter.rate()
                rates[name].append(rate)
                ratios[name].append(rate / train)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"{args.size}x{args.size}, batch {args.batch}, {cores} CPU cores")
    train = statistics.median(train_rates)
    print(f"training rate, default U-Net: {train:.1f} images/s")
    print()
    print("| pipeline | images/s | ratio to training |")
    print("|---|---:|---:|")
    for name in meters:
        rate, ratio = statistics.median(rates[name]), statistics.median(ratios[name])
        print(f"| {name} | {rate:.0f} | {ratio:.1f} |")


# Domain gap ---------------------------------------------------------------


def mean_iou(model, images, masks, num_classes):
    import numpy as np

    predicted = model.predict(images, batch_size=32, verbose=0).argmax(-1)
    ious = []
    for c in range(num_classes):
        union = ((predicted == c) | (masks == c)).sum()
        if union:
            ious.append(((predicted == c) & (masks == c)).sum() / union)
    return 100.0 * float(np.mean(ious))


def gap(args):
    import keras

    from klseg import models
    from klseg.data import synthetic

    size, classes = args.image_size, synthetic.NUM_CLASSES
    source = synthetic._generate("source", args.num_train, size, args.seed, "train")
    target = synthetic._generate(
        "target", args.num_target_train, size, args.seed, "train"
    )
    val = {
        domain: synthetic._generate(domain, args.num_val, size, args.seed, "val")
        for domain in synthetic.DOMAINS
    }

    def fresh():
        model = models.unet(classes, base_filters=args.base_filters, depth=args.depth)
        return model

    def fit(model, data, epochs, learning_rate):
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(*data, batch_size=args.batch, epochs=epochs, verbose=0)
        return model

    def scores(model):
        return {d: mean_iou(model, *val[d], classes) for d in synthetic.DOMAINS}

    rows = []
    keras.utils.set_random_seed(args.seed)
    trained = fit(fresh(), source, args.source_epochs, 2e-3)
    rows.append((f"source model ({args.source_epochs} epochs)", scores(trained)))
    weights = trained.get_weights()
    for epochs in args.finetune_epochs:
        keras.utils.set_random_seed(args.seed)
        student = fresh()
        student.set_weights(weights)
        fit(student, target, epochs, 1e-3)
        rows.append((f"plain fine-tuning ({epochs} epochs)", scores(student)))
    for epochs in args.finetune_epochs:
        keras.utils.set_random_seed(args.seed)
        scratch = fit(fresh(), target, epochs, 2e-3)
        rows.append(
            (f"target images only, from scratch ({epochs} epochs)", scores(scratch))
        )

    print(
        f"{size}x{size}; U-Net base_filters={args.base_filters} depth={args.depth}; "
        f"{args.num_train} source / {args.num_target_train} target training "
        f"images, {args.num_val} validation images per domain, batch {args.batch}"
    )
    print()
    print("| model | source mIoU | target mIoU |")
    print("|---|---:|---:|")
    for name, score in rows:
        print(f"| {name} | {score['source']:.1f} | {score['target']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("throughput", help="pipeline vs training rate")
    speed.add_argument("--size", type=int, default=256)
    speed.add_argument("--batch", type=int, default=8)
    speed.add_argument("--images", type=int, default=64)
    speed.add_argument("--batches", type=int, default=24)
    speed.add_argument("--warmup-batches", type=int, default=8)
    speed.add_argument("--train-steps", type=int, default=4)
    speed.add_argument("--repeats", type=int, default=3)
    domain = commands.add_parser("gap", help="domain gap of the synthetic data")
    domain.add_argument("--image-size", type=int, default=64)
    domain.add_argument("--num-train", type=int, default=192)
    domain.add_argument("--num-target-train", type=int, default=32)
    domain.add_argument("--num-val", type=int, default=48)
    domain.add_argument("--base-filters", type=int, default=16)
    domain.add_argument("--depth", type=int, default=3)
    domain.add_argument("--batch", type=int, default=16)
    domain.add_argument("--source-epochs", type=int, default=12)
    domain.add_argument("--finetune-epochs", type=int, nargs="+", default=[8, 30])
    domain.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"throughput": throughput, "gap": gap}[args.command](args)


if __name__ == "__main__":
    main()
