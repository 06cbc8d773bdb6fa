"""What the processes authsvc starts share."""

from __future__ import annotations

import contextlib
import signal


def die_with_parent() -> None:
    """In a child, before exec (`preexec_fn`): SIGTERM it when the thread that started it
    ends (its process dying, even by SIGKILL), so that no orphan keeps serving a port or
    holding a database (Linux only; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
