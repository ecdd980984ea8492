"""peft-lora loading: every A, B and scale equals what PEFT itself built, and what is unsupported is refused.

The oracle is the PEFT model that saved the adapter: its `lora_A["default"]`, `lora_B["default"]`
and `scaling["default"]` per module, which PEFT derived from the same config (target matching,
rank_pattern / alpha_pattern, rsLoRA).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_store import AdapterError, BaseModelSpec, detect_format, load_adapter, load_peft_lora
from tests.adapters_store.adapter_cases import (
    TINY,
    TINY_SPEC,
    assert_matches_peft,
    edit_config,
    rewrite_weights,
)
from tests.adapters_store.conftest import AdapterFactory

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj"

MATCHING_CASES: dict[str, dict[str, Any]] = {
    "list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "rank-and-alpha-pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL,
        rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6, "model.layers.0.mlp.down_proj": 3},
        alpha_pattern={"v_proj": 7, "mlp.up_proj": 5.5},
    ),
    "rslora-with-patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=ALL,
        rank_pattern={"o_proj": 9},
        alpha_pattern={"k_proj": 2},
    ),
    # PEFT saves patterns sorted and takes the first that matches: here layer 1's q_proj gets 6, layer 0's 2.
    "overlapping-patterns-first-wins": dict(
        r=4, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 6, "q_proj": 2}
    ),
    "regex-target": dict(
        r=4, target_modules=r".*\.(q|v)_proj", rank_pattern={r"layers\.\d\.self_attn\.q_proj": 2}
    ),
    # Regular expressions of the kinds PEFT users write, now run on RE2: PEFT itself is the oracle.
    "regex-classes-and-alternation": dict(
        r=4,
        target_modules=r"model\.layers\.[01]\.(self_attn\.(q|k)|mlp\.(gate|up))_proj",
        rank_pattern={r"layers\.[1-9]\d*\.mlp\..*": 2, r"(k|q)_proj": 3},
        alpha_pattern={r"\w+\.1\.self_attn\.k_proj": 6, r"mlp\.(gate|up)_proj": 1.5},
    ),
    "regex-exclude": dict(r=4, target_modules=ALL, exclude_modules=r".*\.1\.(mlp|self_attn)\.[a-z]+_proj"),
    "regex-anchors-and-repeats": dict(
        r=4,
        target_modules=r"^model\.layers\.\d{1,3}\.self_attn\.[qv]_proj$",
        rank_pattern={r"v_proj|o_proj": 2},
    ),
    "layers-pattern": dict(
        r=4, target_modules=["v_proj", "up_proj"], layers_to_transform=[0], layers_pattern="layers"
    ),
    "layers-and-exclude": dict(
        r=4,
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=1,
        exclude_modules=["model.layers.1.mlp.down_proj"],
    ),
    "full-name-skips-layer-filter": dict(
        r=4,
        target_modules=["q_proj", "model.layers.0.mlp.down_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    ),
}


@pytest.mark.parametrize("case", MATCHING_CASES.values(), ids=MATCHING_CASES.keys())
def test_factors_and_scales_match_peft(make_adapter: AdapterFactory, case: dict[str, Any]) -> None:
    directory, model = make_adapter(**case)
    adapter = load_peft_lora(directory, TINY_SPEC, "a")
    assert_matches_peft(adapter, model)
    # And PEFT's own loader, reading the same files back, agrees.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM(LlamaConfig(**TINY)), directory)
    assert_matches_peft(adapter, reloaded)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_are_upcast_to_fp32(make_adapter: AdapterFactory, dtype: torch.dtype) -> None:
    directory, model = make_adapter(dtype=dtype, r=4, target_modules=["q_proj", "up_proj"])
    saved = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert saved.dtype == dtype
    assert_matches_peft(load_adapter(directory, TINY_SPEC, "a"), model)


def test_delta_equals_peft_forward(make_adapter: AdapterFactory) -> None:
    directory, model = make_adapter(r=4, lora_alpha=6, target_modules=["k_proj"])
    weights = load_peft_lora(directory, TINY_SPEC, "a").lora_weights()[(1, "k_proj")]
    peft_layer = model.base_model.model.model.layers[1].self_attn.k_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = peft_layer(x) - peft_layer.base_layer(x)
    torch.testing.assert_close(weights.scale * (x @ weights.A.T) @ weights.B.T, expected)


def test_records_checksum_size_ranks_and_targets(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(
        r=4, target_modules=["v_proj", "q_proj", "down_proj"], rank_pattern={"down_proj": 6}
    )
    adapter = load_adapter(directory, TINY_SPEC, "mine")
    digest = hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (adapter.name, adapter.format, adapter.source) == ("mine", "peft-lora", directory)
    assert adapter.checksum == f"sha256:{digest}"
    assert adapter.rank == 6
    assert adapter.ranks == {
        (i, p): 6 if p == "down_proj" else 4 for i in (0, 1) for p in ("q_proj", "v_proj", "down_proj")
    }
    assert adapter.layers == (0, 1)
    assert adapter.target_modules == ("q_proj", "v_proj", "down_proj")
    per_layer = 4 * (4 * (64 + 64) + 4 * (64 + 32) + 6 * (112 + 64))  # fp32 bytes of A and B
    assert adapter.nbytes == 2 * per_layer
    assert detect_format(directory) == "peft-lora"


# --- refused: config fields ------------------------------------------------------------------------


def test_dora_is_refused(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(directory, TINY_SPEC, "a")


def test_modules_to_save_is_refused(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="modules_to_save"):
        load_adapter(directory, TINY_SPEC, "a")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"target_modules": None}, "target_modules"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules entry 'lm_head'"),
        ({"target_modules": "nothing.*"}, "target_modules"),
        ({"r": 0}, "r must be"),
        ({"lora_alpha": "big"}, "lora_alpha"),
        ({"rank_pattern": {"q_proj(": 2}}, "rank_pattern"),
        ({"layers_to_transform": [0], "target_modules": ".*q_proj"}, "layers_to_transform"),
    ],
)
def test_unsupported_or_invalid_config_fields_are_named(
    make_adapter: AdapterFactory, changes: dict[str, Any], field: str
) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    edit_config(directory, **changes)
    with pytest.raises(AdapterError, match=field.replace("(", r"\(")):
        load_peft_lora(directory, TINY_SPEC, "a")


def test_rank_above_max_rank_is_refused(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=32, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"r = 32 .*max rank 16.*--max-rank"):
        load_peft_lora(directory, TINY_SPEC, "a")
    directory, _ = make_adapter(name="b", r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 20})
    with pytest.raises(AdapterError, match=r"rank_pattern\['q_proj'\] = 20"):
        load_peft_lora(directory, TINY_SPEC, "b")


def test_invalid_json_is_refused(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    (directory / "adapter_config.json").write_text('{"r": 4, "peft_type": ')
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        load_adapter(directory, TINY_SPEC, "a")


def test_directory_without_an_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="holds no adapter loramux recognises"):
        load_adapter(tmp_path, TINY_SPEC, "a")


def test_unknown_format_and_wrong_checksum_are_refused(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="format 'gguf-lora' is not supported"):
        load_adapter(directory, TINY_SPEC, "a", format="gguf-lora")
    with pytest.raises(AdapterError, match="does not match the expected 'sha256:00'"):
        load_adapter(directory, TINY_SPEC, "a", expected_checksum="sha256:00")


# --- refused: weight file ------------------------------------------------------------------------


def test_pickle_only_directory_is_refused_without_unpickling(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    (directory / "adapter_model.safetensors").unlink()
    # Unpickling this would run os.system; the loader must not even try.
    (directory / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned-loramux'\ntR.")
    with pytest.raises(AdapterError, match=r"only adapter_model.bin, a pickle.*safe_serialization"):
        load_adapter(directory, TINY_SPEC, "a")


def test_truncated_safetensors_is_a_clear_error(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        AdapterError, match="adapter_model.safetensors is not a valid safetensors file.*truncated"
    ):
        load_adapter(directory, TINY_SPEC, "a")


def test_adapter_for_another_base_model_names_module_and_shapes(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    wider = BaseModelSpec.llama(
        num_layers=2, hidden_size=96, intermediate_size=112, q_size=96, kv_size=32, max_rank=16
    )
    with pytest.raises(AdapterError, match=rf"{Q_KEY}.lora_A.weight has shape \[4, 64\], expected \[4, 96\]"):
        load_peft_lora(directory, wider, "a")


def test_rank_disagreeing_with_config_is_a_shape_error(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    edit_config(directory, r=2)
    with pytest.raises(AdapterError, match=r"shape \[4, 64\], expected \[2, 64\] \(rank 2 from r"):
        load_peft_lora(directory, TINY_SPEC, "a")


def _set(key: str, value: torch.Tensor) -> Any:
    return lambda tensors: tensors.__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t[f"{Q_KEY}.lora_B.weight"].view(-1).__setitem__(5, float("nan")),
            "q_proj.lora_B.weight holds 1 non-finite",
        ),
        (
            lambda t: t[f"{Q_KEY}.lora_A.weight"].view(-1).__setitem__(0, float("inf")),
            "q_proj.lora_A.weight holds 1 non-finite",
        ),
        (lambda t: t.pop(f"{Q_KEY}.lora_B.weight"), "missing tensor .*q_proj.lora_B.weight"),
        (
            _set("base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight", torch.zeros(4, 64)),
            "unknown module model.layers.0.self_attn.x_proj",
        ),
        (
            _set("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", torch.zeros(4, 64)),
            "q_proj lives under self_attn",
        ),
        (
            _set("base_model.model.model.layers.0.attn.down_proj.lora_A.weight", torch.zeros(4, 64)),
            "down_proj lives under mlp",
        ),
        (
            _set("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64)),
            "layer 7, but the base model has 2 layers",
        ),
        (
            _set("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)),
            "model.layers.0.mlp.up_proj, which target_modules does not select",
        ),
        (_set(f"{Q_KEY}.lora_magnitude_vector", torch.ones(64)), "unexpected tensor .*lora_magnitude_vector"),
        (_set("base_model.model.lm_head.weight", torch.ones(128, 64)), "unexpected tensor .*lm_head"),
        (_set(f"{Q_KEY}.lora_A.weight", torch.zeros(4, 64, dtype=torch.int32)), "dtype I32"),
    ],
    ids=[
        "nan",
        "inf",
        "missing-B",
        "unknown-proj",
        "wrong-block",
        "odd-block",
        "layer-out-of-range",
        "untargeted",
        "dora",
        "lm-head",
        "int",
    ],
)
def test_bad_tensors_are_refused_by_name(make_adapter: AdapterFactory, change: Any, message: str) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    rewrite_weights(directory, change)
    with pytest.raises(AdapterError, match=message):
        load_peft_lora(directory, TINY_SPEC, "a")
