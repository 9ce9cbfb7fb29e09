"""Regenerates serving/retrieval/retrieval_pb2.py and serving/retrieval/retrieval_pb2_grpc.py
from retrieval.proto.

The proto is compiled as `serving/retrieval/retrieval.proto` (through a temporary include root)
so the generated gRPC module imports `from serving.retrieval import retrieval_pb2`, which works
from the installed package. Usage: `python serving/protos/generate.py [OUTPUT_ROOT]` (default:
the repository root).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).resolve().parent / "retrieval.proto"
REPO = PROTO.parents[2]
PACKAGE = Path("serving/retrieval")  # where the generated modules live, under the root
OUTPUTS = (PACKAGE / "retrieval_pb2.py", PACKAGE / "retrieval_pb2_grpc.py")


def generate(output_root: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(tmp) / "include"
        (include / PACKAGE).mkdir(parents=True)
        shutil.copy(PROTO, include / PACKAGE / PROTO.name)
        (output_root / PACKAGE).mkdir(parents=True, exist_ok=True)
        rc = protoc.main(["grpc_tools.protoc", f"-I{include}", f"--python_out={output_root}",
                          f"--grpc_python_out={output_root}", (PACKAGE / PROTO.name).as_posix()])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    return [output_root / p for p in OUTPUTS]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO):
        print(path)
