"""Versions of one adapter (compressed or exported copies) are one routing candidate, the original.

The records and checksums are built here from bytes written by the test (sha256 of each weight
file, the loaders' checksum); the router test serves real demo adapters: the sql LoRA beside a
copy of its shipped ComPEFT (which names its source only by checksum) and a `loramux export` of
that copy (which writes source.json).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapters_store.lineage import (
    HEADER_ALLOWANCE,
    SOURCE_FILE,
    Origin,
    origin_of,
    source_record,
    weights_checksum,
)
from server import cli
from server.router.variants import Variants
from tasks import get_task

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _lora(root: Path, name: str, payload: bytes) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(payload)
    return directory


def _checksum(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def _version(root: Path, name: str, source_name: str, original: bytes, payload: bytes = b"codes") -> Path:
    """A version of the adapter whose weight file holds `original`, made from `source_name`."""
    directory = root / name
    directory.mkdir()
    (directory / "compeft_model.safetensors").write_bytes(payload + name.encode())
    checksum = _checksum(original)
    record = {
        "source": {"name": source_name, "format": "peft-lora", "checksum": checksum},
        "original": checksum,
        "original_bytes": len(original),
    }
    (directory / SOURCE_FILE).write_text(json.dumps(record))
    return directory


def test_versions_are_routed_as_their_original(tmp_path: Path) -> None:
    sql = _lora(tmp_path, "sql", b"sql weights")
    other = _lora(tmp_path, "sentiment", b"sentiment weights")
    _version(tmp_path, "sql-c10", "sql", b"sql weights")
    export = tmp_path / "sql-c10-peft"  # an export of the ComPEFT: it names the ComPEFT, the original is sql
    _version(tmp_path, "sql-c10-peft", "sql-c10", b"sql weights")
    renamed = _version(tmp_path, "moved", "gone-away", b"sentiment weights")  # by checksum
    routable = {d.name: d for d in (sql, other, export, renamed, tmp_path / "sql-c10")}
    assert Variants().of(routable) == {"sql-c10": "sql", "sql-c10-peft": "sql", "moved": "sentiment"}
    # the original not routable: its versions are one candidate, the first by name
    del routable["sql"]
    assert Variants().of(routable) == {"sql-c10-peft": "sql-c10", "moved": "sentiment"}


def test_a_refused_original_is_routed_as_its_first_servable_version(tmp_path: Path) -> None:
    sql = _lora(tmp_path, "sql", b"sql weights")  # say, over --max-adapter-mb: its load was refused
    routable = {"sql": sql}
    for name, source in (("sql-c05", "sql"), ("sql-c10", "sql"), ("sql-c10-peft", "sql-c10")):
        routable[name] = _version(tmp_path, name, source, b"sql weights")
    refused = {"sql", "sql-c05"}.__contains__
    assert Variants().of(routable, refused) == {
        "sql": "sql-c10",
        "sql-c05": "sql-c10",
        "sql-c10-peft": "sql-c10",
    }
    assert Variants().of(routable, lambda name: name != "sql-c10-peft")["sql"] == "sql-c10-peft"
    everything = Variants().of(routable, lambda name: True)  # nothing servable: as it was
    assert everything == {"sql-c05": "sql", "sql-c10": "sql", "sql-c10-peft": "sql"}


def test_a_retrained_source_and_an_unreadable_record_make_originals(tmp_path: Path) -> None:
    sql = _lora(tmp_path, "sql", b"retrained sql")
    stale = _version(tmp_path, "sql-c10", "sql", b"the sql it was compressed from")
    garbage = _lora(tmp_path, "garbage", b"g")
    (garbage / SOURCE_FILE).write_text("{not json")
    assert origin_of(garbage) is None and origin_of(sql) is None
    assert Variants().of({"sql": sql, "sql-c10": stale, "garbage": garbage}) == {}


def test_a_compeft_config_without_a_record_is_matched_by_checksum(tmp_path: Path) -> None:
    sql = _lora(tmp_path, "sql", b"sql weights")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = {"source_checksum": _checksum(b"sql weights"), "total_elements": 5}  # 10 to 20 bytes + header
    (legacy / "compeft_config.json").write_text(json.dumps(config))
    (legacy / "compeft_model.safetensors").write_bytes(b"codes")
    assert origin_of(legacy) == Origin(_checksum(b"sql weights"), "", (10, 20 + HEADER_ALLOWANCE))
    assert Variants().of({"sql": sql, "legacy": legacy}) == {"legacy": "sql"}
    assert weights_checksum(legacy) == _checksum(b"codes")


def test_a_record_names_the_original_through_a_chain(tmp_path: Path) -> None:
    from adapters_store import load_adapter
    from tasks.compeft_alpha import model_spec

    spec = model_spec()
    compeft = load_adapter(ADAPTERS / "sql-compeft-10", spec, "sql-compeft-10")
    record = source_record(compeft)
    sql_checksum = weights_checksum(ADAPTERS / "sql")
    assert record["source"] == {"name": "sql-compeft-10", "format": "compeft", "checksum": compeft.checksum}
    assert record["original"] == sql_checksum  # from the ComPEFT's config: its source, the LoRA


def test_auto_routes_sql_not_its_copies(tmp_path: Path, smol: Any) -> None:
    from tests.test_router import _render, _router

    for name in ("sql", "sentiment"):  # without examples: routed by their weights, as copies would be
        shutil.copytree(ADAPTERS / name, tmp_path / name, ignore=shutil.ignore_patterns("examples.jsonl"))
    shutil.copytree(
        ADAPTERS / "sql-compeft-10", tmp_path / "sql-c10", ignore=shutil.ignore_patterns("examples.jsonl")
    )
    assert (
        cli.main(["export", "--to", "peft-lora", str(tmp_path / "sql-c10"), str(tmp_path / "sql-c10-peft")])
        == 0
    )
    assert not (tmp_path / "sql-c10-peft" / "examples.jsonl").exists()  # its source had none
    router = _router(smol, tmp_path, ("*",))
    report = router.reconcile()
    assert dict(report.versions) == {"sql-c10": "sql", "sql-c10-peft": "sql"}
    assert sorted(report.weight_only) == ["sentiment", "sql"]
    prompts = [e.prompt for e in get_task("sql").heldout()][:6]
    decisions = [router.route(_render(smol.tokenizer)(p)) for p in prompts]
    assert all({c.adapter for c in d.candidates} == {"sql", "sentiment"} for d in decisions)
    # as separate candidates, every held-out sql prompt fell back (`loramux bench router --parts versions`)
    assert sum(not d.fallback and d.candidates[0].adapter == "sql" for d in decisions) >= 5
    # examples registered for a copy teach its original
    router.learn("sql-c10", prompts)
    assert "sql" in router.tables.selector.classes and "sql-c10" not in router.tables.selector.classes
    # the original gone (as UnloadAdapter has the router do): its versions are routed as one again
    shutil.rmtree(tmp_path / "sql")
    router.forget("sql")
    report = router.reconcile(())
    assert dict(report.versions) == {"sql-c10-peft": "sql-c10"}
    assert sorted(router.tables.prototypes) == ["sentiment", "sql-c10"]


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Any:
    import torch

    from tests.test_router import load_model

    return load_model(None, torch.device("cpu"), torch.float32, 512)
