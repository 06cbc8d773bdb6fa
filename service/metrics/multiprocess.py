"""Multiprocess mode (`serve --workers N`): each worker writes its values to files in a
directory the supervisor owns, and the supervisor's /metrics sums them (see the package
docstring for which process does what, and in which order)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    """Whether this process's metric values go to files in PROMETHEUS_MULTIPROC_DIR
    (decided when prometheus_client was first imported, not by the current env)."""
    return bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))


_OWNED_DIR_PREFIX: Final = "authsvc-metrics-"
_STAGING_DIR_PREFIX: Final = ".authsvc-metrics-staging-"
_OWNER_LOCK: Final = ".owner.lock"


class OwnedMultiprocessDir:
    """A supervisor's private metrics directory, `authsvc-metrics-*` in the temporary
    directory, locked (flock) for as long as its supervisor lives. A supervisor killed
    with SIGKILL cannot remove it; the lock then dies with it, which is how the next
    start (`remove_abandoned_multiprocess_dirs`) tells it from a live supervisor's,
    whatever the process ids (another PID namespace may share /tmp)."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, parent: Path | None = None) -> OwnedMultiprocessDir:
        parent = Path(tempfile.gettempdir() if parent is None else parent)
        # Locked before it gets the name the clean-up looks for: never seen unlocked.
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_DIR_PREFIX, dir=parent))
        lock_fd = os.open(staging / _OWNER_LOCK, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            path = parent / (_OWNED_DIR_PREFIX + staging.name.removeprefix(_STAGING_DIR_PREFIX))
            staging.rename(path)
        except BaseException:
            os.close(lock_fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(prepare_multiprocess_dir(path), lock_fd)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def remove_abandoned_multiprocess_dirs(parent: Path | None = None) -> list[Path]:
    """Delete the metrics directories of supervisors that are gone (killed with SIGKILL,
    say): this user's `authsvc-metrics-*` whose lock nobody holds. Returns them."""
    parent = Path(tempfile.gettempdir() if parent is None else parent)
    removed = []
    for path in parent.glob(_OWNED_DIR_PREFIX + "*"):
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.geteuid():
                continue
            lock_fd = os.open(path / _OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # not one of ours (or not ours to judge)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its supervisor is alive
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(lock_fd)
    if removed:
        log.warning("removed metrics directories of supervisors that are gone: %s", removed)
    return removed


def prepare_multiprocess_dir(path: Path) -> Path:
    """Create `path` if needed and delete the metric files a previous run left there
    (only `*.db`: the directory may hold other things); returns it made absolute."""
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return path


def multiprocess_registry(path: Path | None = None) -> CollectorRegistry:
    """A registry that sums every process's files in `path` (default: the directory in
    PROMETHEUS_MULTIPROC_DIR) at each scrape; works in any process."""
    registry = CollectorRegistry()
    directory = None if path is None else str(path)
    # prometheus_client leaves MultiProcessCollector and mark_process_dead unannotated.
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def worker_exited(pid: int, path: Path | None = None) -> None:
    """Drop the gauges of a worker that has exited (its counters stay in the totals)."""
    if path is None and MULTIPROC_DIR_VARIABLE not in os.environ:
        return  # not in multiprocess mode: nothing to drop
    directory = None if path is None else str(path)
    mark_process_dead(pid, path=directory)  # type: ignore[no-untyped-call]
