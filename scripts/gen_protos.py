"""Generate the Python stubs for protos/ into clients/python/authsvc_client/gen/.

protoc names imports after the path below -I: `auth/v1/auth.proto` yields
`from auth.v1 import auth_pb2`, which only resolves with protos/ on sys.path.
We generate into clients/python/authsvc_client/gen/ (mirroring the proto path) and rewrite those
import lines to `from authsvc_client.gen.auth.v1 import ...`, so the stubs are an
ordinary subpackage. Descriptor file names stay `auth/v1/*.proto`, which is
what other languages and server reflection expect.

Usage: python scripts/gen_protos.py [--out DIR]   (default: clients/python/authsvc_client/gen)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "authsvc_client.gen"

# Matches `from auth.v1 import x_pb2` (and any other package under protos/).
_IMPORT_RE = re.compile(r"^from (auth(?:\.\w+)*) import ", re.MULTILINE)


def rewrite_imports(source: str, package: str = PACKAGE) -> str:
    """Point protoc's top-level imports of our own protos into `package`."""
    return _IMPORT_RE.sub(lambda m: f"from {package}.{m.group(1)} import ", source)


def generate(out: Path) -> list[Path]:
    """Run protoc for every proto under protos/ and write the package to `out`."""
    from grpc_tools import protoc  # dev dependency, pinned exactly: its version shapes the output

    # mypy-protobuf's plugin types the gRPC stubs (grpc_tools' --pyi_out covers messages only).
    grpc_stub_plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    protos = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy_grpc={grpc_stub_plugin}",
            f"--mypy_grpc_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out.exists():
            shutil.rmtree(out)
        written: list[Path] = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            dest = out / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(rewrite_imports(src.read_text()))
            written.append(dest)
    # Every directory becomes a package; the top one is marked typed.
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (out / "py.typed").touch()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "clients" / "python" / "authsvc_client" / "gen"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if path.is_relative_to(args.out.parent) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
