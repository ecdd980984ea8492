"""The committed protobuf modules are exactly what `make proto` generates from proto/."""

from __future__ import annotations

from pathlib import Path

from server import protogen

REPO = Path(__file__).resolve().parent.parent


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    assert {path.name for path in written} == {
        "inference_pb2.py",
        "inference_pb2.pyi",
        "inference_pb2_grpc.py",
    }
    for path in written:
        committed = REPO / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing; run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale; run `make proto`"


def test_protogen_cli_writes_into_outdir(tmp_path: Path) -> None:
    assert protogen.main([str(tmp_path)]) == 0
    assert (tmp_path / "loramux" / "v1" / "inference_pb2.py").is_file()
    assert protogen.main([]) == 2  # usage error
