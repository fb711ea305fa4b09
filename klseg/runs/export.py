"""``klseg export``: a ``.keras`` model as a SavedModel for serving."""

from pathlib import Path

from klseg.files import make_temp_dir
from klseg.runs import inputs
from klseg.runs.folder import OutputFolder, check_inputs_not_outputs
from klseg.runs.results import PathResult

__all__ = ["export"]


def export(cfg):
    """Export a ``.keras`` model as a SavedModel (see :mod:`klseg.export`).

    The export is written beside the output folder and moved into place
    when complete; the output folder is a klseg export folder (its marker
    next to ``saved_model.pb``), and ``overwrite`` replaces only an earlier
    export.

    Returns:
        A :class:`klseg.runs.PathResult` with ``.path`` (the SavedModel folder).
    """
    from klseg import export as export_lib
    from klseg import models

    check_inputs_not_outputs({"--output": cfg.output}, {"--model": cfg.model})
    model = inputs.load_model(cfg.model)
    inputs.model_info(model, cfg.model)
    out = OutputFolder(cfg.output, "export").claim(replace=cfg.overwrite, clear=False)
    staging = make_temp_dir(out.path, ".export-")
    try:
        export_lib.export_saved_model(
            model, staging / "export", class_names=models.get_class_names(model)
        )
        out.install(staging / "export")
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return PathResult(Path(out.path), "SavedModel written")
