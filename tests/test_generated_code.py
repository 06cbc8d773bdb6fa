"""The committed stubs (clients/python/authsvc_client/gen/) are exactly what
scripts/gen_protos.py makes from protos/ (`make check-proto`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "clients" / "python" / "authsvc_client" / "gen"


def load_gen_protos() -> ModuleType:
    path = ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen_protos = load_gen_protos()


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("gen") / "gen"
    written = gen_protos.generate(out)
    assert written, "generate() wrote nothing"
    assert all(Path(p).is_relative_to(out) for p in written)
    return files_under(out)


def test_generated_files_are_the_committed_set(generated: dict[str, bytes]) -> None:
    committed = files_under(COMMITTED)
    assert sorted(generated) == sorted(committed), (
        "clients/python/authsvc_client/gen/ is out of date: run `make proto` and commit the result"
    )
    for expected in (
        "auth/v1/auth_pb2.py",
        "auth/v1/auth_pb2.pyi",
        "auth/v1/auth_pb2_grpc.py",
        "auth/v1/auth_pb2_grpc.pyi",
        "py.typed",
        "__init__.py",
    ):
        assert expected in generated


def test_generated_files_match_byte_for_byte(generated: dict[str, bytes]) -> None:
    committed = files_under(COMMITTED)
    stale = sorted(
        name for name in generated if name in committed and generated[name] != committed[name]
    )
    assert stale == [], (
        f"clients/python/authsvc_client/gen/ is out of date ({stale}): run `make proto`"
    )


def test_generated_code_imports_our_package_not_top_level_auth(
    generated: dict[str, bytes],
) -> None:
    grpc_stub = generated["auth/v1/auth_pb2_grpc.py"].decode()
    assert "from authsvc_client.gen.auth.v1 import auth_pb2" in grpc_stub
    for name, content in generated.items():
        if name.endswith((".py", ".pyi")):
            for line in content.decode().splitlines():
                assert not line.startswith(("from auth.", "from auth ", "import auth")), (
                    name,
                    line,
                )


def test_rewrite_imports_rewrites_only_our_top_level_imports() -> None:
    rewrite = gen_protos.rewrite_imports
    source = "\n".join(
        [
            "from auth.v1 import auth_pb2 as auth_dot_v1_dot_auth__pb2",
            "from auth.v2.sub import other_pb2",
            "from auth import root_pb2",
            "from google.protobuf import timestamp_pb2",
            "from authz.v1 import x_pb2",
            "from oauth.v1 import y_pb2",
            "    from auth.v1 import indented_pb2",
            "import auth.v1.auth_pb2",
            "# from auth.v1 import commented",
            "x = 'from auth.v1 import in_a_string'",
        ]
    )
    assert rewrite(source).splitlines() == [
        "from authsvc_client.gen.auth.v1 import auth_pb2 as auth_dot_v1_dot_auth__pb2",
        "from authsvc_client.gen.auth.v2.sub import other_pb2",
        "from authsvc_client.gen.auth import root_pb2",
        "from google.protobuf import timestamp_pb2",
        "from authz.v1 import x_pb2",
        "from oauth.v1 import y_pb2",
        "    from auth.v1 import indented_pb2",
        "import auth.v1.auth_pb2",
        "# from auth.v1 import commented",
        "x = 'from auth.v1 import in_a_string'",
    ]


def test_rewrite_imports_is_idempotent_and_takes_a_package() -> None:
    rewrite = gen_protos.rewrite_imports
    once = rewrite("from auth.v1 import auth_pb2\n")
    assert once == "from authsvc_client.gen.auth.v1 import auth_pb2\n"
    assert rewrite(once) == once
    assert rewrite("from auth.v1 import a_pb2\n", "pkg.stubs") == (
        "from pkg.stubs.auth.v1 import a_pb2\n"
    )
    assert rewrite("") == ""
