"""ebpf-guard: watch AI agents from the kernel and stop them when they cross a line."""

__version__ = "0.1.0"
