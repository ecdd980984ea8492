"""Shared helpers of the adapter-store tests (imported as tests.adapters_store.adapter_cases)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from adapters_store.adapter import LoadedAdapter
from adapters_store.spec import PROJECTIONS, BaseModelSpec

# LlamaConfig(hidden 64, intermediate 112, 4 heads of 16, 2 kv heads): q 64, k/v 32.
TINY: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TINY_SPEC = BaseModelSpec.llama(
    num_layers=2, hidden_size=64, intermediate_size=112, q_size=64, kv_size=32, max_rank=16
)


def edit_config(directory: Path, **changes: Any) -> None:
    """Rewrite fields of an adapter's adapter_config.json."""
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def peft_factors(model: Any) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, projection) -> (A, B, scaling) of every LoRA module of a PEFT-wrapped Llama, read from PEFT itself."""
    found = {}
    for i, layer in enumerate(model.base_model.model.model.layers):
        for block_name in ("self_attn", "mlp"):
            block = getattr(layer, block_name)
            for projection in PROJECTIONS:
                module = getattr(block, projection, None)
                if module is not None and "default" in getattr(module, "lora_A", {}):
                    found[(i, projection)] = (
                        module.lora_A["default"].weight.detach(),
                        module.lora_B["default"].weight.detach(),
                        float(module.scaling["default"]),
                    )
    return found


def assert_matches_peft(adapter: LoadedAdapter, model: Any) -> None:
    """Every module PEFT adapts is in `adapter` with the same A, B (fp32) and scale, and nothing else is."""
    expected = peft_factors(model)
    loaded = adapter.lora_weights()
    assert set(loaded) == set(expected)
    for key, (a, b, scaling) in expected.items():
        weights = loaded[key]
        assert weights.A.dtype == weights.B.dtype == torch.float32
        torch.testing.assert_close(weights.A, a.float(), rtol=0, atol=0)
        torch.testing.assert_close(weights.B, b.float(), rtol=0, atol=0)
        assert weights.scale == pytest.approx(scaling, rel=1e-12), key


def rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Apply `change` to an adapter's tensors in place and save them back as safetensors."""
    path = directory / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    safetensors.torch.save_file(tensors, path)
