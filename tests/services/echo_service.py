"""The test-only k2test.Echo service (protos/echo.proto beside this file), compiled with the
pinned grpcio-tools into a temporary folder on first import: `pb` and `grpc_pb` are its
generated message and service modules."""

from __future__ import annotations

import importlib
import sys
import tempfile
from importlib import resources
from pathlib import Path
from types import ModuleType

from grpc_tools import protoc

PROTO_DIR = Path(__file__).parent / "protos"
SERVICE = "k2test.Echo"


def _compile() -> tuple[ModuleType, ModuleType]:
    out = Path(tempfile.mkdtemp(prefix="k2test-echo-"))
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "echo.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on tests/services/protos/echo.proto")
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
    finally:
        sys.path.remove(str(out))


pb, grpc_pb = _compile()
