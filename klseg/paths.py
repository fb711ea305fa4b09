"""What kind of file a path names, for the files klseg reads.

A file klseg reads whole (a config file, a class map) must be a regular
file: a folder, a device such as ``/dev/zero``, a pipe or a socket is
refused with "not a regular file" before it is opened (reading a device can
run forever, opening a pipe can block). Standard library only.
"""

import os
import stat

__all__ = ["not_regular_file"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular_file(path):
    """What ``path`` is when it exists and is no regular file, else ``None``.

    Symbolic links are followed; a missing path gives ``None`` (the reader
    says "not found").

    Example:

    >>> not_regular_file("/dev/zero"), not_regular_file("/no/such/file")
    ('a character device', None)
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    for test, what in _KINDS:
        if test(mode):
            return what
    return "not a file"
