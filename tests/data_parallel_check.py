"""Run by tests/test_jax.py in a fresh process with two host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, JAX backend): each
training wrapper under ``keras.distribution.DataParallel`` against the same
steps on one device (the largest weight difference and both runs' losses),
then each job with ``strategy="mirrored"`` (DataParallel on JAX) against the
same job on one device: the devices its distribution spans and the largest
difference of the saved weights (the runs' folders, ``JOB_default`` and
``JOB_mirrored``, stay in the folder given). Prints one JSON object.

The distillation job runs at a learning rate of 3e-4: at its default of
1e-3 the two runs end 2e-4 apart in the weights (float sums in another
order, grown by training; the TensorFlow comparison in
tests/multi_worker_check.py measured the same), at 3e-4 4e-7 apart.
"""

import json
import sys
from pathlib import Path

import jax
import keras
import numpy as np
from helpers import (
    adapt_config,
    distill_config,
    finetune_config,
    tiny_unet,
    train_config,
)

from klseg import finetune, losses, metrics, runs
from klseg.consistency import MeanTeacherModel
from klseg.data import synthetic
from klseg.distill import DistillationModel

CLASSES = 6


def _arrays():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3)).astype("float32")
    masks = rng.integers(0, CLASSES, (8, 32, 32)).astype("int32")
    masks[:, :4] = 255  # ignored pixels, unevenly spread over the batch
    masks[:2] = 255
    other = rng.integers(0, 255, (2, 8, 32, 32, 3)).astype("float32")
    return images, masks, other[0], other[1]


def _wrapper(kind):
    source = tiny_unet(CLASSES, 0, base_filters=4, depth=2)
    student = finetune.clone_student(source)
    common = {"kl_weight": 0.5, "kl_inputs": "source"}
    if kind == "kl":
        return finetune.KLRegularizedModel(student, source, **common)
    if kind == "mean_teacher":
        return MeanTeacherModel(
            student, source, **common, consistency_weight=1.0,
            consistency_threshold=0.0, seed=1,
        )  # fmt: skip
    small = tiny_unet(CLASSES, 1, base_filters=2, depth=2)
    return DistillationModel(small, source, kl_weight=0.5, kl_type="channel")


def _fit(kind, parallel):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()) if parallel else None
    )
    model = _wrapper(kind)
    images, masks, source_images, unlabeled = _arrays()
    x = {"images": images}
    if kind != "distill":
        x["source_images"] = source_images
    if kind == "mean_teacher":
        x["unlabeled_images"] = unlabeled
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=losses.SparseKLDivergence(ignore_class=255),
        metrics=[metrics.MeanIoU(CLASSES, ignore_class=255)],
    )
    history = model.fit(x, masks, batch_size=4, epochs=2, shuffle=False, verbose=0)
    sharded = len(model.trainable_variables[0].value.sharding.device_set)
    keras.distribution.set_distribution(None)
    return history.history, model.get_weights(), sharded


def _diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _job(name, strategy, root, bench, **changes):
    """Job ``name`` (train, distill, adapt, finetune*) as the tests' tiny configs
    make it, two epochs in batches of 4 with seed 3."""
    out = root / f"{name}_{strategy}"
    common = {"epochs": 2, "batch_size": 4, "strategy": strategy, "seed": 3}
    keras.distribution.set_distribution(None)
    if name == "train":
        result = runs.train(train_config(bench, out, **common, **changes))
    elif name == "adapt":
        result = runs.adapt(adapt_config(bench, out=out, **common, **changes))
    elif name == "distill":
        result = runs.distill(distill_config(bench, out=out, **common, **changes))
    else:
        folders = {"source_val_data": str(bench / "source" / "val")}
        folders["source_images"] = str(bench / "source" / "unlabeled")
        cfg = finetune_config(bench, out=out, **folders, **common, **changes)
        result = runs.finetune(cfg)
    distribution = keras.distribution.distribution()
    devices = 0 if distribution is None else distribution.device_mesh.devices.size
    keras.distribution.set_distribution(None)
    return runs.load_model(result.model_path).get_weights(), devices


def main(root):
    root = Path(root)
    out = {"devices": len(jax.devices())}
    for kind in ("kl", "mean_teacher", "distill"):
        one, one_weights, _ = _fit(kind, False)
        two, two_weights, sharded = _fit(kind, True)
        out[kind] = {
            "weights": _diff(one_weights, two_weights),
            "one": one,
            "two": two,
            "devices": sharded,
        }
    bench = synthetic.write_benchmark(
        root / "bench", image_size=32, num_train=8, num_val=4, num_unlabeled=4,
        num_target_train=4,
    )  # fmt: skip
    # The one-device train job is the source model of the others.
    one_device = {"train": _job("train", "default", root, bench)}
    source = root / "train_default" / "model.keras"
    for name, changes in (
        ("train", {}),
        ("finetune_stored", {"source": str(source), "source_predictions": "stored"}),
        (
            "finetune_consistency",
            {
                "source": str(source),
                "unlabeled_data": str(bench / "target" / "unlabeled"),
                "consistency_weight": 1.0,
                "steps_per_epoch": 2,
            },
        ),  # fmt: skip
        ("distill", {"teacher": str(source), "learning_rate": 3e-4}),
        ("adapt", {"source": str(source)}),
    ):
        if name not in one_device:
            one_device[name] = _job(name, "default", root, bench, **changes)
        weights, devices = _job(name, "mirrored", root, bench, **changes)
        out[f"job_{name}"] = {
            "weights": _diff(one_device[name][0], weights),
            "devices": devices,
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
