"""Whole-image, tiled and flip test-time inference on larger images.

Generates the built-in synthetic benchmark (``klseg.data.synthetic``, source
domain) at ``--size`` (default 256x256), trains a U-Net on random
``--crop`` x ``--crop`` crops of the training scenes (default 64, the same
pixel scale as the large images) for a fixed number of steps with a fixed
seed, then scores the validation scenes at the full size with:

- ``whole``: the whole image in one forward pass (the baseline);
- ``whole`` + flip: the same with horizontal-flip TTA;
- ``tiled``: windows of the training size (``--tile``, default ``--crop``)
  at each overlap of ``--overlaps`` (default 0 and 0.5), blended by
  ``klseg.inference``;
- ``tiled`` + flip: the largest overlap with flip TTA.

Every score comes from the one evaluation path
(``klseg.runs.scoring.evaluate_model``: confusion counts over all
validation pixels, then mean IoU and pixel accuracy), with the forward
function ``klseg.runs.scoring.inference_function(model, options)`` builds
for each mode. Images go one at a time; the time per image is the median
over the validation images (each mode is warmed up on one image first, so
tracing is not timed) and its ratio to the whole-image median. The windows
per image are counted by running ``klseg.inference.predict_probabilities``
with a forward that only counts.

Usage::

    python benchmarks/bench_tiled.py                 # about 12 min on 2 cores
    python benchmarks/bench_tiled.py --size 256 --crop 128 --steps 200
    python benchmarks/bench_tiled.py --size 32 --crop 16 --tile 32 \
        --train-images 2 --val-images 2 --steps 0 --base-filters 4 --depth 2
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def random_crops(images, masks, crop, per_image, seed):
    """``per_image`` random ``crop`` x ``crop`` windows of every scene."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size = images.shape[1]
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        for _ in range(per_image):
            y, x = rng.integers(0, size - crop + 1, size=2)
            out_images.append(image[y : y + crop, x : x + crop])
            out_masks.append(mask[y : y + crop, x : x + crop])
    return np.stack(out_images), np.stack(out_masks)


def train(args, images, masks):
    """A U-Net trained on crops for ``args.steps`` steps; returns it and logs."""
    import keras

    from klseg import losses, models
    from klseg.data import make_dataset
    from klseg.data.synthetic import CLASS_NAMES, NUM_CLASSES

    keras.utils.set_random_seed(args.seed)
    crops = random_crops(images, masks, args.crop, args.crops_per_image, args.seed)
    model = models.build(
        "unet",
        num_classes=NUM_CLASSES,
        base_filters=args.base_filters,
        depth=args.depth,
        class_names=list(CLASS_NAMES),
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=losses.SparseKLDivergence(ignore_class=255),
    )
    start = time.perf_counter()
    loss = None
    if args.steps:  # --steps 0 scores the untrained model (a smoke run)
        dataset = make_dataset(
            crops,
            batch_size=args.batch,
            image_size=args.crop,
            augment=args.augment,
            shuffle=True,
            repeat=True,
            seed=args.seed,
            num_classes=NUM_CLASSES,
        )
        history = model.fit(
            dataset, epochs=1, steps_per_epoch=args.steps, shuffle=False, verbose=0
        )
        loss = round(float(history.history["loss"][-1]), 4)
    return model, {
        "train_s": time.perf_counter() - start,
        "final_loss": loss,
        "params_m": model.count_params() / 1e6,
        "train_crops": len(crops[0]),
    }


def count_windows(model, image, options):
    """Model calls' windows for one image under ``options`` (no model run)."""
    import numpy as np

    from klseg import inference

    seen = []

    def forward(batch):
        seen.append(len(batch))
        return np.zeros((*batch.shape[:3], 2), dtype="float32")

    inference.predict_probabilities(model, image, forward=forward, **options)
    return sum(seen)


def score(model, images, masks, options):
    """Scores (one evaluation path) and per-image seconds of one mode."""
    import keras

    from klseg.data.synthetic import CLASS_NAMES, NUM_CLASSES
    from klseg.runs.scoring import evaluate_model, inference_function

    forward = inference_function(model, options)
    forward(images[:1])  # trace outside the timing
    seconds = []

    def timed(batch):
        start = time.perf_counter()
        out = keras.ops.convert_to_numpy(forward(batch))
        seconds.append(time.perf_counter() - start)
        return out

    one_by_one = ((images[i : i + 1], masks[i : i + 1]) for i in range(len(images)))
    result = evaluate_model(
        model,
        one_by_one,
        num_classes=NUM_CLASSES,
        class_names=CLASS_NAMES,
        forward=timed,
    )
    return result, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="evaluation side")
    parser.add_argument("--crop", type=int, default=64, help="training crop side")
    parser.add_argument("--tile", type=int, help="window side (default --crop)")
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--crops-per-image", type=int, default=8)
    parser.add_argument("--val-images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--augment", default="light")
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)
    tile = args.tile or args.crop

    import keras

    from klseg.data import synthetic
    from klseg.inference import InferenceOptions

    count = args.train_images + args.val_images
    images, masks = synthetic.generate(
        "source", count, image_size=args.size, seed=args.seed
    )
    train_images, train_masks = images[: args.train_images], masks[: args.train_images]
    val_images, val_masks = images[args.train_images :], masks[args.train_images :]
    model, train_log = train(args, train_images, train_masks)

    modes = [("whole", None, 0.0, "none"), ("whole", None, 0.0, "flip")]
    modes += [("tiled", tile, overlap, "none") for overlap in args.overlaps]
    modes.append(("tiled", tile, max(args.overlaps), "flip"))
    header = {
        "backend": keras.backend.backend(),
        "size": f"{args.size}x{args.size}",
        "model": f"unet(base_filters={args.base_filters}, depth={args.depth})",
        "params_m": round(train_log["params_m"], 2),
        "train": f"{args.steps} steps x {args.batch} crops of {args.crop}x{args.crop}",
        "augment": args.augment,
        "train_crops": train_log["train_crops"],
        "train_s": round(train_log["train_s"], 1),
        "final_loss": train_log["final_loss"],
        "val_images": args.val_images,
        "seed": args.seed,
    }
    print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    print(
        "| mode | tile | overlap | TTA | windows / image | mIoU | pixel accuracy "
        "| s / image (median) | time vs whole |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for mode, tile_side, overlap, tta in modes:
        options = InferenceOptions(tile_size=tile_side, tile_overlap=overlap, tta=tta)
        windows = count_windows(model, val_images[:1], options.inference_kwargs())
        result, seconds = score(model, val_images, val_masks, options)
        median = statistics.median(seconds)
        baseline = rows[0]["s_per_image"] if rows else median
        row = {
            "mode": mode,
            "tile": f"{tile_side}x{tile_side}" if tile_side else "-",
            "overlap": overlap,
            "tta": tta,
            "windows_per_image": windows,
            "mean_iou": result["mean_iou"],
            "pixel_accuracy": result["pixel_accuracy"],
            "s_per_image": median,
            "time_vs_whole": median / baseline,
        }
        rows.append(row)
        name = f"{mode} (baseline)" if not rows[1:] else mode
        print(
            f"| {name} | {row['tile']} | {overlap:g} | {tta} | {windows} "
            f"| {row['mean_iou']:.4f} | {row['pixel_accuracy']:.4f} "
            f"| {median:.3f} | {row['time_vs_whole']:.2f}x |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
