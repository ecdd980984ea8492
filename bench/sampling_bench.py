"""Sampling micro-benchmark: one step's next tokens for a [batch, vocab] logits tensor, old vs new.

`old` is the sampler before server/engine/sampling.py's Sampler, reimplemented here as the
baseline: greedy rows by one max(), every other row alone, with a full-vocabulary sort unless
top_k is set, then torch.multinomial. `new` is `Sampler.sample`. Every row of a case has the same
params and its own seeded generator. Times are the median of --repeats calls after one warm-up,
in ms per call, both sides in one process.

Logits: `lm` (default) is shaped like SmolLM2's (standard deviation ~3.6, a few tokens standing
~5 deviations above the rest, so a T=0.7 top_p=0.9 nucleus holds a few to a few dozen tokens);
`flat` is a standard normal, where top_p=0.9 needs thousands of tokens and every row takes the
full-sort fallback: the worst case. Flags belong to this module (`add_arguments`, `main`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from server.engine.request import SamplingParams
from server.engine.sampling import Sampler, TopPSearch

CASES = {
    "T=1.0": SamplingParams(temperature=1.0),
    "T=0.7 top_p=0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "T=0.7 top_k=50": SamplingParams(temperature=0.7, top_k=50),
    "greedy": SamplingParams(temperature=0.0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="rows per call (default 32)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default SmolLM2's)")
    parser.add_argument("--logits", choices=["lm", "flat"], default="lm", help="logit shape (default lm)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per side (median kept)")
    parser.add_argument("--top-p-blocks", type=int, default=TopPSearch.blocks, help="TopPSearch.blocks")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def make_logits(kind: str, batch: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "flat":
        return torch.randn(batch, vocab, generator=g)
    logits = torch.randn(batch, vocab, generator=g) * 3.6
    peaks = torch.randint(0, vocab, (batch, 8), generator=g)
    boost = 12.0 + 4.0 * torch.rand(batch, 8, generator=g)  # the few plausible next tokens
    return logits.scatter_add_(1, peaks, boost)


def old_sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """The previous sampler, verbatim in behaviour: per row, a full sort unless top_k."""
    tokens = logits.max(dim=-1).indices.tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scaled = logits[row] / p.temperature
        if p.top_k and p.top_k < scaled.shape[0]:
            values, indices = torch.topk(scaled, p.top_k)
        else:
            values, indices = torch.sort(scaled, descending=True)
        probs = torch.softmax(values, dim=-1)
        if p.top_p < 1.0:
            cumulative = torch.cumsum(probs, dim=-1)
            probs = torch.where((cumulative - probs) < p.top_p, probs, torch.zeros_like(probs))
        tokens[row] = int(indices[torch.multinomial(probs, 1, generator=gen)])
    return tokens


def median_ms(repeats: int, fn: Callable[[], Any]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def fallback_rows(logits: torch.Tensor, params: SamplingParams, search: TopPSearch) -> int:
    """Rows whose nucleus reaches past the head the block search finds: the sampler sorts them in full.

    Counted as rows whose nucleus is wider than `search.candidates` or than `search.blocks`
    blocks (an upper bound on the real fallbacks; the sampler's own test is finer)."""
    if params.greedy or params.top_p >= 1.0 or params.top_k:
        return 0
    probs = torch.softmax(logits / params.temperature, -1).sort(-1, descending=True).values
    nucleus = ((probs.cumsum(-1) - probs) < params.top_p).sum(-1)
    return int((nucleus > min(search.candidates, search.blocks)).sum())


def main(args: argparse.Namespace) -> int:
    logits = make_logits(args.logits, args.batch, args.vocab)
    search = TopPSearch(blocks=args.top_p_blocks)
    sampler = Sampler(torch.Generator().manual_seed(0), search)
    generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
    rows = []
    for name, params in CASES.items():
        batch_params = [params] * args.batch
        old = median_ms(args.repeats, lambda ps=batch_params: old_sample(logits, ps, generators))
        new = median_ms(args.repeats, lambda ps=batch_params: sampler.sample(logits, ps, generators))
        rows.append(
            {
                "case": name,
                "old_ms": old,
                "new_ms": new,
                "speedup": round(old / new, 1),
                "fallback_rows": fallback_rows(logits, params, search),
            }
        )
    result = {
        "batch": args.batch,
        "vocab": args.vocab,
        "logits": args.logits,
        "top_p_search": repr(search),
        "torch_threads": torch.get_num_threads(),
        "cases": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"[{args.batch}, {args.vocab}] {args.logits} logits, {search}, "
        f"{torch.get_num_threads()} threads, median ms per call"
    )
    print(f"{'case':>18} {'old ms':>9} {'new ms':>9} {'speedup':>8} {'fallback rows':>14}")
    for row in rows:
        print(
            f"{row['case']:>18} {row['old_ms']:>9} {row['new_ms']:>9} {row['speedup']:>7}x"
            f" {row['fallback_rows']:>14}"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.sampling_bench", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
