"""Opening files a user names (policies, logs, recordings): regular files only.

Opening a FIFO blocks until a writer appears, /dev/zero reads forever, and opening some devices
has side effects, so every path from the command line goes through `open_regular`.
"""

from __future__ import annotations

import errno
import hashlib
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


# Content hashes of programs (a listed tool at policy load, the binary of each exec): one home,
# so both sides hash the same bytes under the same limit.
MAX_HASH_BYTES = 16 << 20  # curl, wget, nc, ssh... are far smaller; bigger is matched by name/inode
_hashes: dict[tuple[int, int, int, int, int], str] = {}


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a regular file of at most MAX_HASH_BYTES; "" if it is bigger, not regular or
    unreadable. Cached by (dev, ino, size, mtime, ctime) taken from the open file itself: ctime
    moves on every write and a user cannot set it back, so a rewritten file is hashed again."""
    try:
        with read_regular(path) as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = _hashes.get(key)
            if known is not None:
                return known
            if st.st_size > MAX_HASH_BYTES:
                return ""
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""
    if len(_hashes) > 4096:
        _hashes.clear()
    _hashes[key] = digest
    return digest
