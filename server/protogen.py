"""Regenerate the Python modules of the wire API from `proto/`.

`python -m server.protogen OUTDIR` compiles every `.proto` under `proto/` with the protoc
bundled in grpcio-tools and writes `loramux/v1/inference_pb2.py`, `.pyi` and `_pb2_grpc.py`
under OUTDIR (`make proto` uses OUTDIR=., the up-to-date test a temporary directory).

It knows where the `.proto` files are and which generators to run; it does not know what
the messages mean, and it does not write the hand-written `__init__.py` files beside them.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """The `.proto` files under `proto_root`, relative to it and sorted (stable output)."""
    return sorted(path.relative_to(proto_root).as_posix() for path in proto_root.rglob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every `.proto` under `proto_root` into `out_dir`; returns the files written."""
    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files} (its message is above)")
    written = []
    for name in files:
        stem = out_dir / name.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            written.append(stem.with_name(stem.name + suffix))
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m server.protogen OUTDIR", file=sys.stderr)
        return 2
    for path in generate(Path(argv[0])):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
