"""What the processes authsvc starts share."""

from __future__ import annotations

import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl, or None where there is none to find (not Linux)."""
    try:
        import ctypes

        # CDLL(None): the C library already in this process, nothing loaded from disk.
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Found in the parent, when this module is imported: `die_with_parent` runs in a child
# between fork and exec, where an import or a dlopen may find a lock held by one of the
# parent's other threads at the fork (gRPC's, a reader's) and crash or hang the child before
# it runs anything (a bench's server ended without a line of output once).
_PRCTL = _libc_prctl()


def die_with_parent() -> None:
    """In a child, before exec (`preexec_fn`): SIGTERM it when the thread that started it
    ends (its process dying, even by SIGKILL), so that no orphan keeps serving a port or
    holding a database (Linux only; elsewhere a no-op). No import, no lookup: one call."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
