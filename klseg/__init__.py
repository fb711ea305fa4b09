"""klseg: stable per-pixel KL divergence for semantic segmentation in Keras 3.

Importing ``klseg`` is cheap: the submodules (which import Keras and, for
``data`` and ``export``, TensorFlow) load on first attribute access, so
``klseg.losses.KLDivergence`` works after a plain ``import klseg``.
"""

import importlib

from klseg._version import __version__

_SUBMODULES = (
    "data",
    "errors",
    "export",
    "finetune",
    "losses",
    "metrics",
    "models",
    "ops",
    "report",
    "runs",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"klseg.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'klseg' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
