"""The whole engine on a CUDA GPU (`gpu` marker; skipped without one): LoRA, ComPEFT and MoS adapters
and the base model in one batch, the compressed ones from their compact device slots (the Triton
MoS and ternary kernels), against PEFT running each adapter's materialized LoRA on the CPU.

fp32 must give PEFT's logits (the kernels' dots are IEEE fp32) and PEFT's greedy tokens through the
scheduler and sampler; bf16, the GPU's default dtype, must stay within bf16's rounding of them.
The setup (tiny Llama, the three adapters, their PEFT exports) is tests/test_formats_batch.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.runtime import build_engine
from tests.test_engine import submit, wait_idle
from tests.test_formats_batch import NAMES, _logits, batch_case, peft_model, pinned, setup  # noqa: F401

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _gpu_engine(setup: dict[str, Any], dtype: str) -> Engine:  # noqa: F811
    config = ServerConfig(
        model=str(setup["base"]),
        device=DEVICE,
        dtype=dtype,
        engine=EngineConfig(max_running=8, max_model_len=256, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(setup["root"]),), max_slots=4, max_rank=8),
    )
    engine = build_engine(config)
    engine.start()
    return engine


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def gpu_engine(request, setup) -> Iterator[Engine]:  # noqa: F811
    engine = _gpu_engine(setup, request.param)
    yield engine
    engine.shutdown()


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical"])
def test_one_gpu_batch_of_every_format_gives_peft_logits(
    gpu_engine: Engine,
    peft_model,  # noqa: F811
    popularity: str,
) -> None:
    assert gpu_engine.model.device.type == "cuda"
    adapters, prompts = batch_case(popularity)
    with pinned(gpu_engine, adapters) as slots:
        prefill, decode = _logits(gpu_engine, prompts, slots)
        alone = [_logits(gpu_engine, [p], [s])[1][0] for p, s in zip(prompts, slots, strict=True)]
    names = [a or "__base__" for a in adapters]
    with torch.no_grad():
        theirs = peft_model(torch.tensor(prompts), adapter_names=names).logits
    errors = (_relative_error(prefill, theirs[:, -2]), _relative_error(decode, theirs[:, -1]))
    print(
        f"{gpu_engine.model.dtype} {popularity}: relative error prefill {errors[0]:.2e} decode {errors[1]:.2e}"
    )
    if gpu_engine.model.dtype == torch.float32:
        torch.testing.assert_close(prefill, theirs[:, -2], atol=2e-4, rtol=0)
        torch.testing.assert_close(decode, theirs[:, -1], atol=2e-4, rtol=0)
        torch.testing.assert_close(decode, torch.stack(alone), atol=2e-4, rtol=0)
    else:  # bf16 weights and activations: about 3 significant digits, compounded over the layers
        assert max(errors) < 5e-2, errors
        assert _relative_error(decode, torch.stack(alone)) < 5e-2


def test_greedy_generation_on_the_gpu_equals_peft_generate(gpu_engine: Engine, peft_model) -> None:  # noqa: F811
    """Through the scheduler, the adapter manager's device slots and the sampler on the GPU."""
    from tests.test_adapters_engine import _peft_greedy

    prompt = [17, 300, 42, 901, 5, 77, 1200]
    requests = [*NAMES, "", "mos", "compeft", "lora"]
    sinks = [submit(gpu_engine, f"gpu-{i}", prompt, GREEDY, adapter=name) for i, name in enumerate(requests)]
    got = [sink.wait().tokens for sink in sinks]
    wait_idle(gpu_engine)
    expected = {name: _peft_greedy(peft_model, name, prompt, GREEDY.max_tokens) for name in set(requests)}
    assert all(len(tokens) == GREEDY.max_tokens for tokens in got)
    same = [tokens == expected[name] for name, tokens in zip(requests, got, strict=True)]
    print(f"{gpu_engine.model.dtype} greedy: {sum(same)} of {len(same)} requests as PEFT fp32")
    if gpu_engine.model.dtype == torch.float32:
        assert all(same), [name for name, s in zip(requests, same, strict=True) if not s]
    # bf16 may pick another token where two are near-tied, and every later token then differs: its
    # numerics are the logits test's; here it must run every request to its length.
