"""Request ids (SPEC §4 stage 1): a client's well-formed `X-Request-Id` is kept, else a new one.

New ids are a random per-process prefix and a counter: unique without a
system call per request. They identify, they do not authorize: nothing may
treat a request id as a secret.
"""

from __future__ import annotations

import itertools
import re
import secrets

_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{8,128}")


class RequestIds:
    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def assign(self, offered: str | None) -> str:
        # SECURITY: only a bounded, inert id is echoed into headers and logs.
        if offered is not None and _WELL_FORMED.fullmatch(offered):
            return offered
        return f"{self._prefix}-{next(self._counter):08x}"
