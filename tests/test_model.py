"""Our forward against transformers' own models: whole prompts, chunked prefill, step-by-step
decode and mixed batches, for Llama and Qwen2 with and without GQA, tied and untied heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.model.batch import DecodeSeq, StepBatch
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from tests.cpu_kernels import require_compiler

CPU = torch.device("cpu")
TOL = 1e-4

VARIANTS = [
    dict(kind="llama", kv_heads=4, tied=True),  # multi-head attention
    dict(kind="llama", kv_heads=2, tied=False),  # GQA, untied head
    dict(kind="llama", kv_heads=1, tied=True),  # multi-query
    dict(kind="qwen2", kv_heads=2, tied=False),  # q/k/v bias
    dict(kind="qwen2", kv_heads=4, tied=True),
    dict(
        kind="llama",
        kv_heads=2,
        tied=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    dict(
        kind="llama",
        kv_heads=2,
        tied=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    ),
]


def _ids(variant: dict) -> str:
    rope = variant.get("rope_parameters")
    suffix = f"-rope_{rope['rope_type']}" if rope else ""
    return f"{variant['kind']}-kv{variant['kv_heads']}-{'tied' if variant['tied'] else 'untied'}{suffix}"


@pytest.fixture(params=("fused", "torch"))
def kernels(request: pytest.FixtureRequest) -> str:
    """Both implementations of the model's non-GEMM ops (kernels/model_ops.py) face the oracle."""
    if request.param == "fused":
        require_compiler()
    return request.param


@pytest.fixture(params=VARIANTS, ids=_ids)
def pair(request: pytest.FixtureRequest, make_tiny_model, kernels: str) -> tuple:
    from transformers import AutoModelForCausalLM

    directory: Path = make_tiny_model(**request.param)
    ours = load_model(str(directory), CPU, torch.float32, 512, kernels=kernels).model
    assert ours.ops.name == {"fused": "fused-cpu", "torch": "torch"}[kernels]
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return ours, theirs


def _cache(model, length: int = 32) -> KVCache:
    a = model.arch
    kv = KVCache(a.num_layers, 4, a.num_kv_heads, a.head_dim, 512, torch.float32, CPU, initial_len=4)
    kv.ensure_capacity(length)
    return kv


def _reference_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # [len, vocab]


PROMPT = [5, 900, 17, 2300, 44, 6, 1021, 77, 301, 12, 9000, 400, 3, 15, 88, 4000, 123, 7, 60, 2]


def test_whole_prompt_matches(pair) -> None:
    ours, hf = pair
    batch = StepBatch.build([], [(0, 0, PROMPT, True)], CPU)
    logits = ours(batch, _cache(ours))
    torch.testing.assert_close(logits[0], _reference_logits(hf, PROMPT)[-1], atol=TOL, rtol=0)


def test_step_by_step_decode_matches(pair) -> None:
    ours, hf = pair
    reference = _reference_logits(hf, PROMPT)
    kv = _cache(ours, length=3)  # the cache grows on the way
    ours(StepBatch.build([], [(2, 0, PROMPT[:3], True)], CPU), kv)
    for position in range(3, len(PROMPT)):
        kv.ensure_capacity(position + 1)
        logits = ours(StepBatch.build([DecodeSeq(2, position, PROMPT[position])], [], CPU), kv)
        torch.testing.assert_close(logits[0], reference[position], atol=TOL, rtol=0)


def test_chunked_prefill_matches(pair) -> None:
    ours, hf = pair
    kv = _cache(ours)
    ours(StepBatch.build([], [(1, 0, PROMPT[:7], False)], CPU), kv)
    ours(StepBatch.build([], [(1, 7, PROMPT[7:15], False)], CPU), kv)
    logits = ours(StepBatch.build([], [(1, 15, PROMPT[15:], True)], CPU), kv)
    torch.testing.assert_close(logits[0], _reference_logits(hf, PROMPT)[-1], atol=TOL, rtol=0)


def test_mixed_batch_of_decodes_and_prefills_matches(pair) -> None:
    """Three sequences in different phases share one step; each row equals its own reference."""
    ours, hf = pair
    a, b, c = PROMPT[:9], PROMPT[4:16], PROMPT[::-1][:11]
    kv = _cache(ours)
    ours(StepBatch.build([], [(0, 0, a[:-1], False), (3, 0, b[:-1], False)], CPU), kv)
    # slots 0 and 3 decode (not contiguous: the cache is gathered), c prefills from scratch
    step = StepBatch.build(
        [DecodeSeq(0, len(a) - 1, a[-1]), DecodeSeq(3, len(b) - 1, b[-1])], [(1, 0, c, True)], CPU
    )
    assert step.decode.slot_start is None
    logits = ours(step, kv)
    for row, ids in enumerate((a, b, c)):
        torch.testing.assert_close(logits[row], _reference_logits(hf, ids)[-1], atol=TOL, rtol=0)


def test_contiguous_decode_slots_view_the_cache(pair) -> None:
    ours, hf = pair
    seqs = [PROMPT[:5], PROMPT[2:12], PROMPT[6:9]]
    kv = _cache(ours)
    ours(StepBatch.build([], [(slot, 0, ids[:-1], False) for slot, ids in enumerate(seqs)], CPU), kv)
    step = StepBatch.build([DecodeSeq(slot, len(ids) - 1, ids[-1]) for slot, ids in enumerate(seqs)], [], CPU)
    assert step.decode.slot_start == 0
    logits = ours(step, kv)
    for row, ids in enumerate(seqs):
        torch.testing.assert_close(logits[row], _reference_logits(hf, ids)[-1], atol=TOL, rtol=0)


def test_kv_slot_move_keeps_the_sequence(pair) -> None:
    ours, hf = pair
    kv = _cache(ours)
    ours(StepBatch.build([], [(3, 0, PROMPT[:-1], False)], CPU), kv)
    kv.move(3, 0, len(PROMPT) - 1)
    logits = ours(StepBatch.build([DecodeSeq(0, len(PROMPT) - 1, PROMPT[-1])], [], CPU), kv)
    torch.testing.assert_close(logits[0], _reference_logits(hf, PROMPT)[-1], atol=TOL, rtol=0)
