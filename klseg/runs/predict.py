"""``klseg predict``: masks (and colour overlays) for a folder of images."""

import contextlib
import shutil
from pathlib import Path

from klseg import errors
from klseg.files import make_temp_dir, write_json, write_png
from klseg.runs import inputs, runtime
from klseg.runs.checks import size_pair, size_text
from klseg.runs.folder import OutputFolder, check_inputs_not_outputs, holds_folders
from klseg.runs.results import PredictResult

__all__ = ["predict", "predict_image"]


def predict_image(model, image, *, multiple=None, options=None, forward=None):
    """Class indices (uint8, (H, W)) for one uint8 image (H, W, 3) of any size.

    :func:`klseg.inference.predict_classes`: the image is padded with zeros
    at the bottom and right to the model's size multiple (as the SavedModel
    export does) and the result cropped back; ``options`` (a
    :class:`klseg.inference.InferenceOptions`, or the ``PredictConfig``)
    adds windows and flip TTA. ``forward`` is the model call
    (:func:`klseg.models.predict_logits` by default: Keras' compiled predict
    function, traced once per input shape, about 3x faster than an eager
    call on a 2-core CPU).
    """
    from klseg import inference

    kwargs = options.inference_kwargs() if options is not None else {}
    classes = inference.predict_classes(
        model, image[None], size_multiple=multiple, forward=forward, **kwargs
    )
    return classes[0].astype("uint8")


@contextlib.contextmanager
def _memory_hint(path, image, cfg):
    """Out of memory while predicting ``path``: a ``ResourceError`` that
    offers ``--tile-size`` (what predicting in windows bounds)."""
    try:
        yield
    except Exception as e:
        if not runtime.out_of_memory(e):
            raise
        height, width = image.shape[:2]
        if cfg.tile_size:
            hint = f"give a smaller --tile-size than {size_text(cfg.tile_size)}"
        else:
            hint = "predict it in windows with --tile-size N (e.g. --tile-size 512)"
        raise errors.ResourceError(
            f"out of memory predicting {path} ({width}x{height} pixels; "
            f"{runtime.first_line(e)}): {hint}, or shrink it with --image-size. "
            "Nothing was written."
        ) from None


def _image_files(images):
    """The image files ``--images`` names: a folder (or its ``images/``), or a
    data-set layout spec (``cityscapes:PATH:val``: the split's images, whose
    labels are not read)."""
    from klseg.data.images import check_unique_stems, list_images
    from klseg.data.layout_specs import is_layout_spec

    if is_layout_spec(images):
        from klseg.data.layouts import layout_image_paths

        files = layout_image_paths(images)
        check_unique_stems(files)
        return files
    folder = Path(images)
    if folder.is_dir() and (folder / "images").is_dir():
        folder = folder / "images"
    return list_images(folder, unique_stems=True)


@holds_folders
def predict(cfg):
    """Predict masks (and colour overlays) for a folder of images.

    Writes ``OUTPUT/masks/NAME.png`` (palette PNG of class indices, readable
    as a mask folder), with ``cfg.overlay`` ``OUTPUT/overlays/NAME.png``, and
    ``OUTPUT/classes.json``. ``cfg.tile_size``, ``cfg.tile_overlap`` and
    ``cfg.tta`` predict each image in windows and/or with the flip (see
    :mod:`klseg.inference`). Everything is written to a temporary folder
    first and moved into place only when every image succeeded, so a
    failure leaves the earlier output (or none), never half of one. Two
    images with one name stem (``x.jpg`` and ``x.png``) are refused before
    anything is written. The output folder is locked while it runs, and
    ``cfg.overwrite`` replaces klseg's files only (see
    :mod:`klseg.runs.folder`).

    Returns:
        A :class:`klseg.runs.PredictResult`.
    """
    import numpy as np

    from klseg import inference, models, progress, report
    from klseg.data.images import check_headers, read_image

    check_inputs_not_outputs(
        {"--output": cfg.output}, {"--images": cfg.images, "--model": cfg.model}
    )
    files = _image_files(cfg.images)
    check_headers(files)  # an image over the limits stops it before any output
    model = inputs.load_model(cfg.model)
    num_classes, multiple = inputs.model_info(model, cfg.model)
    inference.check_tile_size(cfg.tile_size, multiple, name="--tile-size")
    say = print if cfg.verbose else None
    out = OutputFolder(cfg.output, "predictions", say=say).claim(
        replace=cfg.overwrite, clear=False
    )
    staging = make_temp_dir(out.path, ".predictions-")
    done = False
    try:
        masks_dir, overlay_dir = staging / "masks", staging / "overlays"
        masks_dir.mkdir()
        if cfg.overlay:
            overlay_dir.mkdir()
        colors = report.palette(num_classes)
        bar = progress.Progress(
            len(files), "Predicting", unit="image", verbose=cfg.verbose
        )
        for path in files:
            image = read_image(path)
            if cfg.image_size:
                from PIL import Image

                height, width = size_pair(cfg.image_size)
                image = np.asarray(
                    Image.fromarray(image).resize((width, height), Image.BILINEAR)
                )
            with _memory_hint(path, image, cfg):
                classes = predict_image(model, image, multiple=multiple, options=cfg)
            write_png(masks_dir / f"{path.stem}.png", classes, palette=colors)
            if cfg.overlay:
                blended = report.overlay(image, classes, colors, alpha=cfg.alpha)
                write_png(overlay_dir / f"{path.stem}.png", blended)
            bar.update(1)
        bar.close()
        names = models.get_class_names(model)
        write_json(
            staging / "classes.json",
            {"class_names": names, "palette": colors.tolist()},
        )
        out.install(staging)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            out.discard()
    return PredictResult(
        out.path,
        len(files),
        out.path / "masks",
        out.path / "overlays" if cfg.overlay else None,
    )
