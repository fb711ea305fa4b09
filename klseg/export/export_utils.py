"""What every export format shares: the model and arguments it takes, the
file it writes, and the message of a failed conversion.

Standard library and klseg only at import; Keras loads on first use.
"""

import os
import shutil
from pathlib import Path

from klseg.errors import InvalidArgumentError, KlsegError, ModelError
from klseg.files import make_temp_dir

__all__ = [
    "check_model",
    "class_names",
    "conversion_error",
    "image_size",
    "message_lines",
    "require_tensorflow_backend",
    "size_multiple",
    "student",
    "write_file",
]


def student(model):
    """The model an export writes: the student of a wrapper, else ``model``."""
    # A KLRegularizedModel (or anything wrapping a student) exports its
    # student; read as an attribute to keep export independent of finetune.
    found = getattr(model, "student", None)
    return found if found is not None else model


def size_multiple(model):
    """``klseg.models.size_multiple(model)``, or 1 for other models."""
    from klseg import models as klseg_models

    try:
        multiple = klseg_models.size_multiple(model)
    except (KlsegError, ValueError, AttributeError, TypeError):
        multiple = 1
    return int(multiple)


def class_names(model, num_classes, names):
    """The class names to export: ``names``, the model's, or ``class_{i}``."""
    if names is None:
        from klseg import models as klseg_models

        try:
            names = klseg_models.get_class_names(model)
        except (KlsegError, ValueError, AttributeError, TypeError):
            names = None
    if names is None:
        names = [f"class_{i}" for i in range(num_classes)]
    names = [str(name) for name in names]
    if len(names) != num_classes:
        raise InvalidArgumentError(
            f"`class_names` must have one name per output class "
            f"({num_classes}). Received: class_names={names}"
        )
    return names


def check_model(model):
    """Number of classes of ``model``; raises for a model export cannot take."""
    import keras

    from klseg import models as klseg_models

    if isinstance(model, keras.Model) and not model.built:
        raise ModelError(
            "The model has not been built yet; call it on a batch of images "
            "(or build it from a keras.Input) before exporting."
        )
    return klseg_models.check_segmentation_model(model, "model")


def image_size(size):
    """``(height, width)`` from an int or a pair of positive ints."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        height, width = size
    except (TypeError, ValueError):
        height = width = None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (height, width)):
        raise InvalidArgumentError(
            "`image_size` must be an int or a (height, width) pair of ints. "
            f"Received: image_size={size!r}"
        )
    if min(height, width) < 1:
        raise InvalidArgumentError(
            f"`image_size` must be positive. Received: image_size={size!r}"
        )
    return height, width


def require_tensorflow_backend(what):
    """Raises unless Keras runs on TensorFlow; ``what`` starts the message."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ModelError(
            f"{what} export needs the TensorFlow backend of Keras; this process "
            f"runs {keras.backend.backend()!r}. Run it with KERAS_BACKEND=tensorflow."
        )


def write_file(path, suffix, write):
    """Calls ``write(temporary path)`` beside ``path``, then renames it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f".{path.name}.")
    try:
        target = tmp / f"model{suffix}"
        write(target)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def message_lines(error):
    """The non-blank lines of an exception's message."""
    return [line for line in str(error).strip().splitlines() if line.strip()]


def conversion_error(what, error):
    """The ``ModelError`` for a failed conversion: the first lines of ``error``."""
    lines = message_lines(error)
    detail = "\n".join(lines[:8]) if lines else type(error).__name__
    return ModelError(f"{what} conversion failed: {type(error).__name__}: {detail}")
