"""The one path normaliser: lexical, no I/O (the engine and `replay` use it too).

Lexical on purpose: `..` is resolved as text. What the kernel really reached is the sensor's
`real_path` (walked in the kernel from the object itself); this module only makes text
comparable.
"""

from __future__ import annotations


def normalize(path: str, cwd: str = "/") -> str:
    """Absolute, lexically normalised path: no `.`, `..`, `//` or trailing `/`.

    Relative paths are joined onto `cwd`. Unlike posixpath.normpath a leading `//` is
    collapsed too (Linux gives it no special meaning), and `..` above `/` stays at `/`.
    """
    if path.startswith("/"):
        # Fast path: most paths the sensor hands over are already clean.
        if "//" not in path and "/." not in path and (len(path) == 1 or path[-1] != "/"):
            return path
    else:
        path = normalize(cwd) + "/" + path
    parts: list[str] = []
    for seg in path.split("/"):
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if parts:
                parts.pop()
            continue
        parts.append(seg)
    return "/" + "/".join(parts)


def join(base: str | None, raw: str) -> str | None:
    """Absolute form of `raw` relative to `base`; None if it needs an unknown base."""
    if raw.startswith("/"):
        return normalize(raw)
    if base is None:
        return None
    if raw == "":
        return base
    return normalize(raw, base)
