"""The attack probe's machinery stays runnable (bench/attack_bench.py runs a real server; this does not).

Builds the malformed-adapter corpus for the tiny test shapes and checks each case is its own
well-formed directory, and that the report's path detector and markdown work; a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch

from bench.attack_corpus import CONFIG, WEIGHTS, ModelDims, build_corpus, write_good_adapter
from bench.attack_report import Row, absolute_paths, markdown, message_problems
from bench.attack_server import free_port

DIMS = ModelDims(num_layers=2, hidden_size=64, intermediate_size=112, q_size=64, kv_size=32)
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_corpus_cases_are_distinct_well_formed_directories(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    cases = build_corpus(tmp_path / "corpus", DIMS, outside)
    names = [case.name for case in cases]
    assert len(cases) >= 80 and len(set(names)) == len(names)
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == sorted(names)
    for case in cases:
        assert set(case.name) <= NAME_CHARS and case.name[0].isalnum() and len(case.name) <= 128, case
        assert case.expect in ("refused", "served") and case.sent, case
        directory = tmp_path / "corpus" / case.name
        assert directory.is_dir(), case  # symlinked ones included
        if case.kind == "control":
            assert json.loads((directory / CONFIG).read_text())["peft_type"] == "LORA"
            assert safetensors.torch.load_file(directory / WEIGHTS)
    kinds = {case.kind for case in cases}
    assert {"config", "weights", "files", "hazard", "control"} <= kinds
    assert not (outside / "unpickled-by-server").exists()  # building it unpickles nothing


def test_good_adapter_has_the_model_shapes(tmp_path: Path) -> None:
    tensors = safetensors.torch.load_file(write_good_adapter(tmp_path / "good", DIMS) / WEIGHTS)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert tensors[key].shape == (DIMS.kv_size, 4) and len(tensors) == 2 * 2 * 2


def test_report_flags_paths_and_prints_markdown(tmp_path: Path) -> None:
    assert absolute_paths(f"cannot read {tmp_path}/x.json") and not absolute_paths(
        "/loramux.v1.Inference/Generate"
    )
    assert message_problems("x" * 2000) == ["message of 2,000 chars"]
    rows = [
        Row("1. g", "a|b", "refused", "400", 0.1, "yes", "PASS"),
        Row("1. g", "c", "refused", "500", 0.2, "yes", "FAIL"),
    ]
    text = markdown(rows, "t", [])
    assert "| 1. g | 1 | 1 | 0 |" in text and "a\\|b" in text
    assert 0 < free_port() < 65536


def test_steering_a_fuzzed_body_accepts_any_json_shape() -> None:
    from types import SimpleNamespace

    from bench.attack_http import _steer

    for messages in (True, None, 3, "x", {"role": "user"}, [{"role": "tool"}, 5]):
        case = SimpleNamespace(body={"model": "abcdef", "messages": messages, "max_tokens": 100, "n": 9})
        _steer(case, "base")
        assert case.body["model"] == "base" and case.body["max_tokens"] == 4 and case.body["n"] == 2
