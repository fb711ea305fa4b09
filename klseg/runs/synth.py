"""``klseg data synth``: the built-in two-domain benchmark as image folders."""

import shutil

from klseg.files import make_temp_dir
from klseg.runs.folder import OutputFolder, holds_folders
from klseg.runs.results import PathResult

__all__ = ["synth_data"]


@holds_folders
def synth_data(cfg):
    """Write the built-in two-domain benchmark (:mod:`klseg.data.synthetic`).

    The output is a klseg data folder (marker, ``source/``, ``target/``,
    ``classes.json``), written beside the folder and moved into place when
    complete; ``overwrite`` replaces only the files of an earlier klseg data
    set (anything else in the folder stays). The folder is locked meanwhile.
    """
    from klseg.data import synthetic

    out = OutputFolder(cfg.output, "data").claim(replace=cfg.overwrite, clear=False)
    staging = make_temp_dir(out.path, ".synth-")
    try:
        kwargs = {
            "image_size": cfg.image_size,
            "num_train": cfg.num_train,
            "num_val": cfg.num_val,
            "num_unlabeled": cfg.num_unlabeled,
            "seed": cfg.seed,
        }
        if cfg.num_target_train is not None:
            kwargs["num_target_train"] = cfg.num_target_train
        synthetic.write_benchmark(staging / "bench", **kwargs)
        out.install(staging / "bench")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PathResult(out.path, "Benchmark written")
