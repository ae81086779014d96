"""Regenerates the committed stubs from generate.proto with grpcio-tools.

    python -m pagedray.protos.codegen        # rewrites protos/generate_pb2*.py

Commit stubs made with the grpcio-tools version named in pyproject's `grpcio` floor
(today 1.84.0): the gRPC stub refuses to import under a grpcio older than the
grpcio-tools that wrote it, and the GPU machines run grpcio 1.84.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "generate.proto"
STUB_NAMES = ("generate_pb2.py", "generate_pb2_grpc.py")

# protoc writes a top-level import; the stubs live in a package.
_FLAT_IMPORT = "import generate_pb2 as generate__pb2"
_PACKAGE_IMPORT = "from pagedray.protos import generate_pb2 as generate__pb2"


def generate(out_dir: Path) -> dict[str, str]:
    """Writes the stubs into out_dir and returns {file name: text}."""
    from grpc_tools import protoc  # test/dev dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(PROTO_DIR / PROTO_NAME)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_NAME}")
    grpc_stub = out_dir / STUB_NAMES[1]
    text = grpc_stub.read_text()
    if _FLAT_IMPORT not in text:
        raise RuntimeError(f"expected {_FLAT_IMPORT!r} in the generated {grpc_stub.name}")
    grpc_stub.write_text(text.replace(_FLAT_IMPORT, _PACKAGE_IMPORT))
    return {name: (out_dir / name).read_text() for name in STUB_NAMES}


# Lines that only record which generator version ran; everything else must match.
_VERSION_LINES = [
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"ValidateProtobufRuntimeVersion\([^)]*\)", re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


def without_versions(text: str) -> str:
    for pattern in _VERSION_LINES:
        text = pattern.sub("<version>", text)
    return text


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (PROTO_DIR / name).write_text(text)
            print(f"wrote {PROTO_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
