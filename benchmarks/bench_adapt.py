"""No target labels: self-training, AdaBN and TENT against few-label fine-tuning.

On the built-in synthetic two-domain benchmark (strong domain gap: the
target domain reuses source colours for other classes, so the source model
is confidently wrong there), a small U-Net is trained once on
``--source-images`` labelled source images (the recipe and ``--cache`` of
``bench_fewlabel.py``), then adapted to the target domain with no target
label (every row but the last):

- ``source``: the source model as is.
- ``adabn``: ``klseg.adaptation.adapt_batchnorm`` on a copy of it: the
  BatchNorm statistics of the ``--unlabelled`` target images (one pass in
  batches of ``--batch``), no gradient.
- ``tent``: ``TentModel`` (entropy minimisation over the BatchNorm scales and
  offsets) for ``--steps`` steps on unlabelled target batches (Adam,
  ``--tent-lr``), then ``adapt_batchnorm`` on the target images so that the
  inference statistics are the target's; its student is scored.
- ``sf``: source-free self-training (``SelfTrainingModel``,
  ``cross_domain_mix=False``): x = a target batch as ``"images"`` (masks all
  255: the KL term to the source model, ``--kl-weight``, is on these target
  images) and a second, independently drawn target batch as
  ``"unlabeled_images"`` (the EMA teacher's pseudo-labels, ClassMix between
  target images, ``--sf-ema-decay``, ``--sf-consistency-threshold``,
  ``--balance-weight``, ``--freeze-classifier``). ``sf_nokl``: the same
  with ``kl_weight=0``.
- ``uda``: unsupervised domain adaptation (DACS-like): x = a labelled source
  batch as ``"images"`` (its masks as y; the KL term is on these source
  images) and a target batch as ``"unlabeled_images"``;
  ``cross_domain_mix=True`` pastes half the classes of each source image,
  with their labels, onto a target image (``--ema-decay``,
  ``--consistency-threshold``). ``uda_nokl``: ``kl_weight=0``.
  ``uda_style``: ``uda`` with the source images restyled towards the
  target images every step (``klseg.data.style.DomainStyle(--style)``,
  seeded by the seed and the step) before flipping. ``uda_colour``: the
  same with ``klseg.data.style.ColourRandomization`` (each source image's
  colour channels permuted at random, 30% of them inverted: domain
  randomisation) instead of restyling.
- ``plain48``: the reference with labels: plain fine-tuning
  (``KLRegularizedModel``, ``kl_weight=0``, ``--plain-student-bn``) on 48
  labelled target images.

Self-training rows are scored as the EMA teacher (the model to save), with
its student beside it. Every trained run takes ``--steps`` optimizer steps
(Adam, ``--lr``; ``--tent-lr`` for TENT) of batch ``--batch``: images in a
seeded random order, cycled, flipped left-right at random (masks alike).
Each seed draws the batch order and the model's random state
(``keras.utils.set_random_seed(seed)``, ``numpy.random.default_rng(seed)``,
``seed=seed + 1`` for the strong views); the source model and the
validation sets (``--val`` images per domain) are shared. Scores: mean IoU,
one confusion matrix per domain; the table gives the mean over seeds and the
(min-max) range. Each run's line gives its seconds and seconds per step
(after the first, traced, step) and, for self-training, over the last tenth
of the steps: the share of confident target pixels (``confident_share``),
the normalised entropy of the teacher's pseudo-label class shares
(``pseudo_class_entropy``: 1 balanced, 0 a single class) and the number of
classes the pseudo-labels lost against the source model's predictions on
the target images (``lost_classes``). Two target lines follow the table:
(1) ``uda`` within 5 target points of ``plain48`` and within 1 source
point of the source model; (2) ``sf`` at least half way from the source
model's target mIoU to ``plain48``'s, with no collapse (collapse: a seed's
EMA-teacher target mIoU below the source model's).

The defaults come from a 300-step pilot on seed 0 (source model 96.9 /
9.9 source / target mIoU; EMA teacher, source / target):

- ``uda``: KL weight 1 (0.3: 98.8 / 9.0), EMA decay 0.99 with threshold
  0.968 (0.97 with 0.9: 98.2 / 14.8; frozen student BatchNorm: 97.8 /
  13.9) gave 97.9 / 19.9, the best target with the source kept.
- ``sf``: EMA decay 0.97 with threshold 0.9 gave 53.1 / 10.2 (KL weight
  0.3: 10.2 target; frozen BatchNorm: 10.3); 0.99 with 0.968 fell to 9.3,
  below the source model (collapse by the definition above).

Usage::

    python benchmarks/bench_adapt.py --cache /tmp/bench_adapt_source.keras \
        --json adapt.json
    # all rows, 3 seeds, 300 steps: about 45 min on a shared 2-core CPU
    # (0.35-0.45 s per self-training step, 0.11 TENT, 0.14 plain; 20-45 s
    # to trace each run's first step); about 1 min more to train the source
    # model when the cache is absent.
    python benchmarks/bench_adapt.py --seeds 0 --variants uda sf \
        --ema-decay 0.97 --consistency-threshold 0.9    # one variation
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

VARIANTS = (
    "source",
    "adabn",
    "tent",
    "sf",
    "sf_nokl",
    "uda",
    "uda_nokl",
    "uda_style",
    "uda_colour",
    "plain48",
)
SELF_TRAINING = ("sf", "sf_nokl", "uda", "uda_nokl", "uda_style", "uda_colour")
UDA = ("uda", "uda_nokl", "uda_style", "uda_colour")
NAMES = {
    "source": "none (the source model)",
    "adabn": "AdaBN: BatchNorm statistics of the target images",
    "tent": "TENT (entropy, BatchNorm scales and offsets), then AdaBN",
    "sf": "source-free self-training + KL to source on target images",
    "sf_nokl": "source-free self-training, no KL term",
    "uda": "UDA self-training (cross-domain ClassMix) + KL on source images",
    "uda_nokl": "UDA self-training, no KL term",
    "uda_style": "UDA self-training + KL, source images restyled",
    "uda_colour": "UDA self-training + KL, source colours randomised",
    "plain48": "plain fine-tuning on 48 labelled target images (reference)",
}
PLAIN_LABELS = 48


def _data(args):
    from klseg.data import synthetic

    gen, size = synthetic.generate, args.size
    src_x, src_y = gen("source", args.source_images, image_size=size, seed=0)
    tgt_x, tgt_y = gen("target", PLAIN_LABELS, image_size=size, seed=1)
    return {
        "source_train": (src_x, src_y.astype("int32")),
        "target_pool": (tgt_x, tgt_y.astype("int32")),
        "target_unlabelled": gen("target", args.unlabelled, image_size=size, seed=3)[0],
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
    model.fit(images, masks, batch_size=16, epochs=args.source_epochs, verbose=0)
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


def _one_pass(images, batch, rng):
    """The images once, in batches of a seeded random order (for AdaBN)."""
    order = rng.permutation(len(images))
    return [images[order[i : i + batch]] for i in range(0, len(images), batch)]


def _entropy(shares):
    """Normalised entropy ``H(shares) / log K`` of a share vector."""
    total = float(sum(shares))
    if total <= 0:
        return 0.0
    h = -sum(s / total * math.log(s / total) for s in shares if s > 0)
    return h / math.log(max(len(shares), 2))


def _self_training(args, source, student, variant, seed, reference):
    from klseg.adaptation import SelfTrainingModel, freeze_classifier

    uda = variant.startswith("uda")
    if not uda and args.freeze_classifier:
        freeze_classifier(student)
    model = SelfTrainingModel(
        student,
        source,
        cross_domain_mix=uda,
        kl_weight=0.0 if variant.endswith("_nokl") else args.kl_weight,
        temperature=args.temperature,
        consistency_weight=args.consistency_weight,
        ema_decay=args.ema_decay if uda else args.sf_ema_decay,
        consistency_threshold=(
            args.consistency_threshold if uda else args.sf_consistency_threshold
        ),
        consistency_rampup=args.consistency_rampup,
        mix=args.mix,
        balance_weight=0.0 if uda else args.balance_weight,
        student_bn=args.student_bn,
        seed=seed + 1,
    )
    # The collapse signal (lost_classes) compares with the source model's
    # class shares on the target images.
    model.set_reference_shares(reference)
    return model


def _one_run(args, keras, source, data, variant, seed, style=None):
    """(scores, seconds, logs) of one adapted model."""
    import numpy as np
    from keras import ops

    from klseg import losses
    from klseg.adaptation import TentModel, adapt_batchnorm
    from klseg.finetune import KLRegularizedModel, clone_student, evaluate_domains

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    target = data["target_unlabelled"]
    student = clone_student(source)
    batch = args.batch
    if variant == "adabn":
        start = time.perf_counter()
        adapt_batchnorm(student, _one_pass(target, batch, rng))
        seconds = time.perf_counter() - start
        return {"student": evaluate_domains(student, data["val"])}, seconds, {}
    if variant == "tent":
        model = TentModel(student, source, temperature=args.temperature)
        lr = args.tent_lr
    elif variant == "plain48":
        model = KLRegularizedModel(
            student,
            source,
            kl_weight=0.0,
            temperature=args.temperature,
            student_bn=args.plain_student_bn,
        )
        lr = args.lr
    else:
        model = _self_training(
            args, source, student, variant, seed, data["reference_shares"]
        )
        lr = args.lr
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=losses.SparseKLDivergence(ignore_class=255),
    )
    ignore = np.full((batch, args.size, args.size), 255, "int32")
    labelled_x, labelled_y = (
        data["source_train"] if variant.startswith("uda") else data["target_pool"]
    )
    labelled = _Batches(len(labelled_x), batch, rng)
    first = _Batches(len(target), batch, rng)
    second = _Batches(len(target), batch, rng)
    window = max(1, args.steps // 10)
    confident, shares, logs = [], None, {}
    start = time.perf_counter()
    for step in range(args.steps):
        if variant == "plain48" or variant in UDA:
            i = labelled.next()
            images = labelled_x[i]
            if style is not None:
                images = style(images, seed=1_000_000 * seed + step)
            images, masks = _flip(rng, images, labelled_y[i])
        else:
            (images,) = _flip(rng, target[first.next()])
            masks = ignore[: len(images)]
        x = images
        if variant in SELF_TRAINING:
            (unlabelled,) = _flip(rng, target[second.next()])
            x = {"images": images, "unlabeled_images": unlabelled}
        logs = model.train_on_batch(x, masks, return_dict=True)
        if step == 0:
            first_step = time.perf_counter() - start
        if variant in SELF_TRAINING and step >= args.steps - window:
            # train_on_batch resets the metrics: these are the step's own.
            confident.append(float(logs["confident_share"]))
            step_shares = model.pseudo_label_shares()
            shares = step_shares if shares is None else shares + step_shares
    per_step = (time.perf_counter() - start - first_step) / max(args.steps - 1, 1)
    if variant == "tent":
        # Inference statistics of the target images, not the last batches'.
        adapt_batchnorm(model.student, _one_pass(target, batch, rng))
    seconds = time.perf_counter() - start
    scores = {"student": evaluate_domains(model.student, data["val"])}
    extra = {
        "first_step_seconds": round(first_step, 2),
        "seconds_per_step": per_step,
        "final_logs": {k: float(v) for k, v in logs.items()},
    }
    if variant in SELF_TRAINING:
        scores = {"ema": evaluate_domains(model.ema_model, data["val"]), **scores}
        extra["last_steps"] = window
        extra["confident_share"] = statistics.mean(confident)
        extra["pseudo_class_entropy"] = _entropy([float(s) for s in shares])
        extra["pseudo_class_shares"] = [round(float(s) / window, 4) for s in shares]
        lost = model.lost_classes(ops.convert_to_tensor(shares / window))
        extra["lost_classes"] = int(np.sum(ops.convert_to_numpy(lost)))
    return scores, seconds, extra


def _class_shares(model, images):
    """The share of the pixels of ``images`` that ``model`` gives each class."""
    import numpy as np

    logits = model.predict(images, batch_size=32, verbose=0)
    counts = np.bincount(logits.argmax(-1).ravel(), minlength=logits.shape[-1])
    return (counts / counts.sum()).astype("float32")


def _summary(values):
    values = [100 * v for v in values]
    return statistics.mean(values), min(values), max(values)


def _cell(values):
    mean, low, high = _summary(values)
    return f"{mean:.1f} ({low:.1f}-{high:.1f})"


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--size", type=int, default=64)
    add("--base-filters", type=int, default=8)
    add("--depth", type=int, default=3)
    add("--source-images", type=int, default=256, help="source training set")
    add("--source-epochs", type=int, default=10)
    add("--unlabelled", type=int, default=200, help="unlabelled target images")
    add("--val", type=int, default=64, help="validation images per domain")
    add("--steps", type=int, default=300)
    add("--batch", type=int, default=8)
    add("--lr", type=float, default=3e-3)
    add("--tent-lr", type=float, default=1e-3)
    add("--kl-weight", type=float, default=1.0)
    add("--temperature", type=float, default=2.0)
    add("--consistency-weight", type=float, default=1.0)
    add("--ema-decay", type=float, default=0.99, help="uda variants")
    add("--consistency-threshold", type=float, default=0.968, help="uda variants")
    add("--sf-ema-decay", type=float, default=0.97, help="sf variants")
    add("--sf-consistency-threshold", type=float, default=0.9, help="sf variants")
    add("--consistency-rampup", type=int, default=100)
    add("--mix", default="classmix", choices=("classmix", "cutmix", "none"))
    add("--balance-weight", type=float, default=0.0, help="sf only")
    add("--freeze-classifier", action="store_true", help="sf only (SHOT)")
    add("--student-bn", default="trainable", choices=("trainable", "frozen"))
    add(
        "--plain-student-bn",
        default="trainable",
        choices=("trainable", "frozen"),
        help="student_bn of the plain48 reference",
    )
    add("--style", default="histogram", choices=("histogram", "fda", "pda"))
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add("--cache", help="save/load the source model here (.keras)")
    add("--json", help="also write every run's scores here")
    return parser


def _run_line(variant, seed, scores, seconds, extra):
    line = " ".join(
        f"{who} source {100 * s['source_mean_iou']:5.1f} target "
        f"{100 * s['target_mean_iou']:5.1f}"
        for who, s in scores.items()
    )
    per_step = ""
    if "seconds_per_step" in extra:
        per_step = f", {extra['seconds_per_step']:.3f} s/step after the first"
    tail = ""
    if "confident_share" in extra:
        tail = (
            f" confident_share {extra['confident_share']:.3f} "
            f"pseudo_class_entropy {extra['pseudo_class_entropy']:.3f} "
            f"lost_classes {extra['lost_classes']}"
        )
    return f"{variant:<9} seed={seed} {line} ({seconds:.0f} s{per_step}){tail}"


def _table(args, base, runs):
    print()
    print(
        f"{args.steps} steps of batch {args.batch} per trained run; mean over "
        f"seeds {args.seeds} with the (min-max) range; mIoU in %."
    )
    print()
    print(
        "| labelled target images | adaptation | source val mIoU | "
        "target val mIoU | seconds |"
    )
    print("|---:|---|---:|---:|---:|")
    means = {}
    for variant in args.variants:
        labels = PLAIN_LABELS if variant == "plain48" else 0
        if variant == "source":
            print(
                f"| 0 | {NAMES['source']} | {100 * base['source_mean_iou']:.1f} | "
                f"{100 * base['target_mean_iou']:.1f} | - |"
            )
            continue
        rows = [r for r in runs if r["variant"] == variant]
        seconds = statistics.mean(r["seconds"] for r in rows)
        whos = ["ema", "student"] if variant in SELF_TRAINING else ["student"]
        for who in whos:
            source_m = [r[who]["source_mean_iou"] for r in rows]
            target_m = [r[who]["target_mean_iou"] for r in rows]
            name = NAMES[variant]
            if variant in SELF_TRAINING:
                name += ", EMA teacher" if who == "ema" else ", its student"
            means[(variant, who)] = (_summary(source_m)[0], _summary(target_m)[0])
            means[(variant, who, "targets")] = [100 * v for v in target_m]
            print(
                f"| {labels} | {name} | {_cell(source_m)} | {_cell(target_m)} | "
                f"{seconds:.0f} |"
            )
    return means


def _targets(base, means):
    """The two targets of the issue, met or not, with their numbers."""
    src, tgt = 100 * base["source_mean_iou"], 100 * base["target_mean_iou"]
    plain = means.get(("plain48", "student"))
    print()
    rows = [v for v in UDA if v != "uda_nokl" and means.get((v, "ema"))]
    for variant in rows if plain else ():
        uda = means[(variant, "ema")]
        gap, kept = plain[1] - uda[1], src - uda[0]
        met = gap <= 5 and kept <= 1
        print(
            f"(1) UDA ({variant}, EMA teacher): target {uda[1]:.1f}, {gap:.1f} points "
            f"below plain fine-tuning on {PLAIN_LABELS} labels ({plain[1]:.1f}; "
            f"within 5: {'yes' if gap <= 5 else 'no'}); source {uda[0]:.1f}, "
            f"{kept:.1f} below the source model ({src:.1f}; within 1: "
            f"{'yes' if kept <= 1 else 'no'}): {'met' if met else 'not met'}."
        )
    if not (rows and plain):
        print("(1) UDA: needs a uda row and the plain48 row.")
    sf = means.get(("sf", "ema"))
    if sf and plain:
        need = tgt + 0.5 * (plain[1] - tgt)
        collapsed = [t for t in means[("sf", "ema", "targets")] if t < tgt]
        met = sf[1] >= need and not collapsed
        print(
            f"(2) source-free (sf, EMA teacher): target {sf[1]:.1f} against "
            f"{need:.1f} needed (source model {tgt:.1f} + half the way to "
            f"{plain[1]:.1f}; {'reached' if sf[1] >= need else 'not reached'}); "
            f"collapse (a seed's target below the source model's {tgt:.1f}): "
            f"{len(collapsed)} seed(s)"
            f"{' ' + str([round(t, 1) for t in collapsed]) if collapsed else ''}"
            f": {'met' if met else 'not met'}."
        )
    else:
        print("(2) source-free: needs the sf and plain48 rows.")


def main(argv=None):
    args = _parser().parse_args(argv)

    import keras

    started = time.perf_counter()
    data = _data(args)
    source = _source_model(args, keras, data)
    from klseg.finetune import evaluate_domains

    base = evaluate_domains(source, data["val"])
    data["reference_shares"] = _class_shares(source, data["target_unlabelled"])
    print(
        f"source model: source {100 * base['source_mean_iou']:.1f} / target "
        f"{100 * base['target_mean_iou']:.1f} mIoU",
        flush=True,
    )
    from klseg.data.style import ColourRandomization, DomainStyle

    styles = {"uda_colour": ColourRandomization()}
    if "uda_style" in args.variants:
        styles["uda_style"] = DomainStyle(args.style, data["target_unlabelled"])
    runs = []
    for variant in args.variants:
        if variant == "source":
            continue
        for seed in args.seeds:
            scores, seconds, extra = _one_run(
                args,
                keras,
                source,
                data,
                variant,
                seed,
                style=styles.get(variant),
            )
            runs.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "seconds": round(seconds, 1),
                    **scores,
                    **extra,
                }
            )
            print(
                _run_line(variant, seed, scores, seconds, extra),
                flush=True,
            )
    means = _table(args, base, runs)
    _targets(base, means)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "settings": vars(args),
                    "source_model": base,
                    "source_target_shares": data["reference_shares"].tolist(),
                    "runs": runs,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    sys.exit(main())
