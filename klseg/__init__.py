"""klseg: stable per-pixel KL divergence for semantic segmentation in Keras 3.

Importing ``klseg`` is cheap: the submodules (which import Keras and, for
``data`` and ``export``, TensorFlow) load on first attribute access, so
``klseg.losses.KLDivergence`` works after a plain ``import klseg``.

Because of that laziness Keras does not know klseg's classes until a
submodule is imported: load saved models with ``klseg.load_model`` (or
import ``klseg.models`` first) rather than with a bare
``keras.saving.load_model`` right after ``import klseg``.
"""

import importlib

from klseg._version import __version__

_SUBMODULES = (
    "consistency",
    "data",
    "distill",
    "errors",
    "export",
    "finetune",
    "inference",
    "losses",
    "metrics",
    "models",
    "ops",
    "report",
    "runs",
)

__all__ = ["__version__", "load_model", "register_keras_objects", *_SUBMODULES]


def register_keras_objects():
    """Register every klseg loss, metric, layer and model class with Keras.

    Importing ``klseg.losses``, ``klseg.metrics``, ``klseg.models``,
    ``klseg.finetune``, ``klseg.consistency`` and ``klseg.distill`` does
    this; this function imports them all, so that ``keras.saving.load_model``
    can rebuild any model klseg wrote.
    """
    for name in ("losses", "metrics", "models", "finetune", "consistency", "distill"):
        __getattr__(name)


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """``keras.saving.load_model`` with every klseg class registered first.

    Loads ``.keras`` files holding klseg models, compiled with klseg losses
    and metrics, and ``KLRegularizedModel`` wrappers. The arguments are
    Keras'.

    Example:
        >>> import klseg
        >>> model = klseg.load_model("model.keras")  # doctest: +SKIP
    """
    register_keras_objects()
    import keras

    return keras.saving.load_model(
        filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
    )


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"klseg.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'klseg' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
