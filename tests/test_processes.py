"""`die_with_parent` runs in a child between fork and exec (`preexec_fn`), where the parent's
other threads are gone but their locks are not: it must neither import nor load a library
there, only make its one call."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# In a process of its own: the death signal it sets would otherwise be this test run's.
_CHILD = textwrap.dedent(
    """
    import builtins, ctypes, signal
    from service import processes

    libc = ctypes.CDLL(None, use_errno=True)
    def refused(*args, **kwargs):
        raise RuntimeError("an import or a library load between fork and exec")
    builtins.__import__ = refused
    ctypes.CDLL = refused
    processes.die_with_parent()
    got = ctypes.c_int()
    libc.prctl(2, ctypes.byref(got))  # PR_GET_PDEATHSIG
    print(got.value == signal.SIGTERM)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_the_death_signal_is_set_without_an_import_or_a_library_load() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
