"""The library's exception types.

Every error klseg raises for a user's mistake derives from ``KlsegError``, so
callers (and the command line) can tell them from bugs. Argument mistakes in
Python code stay ``ValueError`` as in Keras; ``InvalidArgumentError`` is both.
"""

__all__ = [
    "KlsegError",
    "InvalidArgumentError",
    "DataError",
    "ModelError",
    "ResourceError",
    "RunError",
    "TrainingDiverged",
]


class KlsegError(Exception):
    """Base class of klseg's own errors."""


class InvalidArgumentError(KlsegError, ValueError):
    """An argument has a value klseg cannot use."""


class DataError(KlsegError):
    """A data set, file or folder is missing, unreadable or inconsistent.

    The message names the file or folder and the problem.
    """


class ModelError(KlsegError):
    """A model is missing, unreadable, or incompatible with the request."""


class ResourceError(KlsegError):
    """A run would not fit in the memory or disk it has."""


class RunError(KlsegError):
    """A run cannot start or continue (output folder, resume state, ...)."""


class TrainingDiverged(RunError):
    """The loss became NaN or infinite; training stopped at that step.

    Attributes:
        epoch: 1-based epoch in which it happened.
        step: 1-based step within that epoch.
    """

    def __init__(self, message, *, epoch=None, step=None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
