"""Kernels micro-benchmark: the LoRA term of one decode step on CPU, torch backend vs a naive baseline.

One "step" is what the model does per engine step: build the step's AdapterStep and the backend's
plan for it (`plan_step`, once, over every stack), then add the adapter term of every adapted projection in all layers (SmolLM2-135M shapes: hidden 576, q 576,
kv 192, intermediate 1536, 30 layers), each layer with its own stacks of `--slots` adapters.

- W1: rank 8 on q, k, v, o (fused q|k|v + o per layer)
- W2: rank 16 on all seven projections (q|k|v, o, gate|up, down)

Adapter popularity over a decode batch: distinct (one adapter per token), uniform (sqrt(batch)
adapters, round-robin), zipf:1.5 (token adapters drawn from a Zipf law over the slots, fixed seed),
identical (one adapter); prefill:N (not in the default list) adds to the distinct decode batch a
prompt chunk of N tokens for slot 0, a mixed step. `naive` is per projection, unfused, gathered `A[slot]` / `B[slot]` batched
matmuls (the ~34 ms / 155-189 ms figures of DESIGN.md); `auto`, `segments` and `gather` are the
torch backend with its strategy chosen per layer or forced; `+fused` runs its gather path as the
fused CPU kernel (`lora_gather`, kernels/csrc/lora_gather.h, what the server uses when the fused
model kernels are loaded). Times are the median of --repeats
steps after one warm-up, in ms per step. Flags belong to this module (`add_arguments`, `main`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kernels import AdapterStep, LoraStack, StackLayout, TorchBackend, cpu_extension

HIDDEN, Q_SIZE, KV_SIZE, INTERMEDIATE, LAYERS = 576, 576, 192, 1536, 30


@dataclass(frozen=True)
class Projection:
    name: str
    in_features: int
    output_slices: tuple[int, ...]


QKV = Projection("qkv", HIDDEN, (Q_SIZE, KV_SIZE, KV_SIZE))
O_PROJ = Projection("o", Q_SIZE, (HIDDEN,))
GATE_UP = Projection("gate_up", HIDDEN, (INTERMEDIATE, INTERMEDIATE))
DOWN = Projection("down", INTERMEDIATE, (HIDDEN,))
WORKLOADS = {"W1": (8, (QKV, O_PROJ)), "W2": (16, (QKV, O_PROJ, GATE_UP, DOWN))}
POPULARITIES = ("distinct", "uniform", "zipf:1.5", "identical")
METHODS = ("naive", "auto", "segments", "gather", "auto+fused", "gather+fused")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="decode tokens per step (default 32)")
    parser.add_argument("--slots", type=int, default=32, help="adapters per stack (device slots)")
    parser.add_argument("--workloads", default="W1,W2", help="comma list of W1, W2")
    parser.add_argument(
        "--popularity", default=",".join(POPULARITIES), help="comma list (also prefill:N, a mixed step)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per cell (median kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def slot_ids_for(popularity: str, batch: int, slots: int, seed: int = 0) -> list[int]:
    """The adapter slot of each decode token under one popularity pattern."""
    if popularity == "distinct":
        if batch > slots:
            raise SystemExit(f"distinct popularity needs --slots >= --batch ({slots} < {batch})")
        return list(range(batch))
    if popularity == "uniform":
        active = max(1, round(math.sqrt(batch)))
        return [i % active for i in range(batch)]
    if popularity == "identical":
        return [0] * batch
    if popularity.startswith("prefill:"):  # the distinct decode batch plus one prompt chunk of slot 0
        return list(range(batch)) + [0] * int(popularity.split(":", 1)[1])
    if popularity.startswith("zipf:"):
        alpha = float(popularity.split(":", 1)[1])
        weights = torch.tensor([1.0 / (k + 1) ** alpha for k in range(slots)])
        draws = torch.multinomial(
            weights, batch, replacement=True, generator=torch.Generator().manual_seed(seed)
        )
        return draws.tolist()
    raise SystemExit(f"unknown popularity {popularity!r}: use distinct, uniform, zipf:ALPHA or identical")


def make_stacks(
    rank: int, projections: tuple[Projection, ...], slots: int, layout: StackLayout
) -> list[list[LoraStack]]:
    """[layer][projection] stacks, every slot holding a full-rank adapter (same values per layout)."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        stacks = []
        for proj in projections:
            stack = LoraStack.empty(slots, rank, proj.in_features, proj.output_slices, layout=layout)
            for tensor in (stack.lora_a, *stack.lora_b):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
            stack.scale.fill_(2.0)
            stack.slot_ranks.fill_(rank)
            stack.host_ranks[:] = [rank] * slots
            stack.host_scales[:] = [(2.0,) * len(proj.output_slices)] * slots
            stacks.append(stack)
        layers.append(stacks)
    return layers


def naive_term(x: torch.Tensor, y: torch.Tensor, stack: LoraStack, slot_ids: torch.Tensor) -> None:
    """Per projection, unfused: gather each token's A and B, two batched matmuls, scale."""
    has_adapter = (slot_ids >= 0).to(x.dtype).view(-1, 1, 1)
    slots = slot_ids.clamp(min=0).long()
    r, offset = stack.max_rank, 0
    for p, b in enumerate(stack.lora_b):
        a = stack.lora_a[:, p * r : (p + 1) * r]  # [S, r, d_in]
        h = torch.bmm(x.unsqueeze(1), a[slots].transpose(1, 2)) * stack.scale[slots, p].view(-1, 1, 1)
        delta = torch.bmm(h * has_adapter, b[slots].transpose(1, 2)).squeeze(1)
        y[:, offset : offset + b.shape[1]] += delta
        offset += b.shape[1]


def time_step(step: Callable[[], None], repeats: int) -> float:
    """Median ms of `repeats` steps after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def bench_cell(
    layers: list[list[LoraStack]], slot_ids: list[int], method: str, repeats: int
) -> tuple[float, torch.Tensor]:
    """ms per step and the last step's outputs (to check every method computes the same)."""
    stacks0 = layers[0]
    xs = [
        torch.randn(len(slot_ids), s.in_features, generator=torch.Generator().manual_seed(1)) for s in stacks0
    ]
    ys = [torch.zeros(len(slot_ids), s.out_features) for s in stacks0]
    strategy, _, fused = method.partition("+")
    if fused:
        cpu_extension.load()
    backend = None if method == "naive" else TorchBackend(strategy, fused_gather=bool(fused))  # type: ignore[arg-type]
    all_stacks = [stack for stacks in layers for stack in stacks]

    def step() -> None:
        for y in ys:
            y.zero_()
        if backend is None:
            ids = torch.tensor(slot_ids, dtype=torch.int32)
            for stacks in layers:
                for x, y, stack in zip(xs, ys, stacks, strict=True):
                    naive_term(x, y, stack, ids)
        else:
            adapter_step = AdapterStep.single(slot_ids)
            adapter_step = adapter_step.with_plan(backend.plan_step(adapter_step, all_stacks))
            for stacks in layers:
                for x, y, stack in zip(xs, ys, stacks, strict=True):
                    backend.add_lora(x, y, stack, adapter_step)

    with torch.inference_mode():
        ms = time_step(step, repeats)
    return ms, torch.cat(ys, dim=1)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "batch": args.batch,
        "slots": args.slots,
        "layers": LAYERS,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "ms_per_step": {},
    }
    for workload in args.workloads.split(","):
        rank, projections = WORKLOADS[workload]
        # naive runs on the plain (triton) layout, the torch backend on its own
        stacks = {
            layout: make_stacks(rank, projections, args.slots, layout) for layout in ("triton", "torch")
        }
        for popularity in args.popularity.split(","):
            slot_ids = slot_ids_for(popularity, args.batch, args.slots)
            cell: dict[str, float] = {}
            reference = None
            for method in args.methods.split(","):
                layers = stacks["triton" if method == "naive" else "torch"]
                cell[method], out = bench_cell(layers, slot_ids, method, args.repeats)
                if reference is None:
                    reference = out
                elif not torch.allclose(out, reference, rtol=1e-4, atol=1e-4):
                    raise SystemExit(
                        f"{workload} {popularity}: {method} disagrees with {args.methods.split(',')[0]}"
                    )
            results["ms_per_step"][f"{workload} {popularity}"] = cell
            if not args.json:
                print(
                    f"{workload} {popularity:>10} ({len(set(slot_ids))} adapters): "
                    + "  ".join(f"{m} {v:7.2f} ms" for m, v in cell.items()),
                    flush=True,
                )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels_bench", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
