"""Run by tests/test_multi_worker.py as each worker of a two-worker cluster
(``TF_CONFIG`` set by the test; ``strategy="multi-worker"``), and imported
there for the same jobs on one device (``strategy="default"``).

    python multi_worker_check.py ROOT STEP [STEP ...]

``ROOT`` holds the benchmark (``bench``) and the source model
(``source.keras``). Each step is a job of the tests' tiny configs, run in
this one process (one cluster): ``train``, ``finetune_stored``,
``finetune_live``, ``finetune_consistency``, ``distill`` or ``adapt``, into
``ROOT/JOB_multi-worker``; in ``train:die`` worker 1 kills itself (SIGKILL)
inside the second epoch, so that the chief stops, and ``train:resume``
resumes that run; ``keras``
fits a model with plain Keras (no ``runtime.multi_worker_fit_fixes``) and
records how it fails. Prints one JSON line: ``{"keras": [errors]}``.
"""

import json
import os
import signal
import sys
from pathlib import Path

import keras
from helpers import adapt_config, distill_config, finetune_config, train_config

from klseg import runs
from klseg.runs import runtime

#: Every job: seed 3, batches of 4 (the global batch), two epochs, no
#: augmentation.
COMMON = {"batch_size": 4, "seed": 3, "augment": "none", "epochs": 2}

JOBS = (
    "train",
    "finetune_stored",
    "finetune_live",
    "finetune_consistency",
    "distill",
    "adapt",
)


def config(job, strategy, root, **changes):
    """``(runs.<job>, config)`` of ``job`` under ``strategy`` in ``root``.

    The fine-tuning and adaptation runs synchronise the student's BatchNorm
    statistics (``student_bn="synchronized"``): with per-replica statistics
    (``"trainable"``) two workers compute another step than one device
    (measured: 0.45 apart in the weights after 2 epochs of finetune).
    ``train`` and ``distill`` synchronise them on their own under a
    distribution strategy. The consistency run mixes nothing
    (``consistency_mix="none"``): ClassMix and CutMix pair each image with
    the previous one of its replica's share, so two replicas pair other
    images than one device (measured: the logged losses equal, the weights
    2.5e-4 apart after 4 steps, through BatchNorm's moving statistics).
    """
    root = Path(root)
    bench, source = root / "bench", root / "source.keras"
    out = root / f"{job}_{strategy}"
    common = {**COMMON, "strategy": strategy, **changes}
    if job == "train":
        return runs.train, train_config(bench, out, **common)
    if job == "distill":
        # At the default 1e-3 the from-scratch 2-filter student is in a
        # regime where round-off grows: one device with and without oneDNN
        # (TF_ENABLE_ONEDNN_OPTS=0) ended 4e-4 apart in the weights on an
        # AVX-512 CPU, as far as two workers from one device; at 3e-4, 1e-7.
        slower = {**common, "learning_rate": 3e-4}
        return runs.distill, distill_config(bench, source, out, **slower)
    synchronized = {**common, "student_bn": "synchronized"}
    if job == "adapt":
        return runs.adapt, adapt_config(bench, source, out, **synchronized)
    mode = job.removeprefix("finetune_")
    folders = {"source_val_data": str(bench / "source" / "val")}
    folders["source_images"] = str(bench / "source" / "unlabeled")
    if mode == "consistency":
        folders.update(
            unlabeled_data=str(bench / "target" / "unlabeled"),
            consistency_weight=1.0,
            consistency_threshold=0.2,  # about half the pixels (6 classes)
            consistency_mix="none",
            steps_per_epoch=2,
            mode_defaults=False,
        )
    else:
        folders["source_predictions"] = mode
    cfg = finetune_config(bench, source, out, **folders, **synchronized)
    return runs.finetune, cfg


class _WorkerOneDies(keras.callbacks.Callback):
    """Worker 1 kills itself (SIGKILL) after the first step of the second
    epoch: the chief has written the checkpoint of epoch 1 and is in the
    middle of epoch 2."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        task = json.loads(os.environ["TF_CONFIG"])["task"]
        if task["index"] == 1 and self.epoch == 1 and batch == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def keras_failures():
    """How Keras' own ``fit`` fails under MultiWorkerMirroredStrategy, as
    ``runtime.multi_worker_fit_fixes`` works around it: the error of a plain
    fit, then of a fit of a model built from the dataset's spec (the first
    fix alone). None where a fit worked."""
    import numpy as np
    import tensorflow as tf

    strategy, _ = runtime.make_strategy("multi-worker")
    rng = np.random.default_rng(0)
    images = rng.random((8, 8, 8, 3), dtype=np.float32)
    masks = rng.integers(0, 2, (8, 8, 8)).astype("int32")
    dataset = runtime.distribute_options(
        tf.data.Dataset.from_tensor_slices((images, masks)).batch(4)
    )
    found = []
    for build_first in (False, True):
        with strategy.scope():
            inputs = keras.Input((8, 8, 3))
            model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
        if build_first:
            runtime.build_before_fit(model, dataset)
        try:
            model.fit(dataset, epochs=1, verbose=0)
            found.append(None)
        except Exception as e:  # noqa: BLE001 - the failure is the result
            found.append(f"{type(e).__name__}: {runtime.first_line(e)}")
    return found


def main(root, *steps):
    result = {}
    for step in steps:
        if step == "keras":
            result["keras"] = keras_failures()
            continue
        job, _, how = step.partition(":")
        # The resumed run talks, so that the test sees what each worker says.
        changes = {"resume": True, "verbose": 1} if how == "resume" else {}
        run, cfg = config(job, "multi-worker", root, **changes)
        run(cfg, callbacks=[_WorkerOneDies()] if how == "die" else None)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
