"""Thin ctypes bindings for fanotify(7): init, mark, reading events, writing responses.

Only what the permission gates (gates.py) need. glibc exports fanotify_init and fanotify_mark;
the event and response structs are fixed-size and read/written with `struct`.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# fanotify_init flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_CLASS_CONTENT = 0x00000004
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_UNLIMITED_MARKS = 0x00000020
FAN_REPORT_TID = 0x00000100

# fanotify_mark flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_ONLYDIR = 0x00000008
FAN_MARK_IGNORED_MASK = 0x00000020
FAN_MARK_IGNORED_SURV_MODIFY = 0x00000040
FAN_MARK_FLUSH = 0x00000080

# event masks
FAN_OPEN = 0x00000020
FAN_OPEN_EXEC = 0x00001000
FAN_Q_OVERFLOW = 0x00004000
FAN_OPEN_PERM = 0x00010000
FAN_ACCESS_PERM = 0x00020000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000
PERMISSION_EVENTS = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM

# responses
FAN_ALLOW = 0x01
FAN_DENY = 0x02

FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3

# struct fanotify_event_metadata { u32 event_len; u8 vers; u8 reserved; u16 metadata_len;
#                                  aligned_u64 mask; s32 fd; s32 pid; }
EVENT = struct.Struct("=IBBHQii")
# struct fanotify_response { s32 fd; u32 response; }
RESPONSE = struct.Struct("=iI")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
AT_FDCWD = -100


@dataclass(frozen=True, slots=True)
class Event:
    """One fanotify event as the kernel reported it. `fd` is ours to close (FAN_NOFD: none)."""

    mask: int
    fd: int
    pid: int  # the thread id with FAN_REPORT_TID, else the process id


def init(flags: int, event_f_flags: int) -> int:
    """fanotify_init(2): a new group's fd. OSError on failure."""
    fd = _libc.fanotify_init(flags, event_f_flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_init: {os.strerror(err)}")
    return fd


def mark(fan_fd: int, flags: int, mask: int, path: str, dirfd: int = AT_FDCWD) -> None:
    """fanotify_mark(2) on `path`. OSError (with the path) on failure."""
    if _libc.fanotify_mark(fan_fd, flags, mask, dirfd, os.fsencode(path)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def parse(buf: bytes) -> Iterator[Event]:
    """The events in one read(2) of a fanotify fd. ValueError on a version we do not speak
    (the caller must still close any fds; none are lost because parsing stops before them)."""
    offset = 0
    while offset + EVENT.size <= len(buf):
        event_len, vers, _, _, mask, fd, pid = EVENT.unpack_from(buf, offset)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ValueError(f"fanotify metadata version {vers}, expected {FANOTIFY_METADATA_VERSION}")
        if event_len < EVENT.size:
            raise ValueError(f"fanotify event length {event_len} is shorter than its header")
        yield Event(mask, fd, pid)
        offset += event_len


def respond(fan_fd: int, event_fd: int, allow: bool) -> None:
    """Answer one permission event (FAN_ALLOW or FAN_DENY)."""
    os.write(fan_fd, RESPONSE.pack(event_fd, FAN_ALLOW if allow else FAN_DENY))
