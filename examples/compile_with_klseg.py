"""Train a segmentation model with klseg's loss and metrics in plain Keras.

klseg's losses and metrics are ordinary Keras objects: pass them to
``compile`` like any other. Here a small U-Net learns the built-in synthetic
scenes (source domain) with the sparse KL loss (cross-entropy minus the
label entropy, so 0 at a perfect fit) and reports mean IoU, pixel accuracy
and calibration error.

    python examples/compile_with_klseg.py            # about a minute on a CPU
    python examples/compile_with_klseg.py --tiny     # a few seconds
"""

import argparse

import keras

import klseg.losses
import klseg.metrics
import klseg.models
from klseg.data import synthetic


def main(tiny=False):
    size, n_train, n_val, epochs = (32, 8, 4, 1) if tiny else (64, 128, 32, 8)
    x_train, y_train = synthetic.generate("source", n_train, image_size=size, seed=0)
    x_val, y_val = synthetic.generate("source", n_val, image_size=size, seed=1)

    num_classes = synthetic.NUM_CLASSES
    model = klseg.models.unet(
        num_classes,
        base_filters=4 if tiny else 16,
        depth=2 if tiny else 3,
        class_names=list(synthetic.CLASS_NAMES),
    )
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        # Masks use 255 for "no label"; those pixels leave the mean.
        loss=klseg.losses.SparseKLDivergence(ignore_class=255),
        metrics=[
            klseg.metrics.MeanIoU(num_classes, ignore_class=255),
            klseg.metrics.PixelAccuracy(ignore_class=255),
            klseg.metrics.ExpectedCalibrationError(ignore_class=255),
        ],
    )
    model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=epochs,
        batch_size=8,
        verbose=0 if tiny else 2,
    )
    scores = model.evaluate(x_val, y_val, batch_size=8, return_dict=True, verbose=0)
    for name, value in scores.items():
        print(f"{name}: {value:.4f}")

    # The model saves like any Keras model; klseg.load_model registers
    # klseg's classes with Keras, then calls keras.saving.load_model.
    model.save("klseg_unet.keras")
    reloaded = klseg.load_model("klseg_unet.keras")
    print("class names:", klseg.models.get_class_names(reloaded))
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes")
    main(parser.parse_args().tiny)
