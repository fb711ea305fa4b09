"""The config objects of the jobs, their choices and defaults.

Standard library only; their choices and the defaults the command line shows
in ``--help`` are defined in :mod:`klseg.registry`, which the command line
reads without importing these modules (the commands build the configs).

- :mod:`klseg.runs.configs.training`: the training jobs (``train``,
  ``finetune``, ``distill``) and the options they share;
- :mod:`klseg.runs.configs.adaptation`: ``adapt`` (adaptation without target
  labels);
- :mod:`klseg.runs.configs.tools`: the jobs that do not train (``evaluate``,
  ``predict``, ``export``, ``data synth``, ``demo``).
"""

from klseg.runs.configs.adaptation import AdaptConfig
from klseg.runs.configs.tools import (
    DEMO_PRESETS,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    SynthConfig,
)
from klseg.runs.configs.training import (
    AUGMENT,
    BACKBONES,
    CONSISTENCY_MIX,
    DEFAULT_LEARNING_RATE,
    DISTILL_KL_TYPES,
    DISTILL_KL_WEIGHT,
    DISTILL_TEMPERATURE,
    EXPORT_FORMATS,
    KL_INPUTS,
    MIXED_PRECISION,
    MODELS,
    QUANTIZATIONS,
    RESUMABLE_CHANGES,
    SOURCE_PREDICTIONS,
    STRATEGIES,
    STUDENT_BN,
    TEMPERATURE_RANGE,
    DistillConfig,
    FinetuneConfig,
    TrainConfig,
)

__all__ = [
    "AdaptConfig",
    "AUGMENT",
    "BACKBONES",
    "CONSISTENCY_MIX",
    "DEFAULT_LEARNING_RATE",
    "DEMO_PRESETS",
    "DISTILL_KL_TYPES",
    "DISTILL_KL_WEIGHT",
    "DISTILL_TEMPERATURE",
    "EXPORT_FORMATS",
    "KL_INPUTS",
    "MIXED_PRECISION",
    "MODELS",
    "QUANTIZATIONS",
    "RESUMABLE_CHANGES",
    "SOURCE_PREDICTIONS",
    "STRATEGIES",
    "STUDENT_BN",
    "TEMPERATURE_RANGE",
    "DemoConfig",
    "DistillConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FinetuneConfig",
    "PredictConfig",
    "SynthConfig",
    "TrainConfig",
]
