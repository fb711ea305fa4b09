"""The jobs behind the ``klseg`` commands, callable from Python.

Each command of the command line builds one config object and calls one
function here; a Python user can do the same::

    from klseg import runs

    result = runs.train(runs.TrainConfig(
        data="data/source/train", val_data="data/source/val",
        output="runs/source", epochs=10))
    result.metrics["val"]["mean_iou"]

The engine, one module per role (each imports only the ones listed before
it, and the klseg library):

- ``configs``: the config objects (standard library only; their choices
  and defaults come from ``klseg.registry``), with ``checks`` (the field
  checks) and ``hub`` (``keras-hub:`` model specs);
- ``results``: what the jobs return, and the printed tables;
- ``folder``: the one output-folder policy (markers; klseg replaces only
  what it wrote; inputs are never outputs);
- ``checkpoint``: the one checkpoint format (resume);
- ``runtime``: strategies, precision, optimizer, interrupts;
- ``inputs``: the one model loader (reading, building, what a ``.keras``
  file records) and the checked data loading;
- ``streams``: the seeded training streams (labelled, unlabelled, mixed,
  source-domain), the evaluation streams, the steps per epoch and the
  resume skip;
- ``scoring``: every score through ``klseg.evaluation``;
- ``reports``: the run report and the sections the jobs share (curves,
  overlays, confusion matrices, settings);
- ``callbacks``: the Keras callbacks of a run (NaN stop, interrupts,
  checkpoints, TensorBoard scalars);
- ``fit``: the fit sequence shared by ``train``, ``finetune`` and
  ``distill`` (the run context, compile and restore, ``model.fit``, the
  run's summary);
- ``classmaps``: the class change of a fine-tuning run;
- ``mean_teacher``: the EMA teacher of a fine-tuning run with the consistency
  term (its unlabelled stream, the validation of both models, their scores);
- the jobs, each a short list of steps on the engine (settings, models,
  streams, fit, scores, report): ``train``, ``finetune``, ``sweep``,
  ``distill``, ``evaluate``, ``predict``, ``export``, ``synth``, ``demo``.

Importing ``klseg.runs`` loads none of them: the names below (the
configs, the results, the jobs, which import Keras) and the modules
(``klseg.runs.configs``, ...) load on first use, so the command line can
import an engine module such as ``klseg.runs.hub`` on its own.
"""

import importlib
import sys
import types

__all__ = [
    "AdaptConfig",
    "DemoConfig",
    "DemoResult",
    "DistillConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FinetuneConfig",
    "PathResult",
    "PredictConfig",
    "PredictResult",
    "RunFolder",
    "RunResult",
    "SweepResult",
    "SynthConfig",
    "TrainConfig",
    "adapt",
    "demo",
    "distill",
    "evaluate",
    "evaluate_model",
    "export",
    "finetune",
    "format_domain_table",
    "format_metrics",
    "load_model",
    "make_strategy",
    "predict",
    "predict_image",
    "synth_data",
    "train",
]

_CONFIGS = (
    "AdaptConfig",
    "DemoConfig",
    "DistillConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FinetuneConfig",
    "PredictConfig",
    "SynthConfig",
    "TrainConfig",
)
_RESULTS = (
    "DemoResult",
    "PathResult",
    "PredictResult",
    "RunResult",
    "SweepResult",
    "format_domain_table",
    "format_metrics",
)

_LAZY = {
    **{name: ("klseg.runs.configs", name) for name in _CONFIGS},
    **{name: ("klseg.runs.results", name) for name in _RESULTS},
    "RunFolder": ("klseg.runs.folder", "RunFolder"),
    "adapt": ("klseg.runs.adapt", "adapt"),
    "demo": ("klseg.runs.demo", "demo"),
    "distill": ("klseg.runs.distill", "distill"),
    "evaluate": ("klseg.runs.evaluate", "evaluate"),
    "evaluate_model": ("klseg.runs.scoring", "evaluate_model"),
    "export": ("klseg.runs.export", "export"),
    "finetune": ("klseg.runs.finetune", "finetune"),
    "load_model": ("klseg.runs.inputs", "load_model"),
    "make_strategy": ("klseg.runs.runtime", "make_strategy"),
    "predict": ("klseg.runs.predict", "predict"),
    "predict_image": ("klseg.runs.predict", "predict_image"),
    "synth_data": ("klseg.runs.synth", "synth_data"),
    "train": ("klseg.runs.train", "train"),
    # Older private names, kept for code that used them.
    "_lower_is_better": ("klseg.runs.callbacks", "lower_is_better"),
    "_yaml_dump": ("klseg.files", "yaml_text"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        # A module of the package (``runs.configs``), imported on first use.
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'klseg.runs' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


class _Package(types.ModuleType):
    """Keeps each job's function under its name: importing a job's module
    (``klseg.runs.export``, say from ``klseg.runs.demo``) makes Python bind
    that module as the package attribute of the same name, over the job."""

    def __setattr__(self, name, value):
        if (
            isinstance(value, types.ModuleType)
            and name in _LAZY
            and value.__name__ == _LAZY[name][0]
        ):
            value = getattr(value, _LAZY[name][1], value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
