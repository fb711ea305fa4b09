"""``klseg export``: a ``.keras`` model as a SavedModel, a LiteRT (TFLite) or
an ONNX file."""

import shutil
from pathlib import Path

from klseg import errors
from klseg._version import __version__
from klseg.files import make_temp_dir, write_json
from klseg.runs import inputs, runtime
from klseg.runs.checks import size_pair, size_text
from klseg.runs.folder import OutputFolder, check_inputs_not_outputs, holds_folders
from klseg.runs.results import PathResult

__all__ = ["export", "representative_images"]

#: At most this many images of ``representative_data`` calibrate int8
#: quantisation (evenly spaced over the sorted folder).
MAX_REPRESENTATIVE_IMAGES = 200

_FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}
_NAMES = {"saved_model": "SavedModel", "tflite": "LiteRT model", "onnx": "ONNX model"}


def representative_images(folder, image_size, *, limit=MAX_REPRESENTATIVE_IMAGES):
    """Up to ``limit`` images of ``folder`` as uint8 arrays of ``image_size``.

    The images (a folder of images, or one holding ``images/``) are listed
    in name order, ``limit`` of them taken evenly spaced, and each resized
    (stretched) to ``image_size`` ``(height, width)``.

    Raises:
        klseg.errors.DataError: the folder is missing or holds no images, or
            an image cannot be read (naming it).
    """
    from klseg.data.images import list_images, read_image
    from klseg.data.resize import resize

    paths = list_images(folder)
    if len(paths) > limit:
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return [resize(read_image(p), image_size, nearest=False) for p in paths]


def _export_size(cfg, model):
    from klseg import models

    if cfg.image_size is not None:
        return size_pair(cfg.image_size)
    student = getattr(model, "student", None) or model
    size = models.get_training_size(student)
    if size is None:
        where = f" {cfg.model}" if isinstance(cfg.model, (str, Path)) else ""
        raise errors.InvalidArgumentError(
            f"--format {cfg.format} exports for one image size and the model"
            f"{where} records no training size: give --image-size HxW (or N)."
        )
    return size


@holds_folders
def export(cfg):
    """Export a ``.keras`` model (see :mod:`klseg.export`).

    ``format="saved_model"`` writes the SavedModel's files into the output
    folder; ``"tflite"`` writes ``model.tflite`` and ``"onnx"`` writes
    ``model.onnx`` there. ``export.json`` beside them records the format,
    quantisation, input and output, and class names. Everything is written
    beside the output folder and moved into place when complete; the output
    folder is a klseg export folder (its marker beside the files), and
    ``overwrite`` replaces only an earlier export.

    Returns:
        A :class:`klseg.runs.PathResult` with ``.path``: the SavedModel folder,
        or the ``.tflite`` / ``.onnx`` file.
    """
    from klseg import export as export_lib
    from klseg import models

    check_inputs_not_outputs(
        {"--output": cfg.output},
        {"--model": cfg.model, "--representative-data": cfg.representative_data},
    )
    model = inputs.load_model(cfg.model)
    inputs.model_info(model, cfg.model)
    names = models.get_class_names(getattr(model, "student", None) or model)
    if cfg.format == "saved_model":
        size = None if cfg.image_size is None else size_pair(cfg.image_size)
    else:
        size = _export_size(cfg, model)
    calibration = None
    if cfg.quantize == "int8":
        calibration = representative_images(cfg.representative_data, size)
    out = OutputFolder(cfg.output, "export").claim(replace=cfg.overwrite, clear=False)
    staging = make_temp_dir(out.path, ".export-")
    done = False
    try:
        folder = staging / "export"
        if cfg.format == "saved_model":
            export_lib.export_saved_model(
                model, folder, class_names=names, image_size=size
            )
        elif cfg.format == "tflite":
            export_lib.export_litert(
                model,
                folder / _FILES["tflite"],
                image_size=size,
                quantize=cfg.quantize,
                representative_images=calibration,
            )
        else:
            export_lib.export_onnx(model, folder / _FILES["onnx"], image_size=size)
        info = _description(cfg, size, names, folder, calibration)
        write_json(folder / "export.json", info)
        out.install(folder)
        done = True
    except Exception as e:
        if runtime.disk_full(e):
            raise errors.RunError(
                f"cannot write the export to {out.path} (--output): the disk is "
                f"full ({runtime.first_line(e)}). Free some space or export to "
                "another disk; an earlier export there is left as it was."
            ) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            out.discard()
    path = Path(out.path)
    if cfg.format == "saved_model":
        what = "any size" if size is None else size_text(size)
        return PathResult(path, f"SavedModel ({what}) written")
    file = path / _FILES[cfg.format]
    what = f"{_NAMES[cfg.format]} ({size_text(size)}"
    if cfg.format == "tflite":
        what += f", quantize {cfg.quantize}"
    what += f", {file.stat().st_size / 1e6:.2f} MB)"
    return PathResult(file, f"{what} written")


def _description(cfg, size, names, folder, calibration):
    """What ``export.json`` holds."""
    info = {"format": cfg.format, "klseg": __version__, "class_names": names}
    if cfg.format == "saved_model":
        info["signature"] = "serving_default"
        height, width = size or (None, None)
        info["input"] = {
            "name": "images",
            "dtype": "uint8",
            "shape": [None, height, width, 3],
        }
        info["outputs"] = ["classes", "probabilities"]
        return info
    height, width = size
    batch = 1 if cfg.format == "tflite" else None
    file = folder / _FILES[cfg.format]
    info.update(
        file=file.name,
        bytes=file.stat().st_size,
        quantize=cfg.quantize,
        image_size=[height, width],
        input={"name": "images", "dtype": "uint8", "shape": [batch, height, width, 3]},
        output={"name": "classes", "dtype": "int32", "shape": [batch, height, width]},
    )
    if calibration is not None:
        info["representative_images"] = len(calibration)
    return info
