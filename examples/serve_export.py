"""Serve a klseg SavedModel export with TensorFlow alone.

``klseg export --model model.keras --output exported/`` (or
``klseg.export.export_saved_model``) writes a SavedModel whose
``serving_default`` signature takes uint8 images of any size and returns
per-pixel ``classes`` and ``probabilities``. Serving it needs TensorFlow
only: no klseg, no Keras code.

    python examples/serve_export.py exported/ image1.png image2.png
    python examples/serve_export.py --tiny    # exports a tiny model first
"""

import argparse
import sys

import numpy as np
import tensorflow as tf


def serve(export_dir, images):
    """Class indices for a list of uint8 (H, W, 3) arrays."""
    loaded = tf.saved_model.load(str(export_dir))
    signature = loaded.signatures["serving_default"]
    class_names = [n.decode() for n in loaded.class_names()["class_names"].numpy()]
    results = []
    for image in images:  # one call per image: sizes may differ
        outputs = signature(images=tf.constant(image[None], dtype=tf.uint8))
        classes = outputs["classes"][0].numpy()
        probabilities = outputs["probabilities"][0].numpy()
        results.append((classes, probabilities))
        shares = np.bincount(classes.ravel(), minlength=len(class_names))
        top = ", ".join(
            f"{class_names[i]} {100 * shares[i] / classes.size:.0f}%"
            for i in np.argsort(-shares)[:3]
        )
        print(f"{image.shape[1]}x{image.shape[0]} image: {top}")
    return class_names, results


def _read(path):
    data = tf.io.read_file(path)
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def _tiny_export(folder):
    """Export an untrained tiny klseg model (only for --tiny)."""
    import klseg.export
    import klseg.models
    from klseg.data import synthetic

    model = klseg.models.unet(
        synthetic.NUM_CLASSES,
        base_filters=4,
        depth=2,
        class_names=list(synthetic.CLASS_NAMES),
    )
    klseg.export.export_saved_model(model, folder)
    images, _ = synthetic.generate("target", 2, image_size=30)  # odd sizes work
    return [images[0], images[1][:, :27]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", nargs="?", help="SavedModel folder")
    parser.add_argument("images", nargs="*", help="image files")
    parser.add_argument("--tiny", action="store_true", help="export a tiny model")
    args = parser.parse_args()
    if args.tiny:
        import tempfile

        folder = tempfile.mkdtemp() + "/exported"
        serve(folder, _tiny_export(folder))
    elif args.export_dir and args.images:
        serve(args.export_dir, [_read(p) for p in args.images])
    else:
        parser.print_usage()
        sys.exit(2)
