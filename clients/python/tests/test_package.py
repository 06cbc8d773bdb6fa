"""The package stands alone: no module of it imports the server package `service`, and it
imports in a process where `service` cannot be imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import authsvc_client

PACKAGE = Path(authsvc_client.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_imports_the_server_package() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    offenders = {
        str(path.relative_to(PACKAGE)): name
        for path in files
        for name in imported_modules(path)
        if name == "service" or name.startswith("service.")
    }
    assert offenders == {}


def test_the_package_imports_where_the_server_package_cannot() -> None:
    code = (
        "import sys; sys.modules['service'] = None\n"  # any `import service...` now fails
        "import authsvc_client.client, authsvc_client.interceptor, authsvc_client.channel\n"
        "import authsvc_client.local_validator, authsvc_client.token_check\n"
        "assert not any(m == 'service' or m.startswith('service.') for m in sys.modules"
        " if sys.modules[m] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
