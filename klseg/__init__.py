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

    Raises:
        klseg.errors.ModelError: with ``safe_mode`` (the default), the file
            holds Python code (a Lambda layer, a function such as
            ``os.system``) that Keras refused to load; the message names it
            and how to load a trusted file.

    Example:
        >>> import klseg
        >>> model = klseg.load_model("model.keras")  # doctest: +SKIP
    """
    register_keras_objects()
    import keras

    try:
        return keras.saving.load_model(
            filepath,
            custom_objects=custom_objects,
            compile=compile,
            safe_mode=safe_mode,
        )
    except Exception as error:
        code = _python_code(filepath) if safe_mode else None
        if code is None:
            raise
        from klseg.errors import ModelError

        raise ModelError(
            f"{filepath} contains Python code ({code}); klseg loads only safe "
            "models. If you trust this file, load it yourself with "
            "klseg.load_model(path, safe_mode=False) (or "
            "keras.saving.load_model(path, safe_mode=False))."
        ) from error


# Modules whose functions a safe model may name.
_SAFE_MODULES = ("keras", "klseg", "keras_hub", "keras_nlp")


def _python_code(filepath):
    """What Python code a ``.keras`` file's ``config.json`` holds (a Lambda
    layer, a function such as ``os.system``), in words; None if none or
    unreadable. Keras' safe mode refuses these, often without saying so."""
    import json
    import zipfile

    found = []

    def walk(node):
        if isinstance(node, list):
            for value in node:
                walk(value)
        if not isinstance(node, dict):
            return
        config = node.get("config")
        kind, module = node.get("class_name"), node.get("module")
        if kind == "Lambda" and isinstance(config, dict):
            found.append(f"a Lambda layer {config.get('name')!r}")
        elif kind == "__lambda__":
            found.append("a Python lambda")
        elif (
            isinstance(module, str)
            and isinstance(config, str)
            and module.split(".")[0] not in _SAFE_MODULES
        ):
            found.append(f"a reference to {module}.{config}")
        for value in node.values():
            walk(value)

    try:
        with zipfile.ZipFile(filepath) as archive:
            walk(json.loads(archive.read("config.json")))
    except Exception:
        return None
    return ", ".join(dict.fromkeys(found)) or None


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"klseg.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'klseg' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
