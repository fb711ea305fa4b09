"""Distillation benchmark: how much of the teacher-student gap the KL closes.

On the built-in synthetic scenes (``klseg.data.synthetic``, source domain)
at ``--size`` (128x128 by default):

1. a teacher (``--teacher``, by default a U-Net with a ResNet50 encoder) is
   trained on ``--teacher-images`` labelled images (or loaded from
   ``--cache``);
2. a student (a U-Net with ``--student-filters`` base filters, a few per
   cent of the teacher's parameters) is trained from scratch, with the same
   seed, steps and learning rate, three ways:

   - ``plain``: task loss alone, on the ``--labelled`` labelled images
     (repeated to fill the same number of steps);
   - ``pixel``: ``klseg.distill.DistillationModel(kl_type="pixel")`` on the
     labelled images plus ``--unlabelled`` unlabelled ones;
   - ``channel``: the same with ``kl_type="channel"``;

3. every model is scored on ``--val`` validation images (mean IoU from one
   confusion matrix) and timed (inference images per second on this
   machine, ``klseg.runs.distill.images_per_second``: the median of
   ``--repeats`` rounds in which the models take turns, each a warm-up pass
   and a timed pass over the validation images).

The table gives each model's parameters, mIoU, images/s, and for the KL
students the fraction of the plain student's gap to the teacher they close:
``(mIoU_kl - mIoU_plain) / (mIoU_teacher - mIoU_plain)``.

Usage::

    python benchmarks/bench_distill.py [--epochs 20 --cache teacher.keras]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TEACHERS = {
    "unet-resnet50": ("unet", {"backbone": "resnet50"}),
    "deeplabv3_plus": ("deeplabv3_plus", {}),
    "unet-32": ("unet", {"base_filters": 32}),
    "unet-16": ("unet", {"base_filters": 16}),
    "unet-4": ("unet", {"base_filters": 4, "depth": 2}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="unet-16")
    p.add_argument("--teacher-images", type=int, default=256)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--student-filters", type=int, default=6)
    p.add_argument("--student-depth", type=int, default=4)
    p.add_argument("--labelled", type=int, default=16)
    p.add_argument("--unlabelled", type=int, default=200)
    p.add_argument("--val", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=None)
    p.add_argument(
        "--temperature", type=float, default=None, help="default: the kl_type's"
    )
    p.add_argument("--variants", default="plain,pixel,channel")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (images/s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="teacher .keras file: loaded if it exists")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def _data(args):
    from klseg.data import synthetic

    gen, size = synthetic.generate, args.size
    n_lab, n_unl = args.labelled, args.unlabelled
    x, y = gen("source", n_lab + n_unl, image_size=size, seed=args.seed + 1)
    y = y.astype("int32")
    y[n_lab:] = 255  # the unlabelled images
    tx, ty = gen("source", args.teacher_images, image_size=size, seed=args.seed)
    vx, vy = gen("source", args.val, image_size=size, seed=args.seed + 2)
    return {
        "teacher": (tx, ty.astype("int32")),
        "student": (x, y),
        "val": (vx, vy.astype("int32")),
    }


def _compile(model, keras, lr):
    from klseg import losses

    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=losses.SparseKLDivergence(ignore_class=255),
    )
    return model


def _teacher(args, keras, data):
    from klseg import models
    from klseg.data import synthetic

    if args.cache and os.path.exists(args.cache):
        print(f"teacher loaded from {args.cache}", flush=True)
        return keras.saving.load_model(args.cache, compile=False), None
    name, kwargs = TEACHERS[args.teacher]
    keras.utils.set_random_seed(args.seed)
    model = models.build(
        name,
        num_classes=synthetic.NUM_CLASSES,
        class_names=list(synthetic.CLASS_NAMES),
        **kwargs,
    )
    _compile(model, keras, args.lr)
    images, masks = data["teacher"]
    start = time.perf_counter()
    if args.teacher_epochs:  # 0: an untrained teacher (a smoke test)
        model.fit(
            images, masks, batch_size=args.batch, epochs=args.teacher_epochs, verbose=0
        )
    seconds = time.perf_counter() - start
    print(f"teacher {args.teacher} trained in {seconds:.0f} s", flush=True)
    if args.cache:
        model.save(args.cache)
    return model, seconds


def _student(args, keras, variant, teacher, data):
    from klseg import models
    from klseg.data import synthetic
    from klseg.distill import DEFAULT_KL_WEIGHT, DistillationModel

    keras.utils.set_random_seed(args.seed)
    student = models.unet(
        synthetic.NUM_CLASSES,
        base_filters=args.student_filters,
        depth=args.student_depth,
        class_names=list(synthetic.CLASS_NAMES),
    )
    x, y = data["student"]
    steps = -(-len(x) // args.batch)
    if variant == "plain":
        # The labelled images only, repeated to fill the same steps.
        index = [i % args.labelled for i in range(steps * args.batch)]
        x, y = x[index], y[index]
        model = _compile(student, keras, args.lr)
    else:
        kl_weight = DEFAULT_KL_WEIGHT if args.kl_weight is None else args.kl_weight
        model = _compile(
            DistillationModel(
                student,
                teacher,
                kl_weight=kl_weight,
                temperature=args.temperature,
                kl_type=variant,
            ),
            keras,
            args.lr,
        )
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=args.batch,
        epochs=args.epochs,
        steps_per_epoch=steps,
        shuffle=True,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    print(f"student {variant} trained in {seconds:.0f} s", flush=True)
    return student, seconds


def _score(model, data, args):
    from klseg import evaluation
    from klseg.data import synthetic

    images, masks = data["val"]
    scores = evaluation.evaluate(
        model,
        (images, masks),
        num_classes=synthetic.NUM_CLASSES,
        ignore_value=255,
        batch_size=args.batch,
    )
    return {
        "parameters": int(model.count_params()),
        "mean_iou": float(scores["mean_iou"]),
    }


def _speeds(trained, data, args):
    """Images/s of every model: ``--repeats`` rounds, the models interleaved
    in each (so load changes on a shared machine hit them alike), each round
    ``klseg.runs.distill.images_per_second`` (a warm-up pass, then one timed
    pass); the median over rounds."""
    import statistics

    from klseg.runs.distill import images_per_second

    images = data["val"][0]
    rounds = {name: [] for name in trained}
    for _ in range(args.repeats):
        for name, model in trained.items():
            rounds[name].append(
                images_per_second(model, images, batch_size=args.batch, repeats=1)
            )
    return {name: statistics.median(values) for name, values in rounds.items()}


def main(argv=None):
    args = parse_args(argv)
    import keras

    started = time.perf_counter()
    data = _data(args)
    teacher, teacher_seconds = _teacher(args, keras, data)
    results = {"teacher": {**_score(teacher, data, args), "seconds": teacher_seconds}}
    trained = {"teacher": teacher}
    for variant in args.variants.split(","):
        student, seconds = _student(args, keras, variant, teacher, data)
        results[variant] = {**_score(student, data, args), "seconds": seconds}
        trained[variant] = student
    for name, speed in _speeds(trained, data, args).items():
        results[name]["images_per_second"] = speed
    gap = results["teacher"]["mean_iou"] - results.get("plain", {}).get(
        "mean_iou", float("nan")
    )
    print(
        f"\n{args.size}x{args.size} synthetic scenes; teacher {args.teacher} "
        f"({args.teacher_images} labelled images, {args.teacher_epochs} epochs); "
        f"students U-Net base_filters={args.student_filters} "
        f"depth={args.student_depth}, {args.labelled} labelled + "
        f"{args.unlabelled} unlabelled images, {args.epochs} epochs, seed "
        f"{args.seed}, backend {keras.backend.backend()}\n"
    )
    print("| model | parameters | mIoU | images/s | gap closed | train s |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        closed = "-"
        if name not in ("teacher", "plain") and "plain" in results and gap > 0:
            row["gap_closed"] = (row["mean_iou"] - results["plain"]["mean_iou"]) / gap
            closed = f"{row['gap_closed']:.2f}"
        label = f"teacher ({args.teacher})" if name == "teacher" else name
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        print(
            f"| {label} | {row['parameters']:,} | {row['mean_iou']:.4f} | "
            f"{row['images_per_second']:.1f} | {closed} | {seconds} |"
        )
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
