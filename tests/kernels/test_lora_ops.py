"""lora_shrink / lora_expand / add_lora on every backend against the torch reference.

Sweeps adapter popularity (distinct | uniform | zipf | identical), odd token counts, mixed ranks
in one stack (an empty slot included), tokens without an adapter, fused projections (q|k|v-like
unequal slices) and both stack layouts. The Triton kernels run interpreted on CPU (small sizes)
and compiled on CUDA under the `gpu` marker; the torch backend runs each strategy forced.
"""

from __future__ import annotations

import pytest
import torch

from kernels import AdapterStep, LoraBackend, LoraStack, cpu_extension, select_backend
from kernels.expand import lora_expand_ref
from kernels.shrink import lora_shrink_ref
from kernels.torch_backend import TorchBackend
from tests.cpu_kernels import require_compiler
from tests.kernels.lora_cases import (
    POPULARITIES,
    TOKEN_COUNTS,
    Case,
    interpreting,
    make_case,
    slot_ids_for,
)

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1")

# (backend, torch strategy, device)
BACKENDS = [
    pytest.param("torch", "segments", "cpu", id="torch-segments"),
    pytest.param("torch", "gather", "cpu", id="torch-gather"),
    pytest.param("torch", "auto", "cpu", id="torch-auto"),
    pytest.param("torch", "gather+fused", "cpu", id="torch-gather-fused"),  # kernels/csrc lora_gather
    pytest.param("torch", "auto+fused", "cpu", id="torch-auto-fused"),
    pytest.param("triton", "auto", "cpu", id="triton-interpreted", marks=no_interpreter),
    pytest.param("triton", "auto", "cuda", id="triton-cuda", marks=[pytest.mark.gpu, no_cuda]),
]
LAYOUTS = ["triton", "torch"]
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def backend_for(name: str, strategy: str, device: str) -> LoraBackend:
    if name == "torch":  # the fused gather kernel on or off explicitly, whatever this process loaded
        strategy, _, fused = strategy.partition("+")
        if fused:
            require_compiler()
            cpu_extension.load()
        return TorchBackend(strategy, fused_gather=bool(fused))  # type: ignore[arg-type]
    return select_backend(device, name, strategy=strategy)  # type: ignore[arg-type]


def reference_add_lora(case: Case) -> torch.Tensor:
    stack, y = case.stack, case.y.clone()
    h = lora_shrink_ref(case.x, stack.lora_a, case.batch, stack.scale)
    lora_expand_ref(h, stack.lora_b, case.batch, y)
    return y


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_shrink_matches_reference(
    name: str, strategy: str, device: str, layout: str, popularity: str, num_tokens: int
) -> None:
    case = make_case(slot_ids_for(popularity, num_tokens), layout=layout, device=device)
    stack = case.stack
    h = backend_for(name, strategy, device).shrink(
        case.x, stack.lora_a, case.batch, stack.scale, slot_ranks=stack.slot_ranks
    )
    expected = lora_shrink_ref(case.x, stack.lora_a, case.batch, stack.scale)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, expected, **FP32)
    assert not h[torch.tensor(case.slot_ids, device=device) < 0].any()  # no adapter: zero rows


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_expand_matches_reference(
    name: str, strategy: str, device: str, layout: str, popularity: str, num_tokens: int
) -> None:
    case = make_case(slot_ids_for(popularity, num_tokens), layout=layout, device=device)
    stack = case.stack
    # rows of tokens without an adapter hold garbage: expand must leave their y untouched
    h = torch.randn(num_tokens, stack.num_slices * stack.max_rank, generator=torch.Generator().manual_seed(3))
    h = h.to(device)
    y = case.y.clone()
    backend_for(name, strategy, device).expand(h, stack.lora_b, case.batch, y, slot_ranks=stack.slot_ranks)
    expected = case.y.clone()
    lora_expand_ref(h, stack.lora_b, case.batch, expected)
    torch.testing.assert_close(y, expected, **FP32)


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("popularity", [*POPULARITIES, "chunks"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_add_lora_matches_reference(
    name: str, strategy: str, device: str, layout: str, popularity: str, num_tokens: int
) -> None:
    """The call layers make: y += scale * (x A^T) B^T for q|k|v-like fused slices of y."""
    case = make_case(slot_ids_for(popularity, num_tokens), layout=layout, device=device)
    y = case.y.clone()
    backend_for(name, strategy, device).add_lora(case.x, y, case.stack, case.batch)
    torch.testing.assert_close(y, reference_add_lora(case), **FP32)


@pytest.mark.parametrize("slices", [(24,), (16, 16)], ids=["single", "gate-up"])
@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_other_projection_shapes(name: str, strategy: str, device: str, slices: tuple[int, ...]) -> None:
    """One projection (o, down) and two equal fused slices (gate|up), larger rank, ragged d_in."""
    case = make_case(
        slot_ids_for("zipf", 33),
        device=device,
        slices=slices,
        in_features=70,
        max_rank=16,
        ranks=(16, 5, 0, 9),
    )
    y = case.y.clone()
    backend_for(name, strategy, device).add_lora(case.x, y, case.stack, case.batch)
    torch.testing.assert_close(y, reference_add_lora(case), **FP32)


@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_wide_stacks(name: str, strategy: str, device: str, popularity: str) -> None:
    """P * r past four vectors (the fused kernel then makes several passes over A), odd widths."""
    case = make_case(
        slot_ids_for(popularity, 33),
        layout="torch",
        device=device,
        slices=(40, 24, 24),
        in_features=37,
        max_rank=32,
        ranks=(32, 7, 0, 20, 31),
    )
    y = case.y.clone()
    backend_for(name, strategy, device).add_lora(case.x, y, case.stack, case.batch)
    torch.testing.assert_close(y, reference_add_lora(case), **FP32)


@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_contract_form_single_tensors_without_ranks(name: str, strategy: str, device: str) -> None:
    """lora_shrink(x, A[S, r, d_in], batch, scale[S]) and lora_expand(h, B[S, d_out, r], batch, y)."""
    case = make_case(slot_ids_for("uniform", 33), device=device, slices=(24,))
    a, b, scale = case.stack.lora_a.contiguous(), case.stack.lora_b[0].contiguous(), case.stack.scale[:, 0]
    backend = backend_for(name, strategy, device)
    h = backend.shrink(case.x, a, case.batch, scale)
    torch.testing.assert_close(h, lora_shrink_ref(case.x, a, case.batch, scale), **FP32)
    y, expected = case.y.clone(), case.y.clone()
    backend.expand(h, b, case.batch, y)
    lora_expand_ref(h, b, case.batch, expected)
    torch.testing.assert_close(y, expected, **FP32)


@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_tokens_without_adapters_are_untouched(name: str, strategy: str, device: str) -> None:
    case = make_case([-1] * 7, device=device)
    backend = backend_for(name, strategy, device)
    y = case.y.clone()
    backend.add_lora(case.x, y, case.stack, case.batch)
    assert torch.equal(y, case.y)
    h = backend.shrink(case.x, case.stack.lora_a, case.batch, case.stack.scale)
    assert not h.any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_expand_reads_only_each_slots_rank(name: str, strategy: str, device: str, layout: str) -> None:
    """Mixed ranks: a low-rank slot's expand stops at its rank instead of paying for the stack's max.

    Garbage in B's padding columns would show in y if any backend read it. (The torch backend's
    bmm fallback for the triton layout reads the padding, as documented, so it is not checked.)
    """
    if name == "torch" and strategy != "segments" and layout == "triton":
        pytest.skip("the gathered bmm fallback multiplies the zero-padded rank")
    case = make_case(slot_ids_for("zipf", 33), layout=layout, device=device)
    stack = case.stack
    h = torch.randn(33, stack.num_slices * stack.max_rank, generator=torch.Generator().manual_seed(4)).to(
        device
    )
    expected = case.y.clone()
    lora_expand_ref(h, stack.lora_b, case.batch, expected)
    for slot, rank in enumerate(stack.host_ranks):
        for b in stack.lora_b:
            b[slot, :, rank:] = 1e6
    y = case.y.clone()
    backend_for(name, strategy, device).expand(h, stack.lora_b, case.batch, y, slot_ranks=stack.slot_ranks)
    torch.testing.assert_close(y, expected, **FP32)


@pytest.mark.parametrize("strategy", ["auto", "segments", "gather", "auto+fused"])
def test_one_plan_serves_stacks_of_different_shapes_and_ranks(strategy: str) -> None:
    """The step's metadata and its plan (made once, before any layer) serve every layer's stacks."""
    ids = slot_ids_for("zipf", 33)
    first = make_case(ids, layout="torch", ranks=(8, 3, 8, 5))
    second = make_case(ids, layout="torch", slices=(16, 16), in_features=24, ranks=(2, 8, 0, 6, 7), seed=5)
    backend = backend_for("torch", strategy, "cpu")
    step = AdapterStep.single(ids)
    step = step.with_plan(backend.plan_step(step, [first.stack, second.stack]))
    for case in (first, second, first):
        y = case.y.clone()
        backend.add_lora(case.x, y, case.stack, step)  # one step and plan for all calls
        torch.testing.assert_close(y, reference_add_lora(case), **FP32)


def test_auto_loops_long_segments_and_gathers_the_rest() -> None:
    """A mixed step at SmolLM2 gate|up size: one prefill chunk of 48 tokens plus 24 distinct decode tokens.

    The chunk's weights are worth one matmul; the single decode tokens are cheaper gathered.
    """
    ids = list(range(1, 25)) + [0] * 48
    case = make_case(ids, layout="torch", slices=(1536, 1536), in_features=576, max_rank=16, ranks=(16,))
    backend = TorchBackend("auto")
    step = AdapterStep.single(ids)
    plan = backend.plan_step(step, [case.stack])
    y = case.y.clone()
    backend.add_lora(case.x, y, case.stack, step, plan)
    torch.testing.assert_close(y, reference_add_lora(case), rtol=1e-4, atol=1e-4)
    (stack_plans,) = plan.passes
    assert [(p.split.loop_segments, p.split.num_gathered) for p in stack_plans.values()] == [((0,), 24)]


def test_plan_holds_only_what_the_chosen_path_reads() -> None:
    """The fused gather reads a row index, never embedding_bag bags; the torch ops read bags."""
    ids = slot_ids_for("distinct", 33)
    case = make_case(ids, layout="torch")
    step = AdapterStep.single(ids)
    torch_ops = TorchBackend("gather").plan_step(step, [case.stack]).passes[0]
    (only,) = torch_ops.values()
    assert only.row_index is None and only.input_bags and only.bags
    require_compiler()
    cpu_extension.load()
    fused = TorchBackend("gather", fused_gather=True).plan_step(step, [case.stack]).passes[0]
    (only,) = fused.values()
    assert only.row_index is not None and not only.input_bags and not only.bags


@pytest.mark.gpu
@no_cuda
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_bf16_on_gpu(popularity: str) -> None:
    """bf16 stacks and activations on CUDA, accumulated in fp32 (the reference computes in fp32)."""
    case = make_case(slot_ids_for(popularity, 33), device="cuda", dtype=torch.bfloat16)
    y = case.y.clone()
    select_backend("cuda").add_lora(case.x, y, case.stack, case.batch)
    torch.testing.assert_close(y, reference_add_lora(case), rtol=2e-2, atol=2e-2)


def test_reference_is_the_per_token_formula() -> None:
    """The reference itself, against y[t] += scale * (x[t] A[s]^T) B[s]^T written out per token."""
    case = make_case(slot_ids_for("zipf", 7))
    stack: LoraStack = case.stack
    expected = case.y.clone()
    r = stack.max_rank
    for t, slot in enumerate(case.slot_ids):
        if slot < 0:
            continue
        offset = 0
        for p, b in enumerate(stack.lora_b):
            h = stack.scale[slot, p] * (case.x[t] @ stack.lora_a[slot, p * r : (p + 1) * r].T)
            expected[t, offset : offset + b.shape[1]] += h @ b[slot].T
            offset += b.shape[1]
    torch.testing.assert_close(reference_add_lora(case), expected, **FP32)
