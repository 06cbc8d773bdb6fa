"""The client distribution on its own: `pip install ./clients/python[test]` into a fresh
venv (no server package there: `import service` fails), then the package's own tests run
with that venv's pytest against the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "python"


def run(
    *args: str | Path, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        check=check,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_client_package_installs_alone_and_its_tests_pass_there(tmp_path: Path) -> None:
    # A copy, so that building leaves nothing in the source tree; its tests run from it.
    source = tmp_path / "client"
    shutil.copytree(
        CLIENT,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # pip's cache is reused between runs (PyPI is reached only for what it lacks).
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{source}[test]")

    # Run from an empty directory: `-c` puts the current one on sys.path.
    empty = tmp_path / "empty"
    empty.mkdir()
    not_there = run(python, "-c", "import service", cwd=empty, check=False)
    assert not_there.returncode != 0
    assert "ModuleNotFoundError" in not_there.stderr
    where = run(python, "-c", "import authsvc_client; print(authsvc_client.__file__)", cwd=empty)
    assert str(venv) in where.stdout  # the installed copy, not a source tree

    # The console script, not `python -m`: the current directory stays off sys.path.
    tests = run(venv / "bin" / "pytest", "-q", "-p", "no:cacheprovider", cwd=source, check=False)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout
    assert " failed" not in tests.stdout
