"""Regenerate the Python gRPC stubs in services/pb/ from the contracts in protos/.

`python scripts/gen_protos.py [--out DIR]` writes DIR/services/pb/k2/v1/{x_pb2.py, x_pb2.pyi,
x_pb2_grpc.py} for every protos/k2/v1/x.proto (DIR defaults to the repository root), plus the
package `__init__.py` files. protoc emits `from k2.v1 import x_pb2`; those imports are rewritten
to `from services.pb.k2.v1 import x_pb2` so the stubs live inside our package and nothing needs
protos/ on sys.path. The proto file names inside the descriptors stay `k2/v1/x.proto`, which is
what reflection and the descriptor pool key on.

Output is deterministic (sorted inputs, fixed protoc from the pinned grpcio-tools), so
tests/services/test_protos.py can regenerate into a temporary directory and compare bytes.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTO_PACKAGE = "k2/v1"
STUB_PACKAGE = "services.pb"  # the generated k2.v1 package lives at services.pb.k2.v1
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# `from k2.v1 import x_pb2 as ...` and the module name protoc gives the message classes.
_IMPORT = re.compile(r"^from k2\.v1 import ", re.MULTILINE)
_MODULE_NAME = re.compile(r"'k2\.v1\.(\w+_pb2)'")

_INIT_DOCS = {
    Path("services/pb"): "Generated gRPC stubs (scripts/gen_protos.py); do not edit.",
    Path("services/pb/k2"): "Generated from protos/k2 (scripts/gen_protos.py); do not edit.",
    Path("services/pb/k2/v1"): "Generated from protos/k2/v1 (scripts/gen_protos.py); do not edit.",
}


def _run_protoc(out: Path, protos: list[Path]) -> None:
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {[p.name for p in protos]}")


def _rewrite(text: str) -> str:
    text = _IMPORT.sub(f"from {STUB_PACKAGE}.k2.v1 import ", text)
    return _MODULE_NAME.sub(rf"'{STUB_PACKAGE}.k2.v1.\1'", text)


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root/services/pb, replacing any stale generated files there.
    Returns the written paths, sorted."""
    protos = sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    target = out_root / "services" / "pb" / PROTO_PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.iterdir():
        if stale.name.endswith(GENERATED_SUFFIXES):
            stale.unlink()
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        _run_protoc(Path(scratch), protos)
        for produced in sorted((Path(scratch) / PROTO_PACKAGE).iterdir()):
            dest = target / produced.name
            dest.write_text(_rewrite(produced.read_text(encoding="utf-8")), encoding="utf-8")
            written.append(dest)
    for package, doc in _INIT_DOCS.items():
        init = out_root / package / "__init__.py"
        init.write_text(f'"""{doc}"""\n', encoding="utf-8")
        written.append(init)
    return sorted(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write services/pb under")
    args = parser.parse_args()
    for path in generate(args.out.resolve()):
        print(path)


if __name__ == "__main__":
    main()
