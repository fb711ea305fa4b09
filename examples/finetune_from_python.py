"""Fine-tune a source model on a new domain with KLRegularizedModel.

A U-Net trained on the synthetic source domain is fine-tuned on a few
labelled target-domain images. Plain fine-tuning forgets the source domain;
``KLRegularizedModel`` adds a per-pixel KL term that keeps the student's
predictions on unlabelled source images close to the frozen source model's.

    python examples/finetune_from_python.py          # a few minutes on a CPU
    python examples/finetune_from_python.py --tiny   # seconds
"""

import argparse

import keras
import numpy as np

import klseg.finetune
import klseg.losses
import klseg.metrics
import klseg.models
from klseg.data import synthetic


def compile_segmentation(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=klseg.losses.SparseKLDivergence(ignore_class=255),
        metrics=[klseg.metrics.MeanIoU(synthetic.NUM_CLASSES, ignore_class=255)],
    )


def main(tiny=False):
    size = 32 if tiny else 64
    n_source, n_target, n_val = (8, 4, 4) if tiny else (192, 32, 48)
    epochs_source, epochs_tune = (1, 1) if tiny else (12, 8)
    source_x, source_y = synthetic.generate("source", n_source, image_size=size)
    target_x, target_y = synthetic.generate("target", n_target, image_size=size)
    val = {
        "source": synthetic.generate("source", n_val, image_size=size, seed=1),
        "target": synthetic.generate("target", n_val, image_size=size, seed=1),
    }

    # 1. A source model (in practice: keras.saving.load_model("source.keras")).
    source = klseg.models.unet(
        synthetic.NUM_CLASSES,
        base_filters=4 if tiny else 16,
        depth=2 if tiny else 3,
        class_names=list(synthetic.CLASS_NAMES),
    )
    compile_segmentation(source, 2e-3)
    source.fit(source_x, source_y, epochs=epochs_source, batch_size=16, verbose=0)

    # 2. The student starts as a copy of the source model.
    student = keras.models.clone_model(source)
    student.set_weights(source.get_weights())

    # 3. Wrap both; the KL term sees unlabelled source-domain images, passed
    #    beside the labelled target images in every batch.
    model = klseg.finetune.KLRegularizedModel(
        student, source, kl_weight=0.3, temperature=2.0, kl_inputs="source"
    )
    compile_segmentation(model, 1e-3)
    rng = np.random.default_rng(0)
    rehearsal = source_x[rng.choice(len(source_x), size=len(target_x))]
    model.fit(
        {"images": target_x, "source_images": rehearsal},
        target_y,
        epochs=epochs_tune,
        batch_size=8,
        verbose=0,
    )

    # 4. Both domains' scores and the forgetting.
    scores = klseg.finetune.evaluate_domains(model, val)
    for name, value in scores.items():
        print(f"{name}: {100 * value:.1f}")
    model.student.save("finetuned.keras")  # the fine-tuned model itself
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes")
    main(parser.parse_args().tiny)
