"""Argument checks shared by the model builders."""

from klseg.errors import InvalidArgumentError


def check_num_classes(num_classes, class_names):
    if class_names is not None:
        if isinstance(class_names, str):
            raise InvalidArgumentError(
                "`class_names` must be a list of strings, not one string. "
                f"Received: class_names={class_names!r}"
            )
        class_names = [str(c) for c in class_names]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise InvalidArgumentError(
            "`num_classes` must be an integer >= 1. "
            f"Received: num_classes={num_classes!r}"
        )
    if num_classes < 1:
        raise InvalidArgumentError(
            "`num_classes` must be an integer >= 1. "
            f"Received: num_classes={num_classes}"
        )
    if class_names is not None and len(class_names) != num_classes:
        raise InvalidArgumentError(
            f"`class_names` has {len(class_names)} names for "
            f"num_classes={num_classes}. "
            f"Received: class_names={class_names}"
        )
    return class_names


def check_input_shape(input_shape):
    try:
        shape = tuple(None if d is None else int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) != 3 or shape[2] != 3:
        raise InvalidArgumentError(
            "`input_shape` must be (height, width, 3); height and width may be "
            f"None. Received: input_shape={input_shape!r}"
        )
    return shape


def check_positive_int(name, value, maximum=None):
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (maximum is not None and value > maximum)
    ):
        limit = f" and <= {maximum}" if maximum is not None else ""
        raise InvalidArgumentError(
            f"`{name}` must be an integer >= 1{limit}. Received: {name}={value!r}"
        )
    return value
