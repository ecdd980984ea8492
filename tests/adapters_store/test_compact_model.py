"""End to end: a tiny Llama on the triton backend (interpreted on CPU) serves one MoS, one ComPEFT and
one LoRA adapter in one batch, MoS and ComPEFT from their compact pools, and its logits equal the
torch backend's, which materializes both into LoRA slots.

The slot pools are the server's (server.runtime.slot_pools), over the model's own adapted linears;
the adapters are built in memory (their file formats are tested where they are read).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapters_store import BaseModelSpec, DeviceSlots, LoadedAdapter
from kernels import select_backend
from server.config import AdapterConfig
from server.model.batch import StepBatch
from server.model.kv_cache import KVCache
from server.model.llama import LlamaModel
from server.model.loader import load_model
from server.runtime import slot_pools
from tests.adapters_store.test_compact_pools import compeft_adapter, lora_adapter, mos_adapter
from tests.kernels.lora_cases import interpreting

CPU = torch.device("cpu")
PROMPTS = [[5, 900, 17, 2300], [44, 6, 1021], [77, 301, 12, 9000, 400]]


def tiny_spec(model: LlamaModel, max_rank: int) -> BaseModelSpec:
    arch = model.arch
    return BaseModelSpec.llama(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        q_size=arch.q_size,
        kv_size=arch.kv_size,
        max_rank=max_rank,
    )


def logits_with(
    model: LlamaModel, backend_name: str, adapters: list[LoadedAdapter]
) -> tuple[torch.Tensor, list[str]]:
    """Logits of the three prompts prefilled in one step: prompt i on adapters[i], the last one on a
    mixture of all three. Also the kind of pool each adapter went to."""
    spec = tiny_spec(model, max_rank=8)
    pools = slot_pools(
        spec, AdapterConfig(max_slots=3, max_rank=8), select_backend(CPU, backend_name), CPU, torch.float32
    )
    slots = DeviceSlots(pools)
    slots.attach(model)
    ready = [slots.prepare(adapter) for adapter in adapters]
    slot_ids = [slots.acquire(r) for r in ready]
    assert all(s is not None for s in slot_ids)
    pairs: list[list[tuple[int, float]]] = []
    for i, prompt in enumerate(PROMPTS[:2]):
        pairs += [[(slot_ids[i], 1.0)]] * len(prompt)  # type: ignore[list-item]
    mixture = [(slot_ids[0], 0.5), (slot_ids[1], 0.8), (slot_ids[2], -0.6)]
    pairs += [mixture] * len(PROMPTS[2])  # type: ignore[list-item]
    step = StepBatch.build(
        [], [(i, 0, prompt, True) for i, prompt in enumerate(PROMPTS)], CPU, slots.step(pairs, CPU)
    )
    arch = model.arch
    kv = KVCache(arch.num_layers, 4, arch.num_kv_heads, arch.head_dim, 512, torch.float32, CPU, initial_len=8)
    logits = model(step, kv)
    return logits, [slots.pools[r.pool].kind for r in ready]


@pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_compact_pools_equal_the_torch_backend(make_tiny_model: Any) -> None:
    directory = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    models = [load_model(str(directory), CPU, torch.float32, 512, kernels="torch").model for _ in range(2)]
    spec = tiny_spec(models[0], max_rank=8)
    adapters: list[LoadedAdapter] = [
        mos_adapter("mos", rank=8, shards=2, pool_rank=2, seed=11, spec=spec),
        compeft_adapter("compeft", rank=6, seed=12, spec=spec, gamma=0.05),
        lora_adapter("lora", rank=4, seed=13, spec=spec),
    ]
    got, kinds = logits_with(models[0], "triton", adapters)
    assert kinds == ["mos", "compeft", "lora"]
    expected, kinds = logits_with(models[1], "torch", adapters)
    assert kinds == ["lora", "lora", "lora"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    arch = models[1].arch
    kv = KVCache(arch.num_layers, 4, arch.num_kv_heads, arch.head_dim, 512, torch.float32, CPU, initial_len=8)
    base = models[1](StepBatch.build([], [(i, 0, p, True) for i, p in enumerate(PROMPTS)], CPU), kv)
    assert (expected - base).abs().amax(dim=1).min() > 1e-3  # every prompt's adapters change its logits
