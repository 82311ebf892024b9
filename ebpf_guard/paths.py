"""Where the project's non-Python files live (bpf/ sources, bundled policies, examples)."""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _find(name: str) -> Path:
    # A source checkout / editable install keeps bpf/ and policies/ beside the package;
    # a wheel install puts them under <prefix>/share/ebpf-guard.
    for base in (_REPO, Path(sys.prefix) / "share" / "ebpf-guard"):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    return _REPO / name


BPF_DIR = _find("bpf")
POLICY_DIR = _find("policies")
DEFAULT_POLICY = POLICY_DIR / "default.yaml"
