"""A seccomp filter that refuses a few syscalls with EPERM: part of `run`'s jail.

io_uring is the reason: its operations (opens, connects, reads) bypass the syscall
tracepoints the sensor watches, so the default policy HALTs `io_uring_setup`. Under `run` the
jail refuses it outright; the attempt is still seen (the sensor's io_uring event) and judged.

The filter is classic BPF built in the parent (`SyscallFilter`); the child only installs it,
after no_new_privs is set (the jail sets it). Any other architecture than the one the guard
runs on is refused outright by the filter (a 32-bit syscall table has other numbers).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# Syscall numbers per architecture, and the AUDIT_ARCH_* value seccomp_data.arch holds.
_NUMBERS = {
    "x86_64": {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
    "aarch64": {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_BIT = 0x40000000  # x86_64's x32 ABI: the same numbers with this bit set
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_NR_OFFSET, _ARCH_OFFSET = 0, 4  # in struct seccomp_data


class SeccompError(Exception):
    """One line: why the filter cannot be built or installed."""


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn))]


def syscall_numbers(names: tuple[str, ...]) -> list[int]:
    """This architecture's numbers for `names`; SeccompError for an unknown one."""
    table = _NUMBERS.get(platform.machine())
    if table is None:
        raise SeccompError(f"seccomp: no syscall table for {platform.machine()}")
    try:
        return [table[n] for n in names]
    except KeyError as e:
        raise SeccompError(f"seccomp: unknown syscall {e.args[0]}") from None


class SyscallFilter:
    """Owns one built filter program (refuse `names` with EPERM, allow the rest); `install()`
    loads it into the calling process, for good."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        numbers = syscall_numbers(names)
        if platform.machine() == "x86_64":
            numbers += [n | _X32_BIT for n in numbers]
        n = len(numbers)
        insns = [
            (_LD_W_ABS, 0, 0, _ARCH_OFFSET),
            (_JEQ_K, 1, 0, _AUDIT_ARCH[platform.machine()]),
            (_RET_K, 0, 0, _RET_KILL_PROCESS),  # a foreign syscall table: numbers mean other calls
            (_LD_W_ABS, 0, 0, _NR_OFFSET),
        ]
        # Each compare: equal -> jump to the EPERM return (after the remaining compares and the
        # allow); not equal -> the next compare.
        insns += [(_JEQ_K, n - i, 0, nr) for i, nr in enumerate(numbers)]
        insns += [(_RET_K, 0, 0, _RET_ALLOW), (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM)]
        self._insns = (_Insn * len(insns))(*insns)
        self._prog = _Prog(len(insns), ctypes.cast(self._insns, ctypes.POINTER(_Insn)))
        self._libc = ctypes.CDLL(None, use_errno=True)

    def install(self) -> None:
        """Needs no_new_privs (or CAP_SYS_ADMIN). Safe in a preexec_fn: no allocation."""
        if self._libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._prog), 0, 0) != 0:
            raise SeccompError(f"seccomp: prctl(PR_SET_SECCOMP): {os.strerror(ctypes.get_errno())}")
