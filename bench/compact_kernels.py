"""Compact-form kernels micro-benchmark (CUDA only): MoS and ternary vs plain LoRA Triton kernels.

One decode step of `--batch` tokens over `--slots` distinct adapters (default 32 and 32: every token
its own adapter), per fused projection group of one SmolLM2-135M layer (hidden 576, q 576, kv 192,
intermediate 1536): q|k|v, o, gate|up, down. For each group and format it first checks the kernels
against their torch references on this step (the error of the term it adds, relative to the
term), then times shrink + expand (triton.testing.do_bench, median): `us` as called from Python,
launch costs included, and `graph us` replayed from a CUDA graph, the device's own time (GB/s is
over the latter). It also reports the slot bytes the step reads:

- lora: kernels.shrink / kernels.expand over a LoraStack of rank `--rank` in `--dtype`.
- mos: kernels.mos over a MosStack: r = `--rank`, l = `--shards`, pools of R = `--pool-rank`
  (N = R * 30 * l rows per projection, shared by the 30 layers; a step reads the shards its
  tables name, at most r * (d_in + out) values per projection, from pools R * 30 * (d_in + out)).
- ternary: kernels.ternary over a TernaryStack of rank `--rank` (2-bit codes, int32 words).

On a machine without CUDA it says so and exits 0 (the kernels run on CPU only interpreted, which
measures nothing). Results go to bench/RESULTS.md by hand, with the card's name.
    python -m bench.compact_kernels [--batch 32] [--slots 32] [--rank 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

HIDDEN, Q_SIZE, KV_SIZE, INTERMEDIATE, LAYERS = 576, 576, 192, 1536, 30
GROUPS = {
    "q|k|v": (HIDDEN, (Q_SIZE, KV_SIZE, KV_SIZE)),
    "o": (Q_SIZE, (HIDDEN,)),
    "gate|up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}
DEVICE = "cuda"  # the kernels are timed compiled; tests may point this at an interpreted CPU
# scale * gamma^2 of the ternary slots: makes their term about as large as the others' (with 1e-3
# it fell under bf16's rounding of y, and the error column compared y with itself)
TERNARY_SCALE = 0.02
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="decode tokens in the step")
    parser.add_argument("--slots", type=int, default=32, help="distinct adapters (slots) in the step")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank, MoS r, ComPEFT rank")
    parser.add_argument("--shards", type=int, default=2, help="MoS shards_per_vector l")
    parser.add_argument("--pool-rank", type=int, default=4, help="MoS pool rank R (N = R * layers * l)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--json", help="also write the results here")


def _random_signs(*shape: int, density: float = 0.1) -> torch.Tensor:
    keep = torch.rand(*shape) < density
    return ((torch.randint(0, 2, shape) * 2 - 1) * keep).to(torch.int8)


def _stacks(in_features: int, slices: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    from kernels import LoraStack
    from kernels.mos import MosStack
    from kernels.ternary import TernaryStack, pack_ternary

    dtype, device, r, shards = DTYPES[args.dtype], DEVICE, args.rank, args.shards
    lora = LoraStack.empty(args.slots, r, in_features, slices, layout="triton", dtype=dtype, device=device)
    ternary = TernaryStack.empty(args.slots, r, in_features, slices, device=device)
    rows = args.pool_rank * LAYERS * shards
    mos = MosStack.empty(
        args.slots,
        1,  # one layer's tables: the pools are the whole model's, as in a served slot
        in_features,
        slices,
        max_rank=r,
        max_shards=shards,
        capacity_a=len(slices) * rows * in_features // shards,
        capacity_b=rows * sum(slices) // shards,
        dtype=dtype,
        device=device,
    )
    for slot in range(args.slots):
        lora.set_slot(
            slot,
            [torch.randn(r, in_features, device=device, dtype=dtype) * in_features**-0.5 for _ in slices],
            [torch.randn(w, r, device=device, dtype=dtype) for w in slices],
            [0.5] * len(slices),
        )
        ternary.set_slot(
            slot,
            [pack_ternary(_random_signs(r, in_features)).to(device) for _ in slices],
            [pack_ternary(_random_signs(w, r)).to(device) for w in slices],
            [TERNARY_SCALE] * len(slices),
        )
        pools = [
            (torch.randn(rows, in_features // shards) * 0.05, torch.randn(rows, w // shards)) for w in slices
        ]
        tables = [
            [(torch.randint(0, rows, (r * shards,)), torch.randint(0, rows, (r * shards,))) for _ in slices]
        ]
        mos.set_slot(slot, mos.slot_data(pools, tables, num_shards=shards, rank=r, scale=2.0))
    return {"lora": lora, "mos": mos, "ternary": ternary}


def _runs(stacks: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Per format: (kernels, references), each a function (x, y, batch) -> None adding the term."""
    from kernels.expand import lora_expand, lora_expand_ref
    from kernels.mos import mos_add
    from kernels.shrink import lora_shrink, lora_shrink_ref
    from kernels.ternary import ternary_add

    lora, mos, ternary = stacks["lora"], stacks["mos"].layer(0), stacks["ternary"]

    def lora_run(shrink: Any, expand: Any) -> Any:
        def run(x: torch.Tensor, y: torch.Tensor, batch: Any) -> None:
            h = shrink(x, lora.lora_a, batch, lora.scale, slot_ranks=lora.slot_ranks)
            expand(h, lora.lora_b, batch, y, slot_ranks=lora.slot_ranks)

        return run

    return {
        "lora": (lora_run(lora_shrink, lora_expand), lora_run(lora_shrink_ref, lora_expand_ref)),
        "mos": (
            lambda x, y, b: mos_add(x, y, mos, b),
            lambda x, y, b: mos_add(x, y, mos, b, reference=True),
        ),
        "ternary": (
            lambda x, y, b: ternary_add(x, y, ternary, b),
            lambda x, y, b: ternary_add(x, y, ternary, b, reference=True),
        ),
    }


def _bytes_read(
    name: str, stack: Any, in_features: int, slices: tuple[int, ...], args: argparse.Namespace
) -> int:
    """Slot bytes the step's tokens read (each distinct slot once)."""
    used = min(args.slots, args.batch)
    element = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    values = args.rank * (len(slices) * in_features + sum(slices))
    if name == "lora":
        return used * values * element
    if name == "ternary":
        return (
            used * (len(slices) * args.rank * -(-in_features // 16) + sum(slices) * -(-args.rank // 16)) * 4
        )
    tables = 2 * len(slices) * args.rank * args.shards * 4
    return used * (values * element + tables)


def _graph_ms(call: Any, replays: int = 20) -> float | None:
    """Milliseconds per call with the calls captured in a CUDA graph and replayed: the device's own
    time, without Python's launch cost (what the `us` column measures once launches dominate).
    None when the capture fails."""
    import triton.testing

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()  # compiled and warm before the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(replays):
                call()
        return triton.testing.do_bench(graph.replay, warmup=25, rep=200) / replays
    except Exception as error:  # noqa: BLE001 - a figure missing, not a failed benchmark
        print(f"CUDA graph capture failed: {error}", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("bench/compact_kernels.py needs a CUDA GPU (the Triton kernels only run interpreted on CPU)")
        return 0
    import triton.testing

    from kernels import AdapterBatch

    torch.manual_seed(0)
    slot_ids = [t % args.slots for t in range(args.batch)]
    batch = AdapterBatch.build(slot_ids, DEVICE)
    results: list[dict[str, Any]] = []
    print(
        f"{torch.cuda.get_device_name()}: batch {args.batch}, {args.slots} adapters, rank {args.rank}, {args.dtype}"
    )
    print(
        f"{'group':8} {'format':8} {'us':>8} {'graph us':>9} {'slot MB read':>13} {'GB/s':>7} {'max err':>9}"
    )
    for group, (in_features, slices) in GROUPS.items():
        stacks = _stacks(in_features, slices, args)
        x = torch.randn(args.batch, in_features, device=DEVICE, dtype=DTYPES[args.dtype])
        y = torch.randn(args.batch, sum(slices), device=DEVICE, dtype=DTYPES[args.dtype])
        for name, (run, reference) in _runs(stacks).items():
            got, expected = y.clone(), y.clone()
            run(x, got, batch)
            reference(x, expected, batch)
            # the error of the term each adds, against the term's size (not y's, which would hide it)
            term = expected.float() - y.float()
            error = float((got.float() - expected.float()).abs().max() / term.abs().max().clamp(min=1e-6))
            scratch = y.clone()  # accumulates over the repeats: a copy per call would be timed too
            ms = triton.testing.do_bench(
                lambda run=run, x=x, out=scratch: run(x, out, batch), warmup=25, rep=200
            )
            graph_ms = _graph_ms(lambda run=run, x=x, out=scratch: run(x, out, batch))
            nbytes = _bytes_read(name, stacks[name], in_features, slices, args)
            results.append(
                {
                    "group": group,
                    "format": name,
                    "us": ms * 1e3,
                    "graph_us": None if graph_ms is None else graph_ms * 1e3,
                    "bytes": nbytes,
                    "max_rel_err": error,
                }
            )
            shown = "n/a" if graph_ms is None else f"{graph_ms * 1e3:.1f}"
            print(
                f"{group:8} {name:8} {ms * 1e3:8.1f} {shown:>9} {nbytes / 2**20:13.2f} "
                f"{nbytes / (graph_ms or ms) / 1e6:7.1f} {error:9.2e}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
