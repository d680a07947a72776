"""Path globs for policies and `idle_ignore_paths` (SPEC §3). Pure.

`*` matches within one segment, `**` any number of whole segments (zero included), so
`/x/**` matches `/x`, `/x/` and everything below. Nothing else is special: no regexes,
no character classes. Globs match the canonical decoded path (gateway.paths).
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def compile_glob(glob: str) -> re.Pattern[str]:
    parts = []
    segments = glob.strip("/").split("/") if glob.strip("/") else []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            parts.append("(?:/.*)?" if last else "(?:/[^/]*)*")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    pattern = "".join(parts)
    if not pattern:
        return re.compile("/?")
    return re.compile(pattern if glob.endswith("**") else pattern + "/?")


class GlobSet:
    """Any of several globs, compiled once into one regex."""

    def __init__(self, globs: Iterable[str]) -> None:
        patterns = [compile_glob(g).pattern for g in globs]
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def matches(self, path: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(path) is not None
