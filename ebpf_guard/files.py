"""Opening files a user names (policies, logs, recordings): regular files only.

Opening a FIFO blocks until a writer appears, /dev/zero reads forever, and opening some devices
has side effects, so every path from the command line goes through `open_regular`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """os.open `path` (with `flags`) and return the fd, or raise OSError if it is not a regular
    file. O_NONBLOCK on the open means a FIFO is refused, never waited on."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO opened for writing with no reader, a gone device
            raise OSError(errno.EINVAL, "not a regular file", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """A binary reader for a regular file (see `open_regular`)."""
    return os.fdopen(open_regular(Path(path)), "rb")
