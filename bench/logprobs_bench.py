"""`loramux bench logprobs`: what sampled-token log-probs cost a decode step.

The engine (the default SmolLM2 unless --model) generates --new-tokens tokens for --batch
prompts, every row asking `logprobs = --top-logprobs` (the token's own log-prob, its rank and
that many alternatives), against the same batch asking for none; both sides sample with the API's
default (temperature 1.0 unless --temperature). Decode throughput is B * (N - 1) / (T(N) - T(1))
as in `bench engine`, so the prefill and first token cancel out. The two sides alternate
(off, on, off, on, ...) for --repeats rounds in one process, and each side keeps its median,
so a neighbour that slows the machine for a while slows both: `cost` = the median decode step
with log-probs over the median without, minus 1; `cost_paired` the median of the rounds' own
ratios. On a shared machine both swing by more than the effect, so `logprobs_ms` measures the
log-prob work alone (Logprobs.begin + finish on one step's [batch, vocab] of the model's logit
shape, median of 50 calls) and `logprobs_share` divides it by the decode step without log-probs
(`step_ms_off`): the steadier estimate of the same cost.
A micro-benchmark: it drives the engine in-process, not over the wire.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from bench.engine_bench import make_prompts, run_engine
from bench.sampling_bench import make_logits
from server.config import EngineConfig, ServerConfig
from server.engine.logprobs import Logprobs, TokenTexts
from server.engine.request import SamplingParams
from server.runtime import build_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="concurrent sequences (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--top-logprobs", type=int, default=5, help="alternatives per token (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (median kept)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--model", default=None, help="local checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=None, help="as `serve --threads`")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def step_ms(batch: int, vocab: int, alternatives: int, tokenizer: Any) -> float:
    """Median ms of the log-prob work of one step where every row asks."""
    logits = make_logits("lm", batch, vocab)
    params = [SamplingParams(logprobs=alternatives)] * batch
    logprobs = Logprobs(TokenTexts(tokenizer))
    tokens = logits.max(-1).indices.tolist()
    times = []
    for _ in range(51):
        start = time.perf_counter()
        logprobs.finish(logprobs.begin(logits, params), tokens)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[1:]) * 1e3, 2)


def main(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise SystemExit("bench logprobs: need --batch >= 1, --new-tokens >= 2, --repeats >= 1")
    config = ServerConfig(
        model=args.model,
        device="cpu",
        threads=args.threads,
        engine=EngineConfig(max_running=args.batch, max_batched_tokens=max(512, args.batch)),
    )
    engine = build_engine(config)
    engine.start()
    prompts = make_prompts(engine.tokenizer, args.batch, args.prompt_tokens)
    off = SamplingParams(temperature=args.temperature)
    sides = {"off": off, "on": replace(off, logprobs=args.top_logprobs)}
    times: dict[str, dict[int, list[float]]] = {side: {1: [], args.new_tokens: []} for side in sides}
    try:
        for sampling in sides.values():  # warm-up
            run_engine(engine, prompts, 2, sampling=sampling)
        for _ in range(args.repeats):
            for n in (args.new_tokens, 1):
                for side, sampling in sides.items():
                    times[side][n].append(run_engine(engine, prompts, n, sampling=sampling))
    finally:
        engine.shutdown()
    n = args.new_tokens
    # Per round and side: seconds per decode step, (T(N) - T(1)) / (N - 1).
    step_s = {
        side: [(tn - t1) / (n - 1) for tn, t1 in zip(t[n], t[1], strict=True)] for side, t in times.items()
    }
    off_s, on_s = statistics.median(step_s["off"]), statistics.median(step_s["on"])
    work_ms = step_ms(args.batch, engine.model.arch.vocab_size, args.top_logprobs, engine.tokenizer)
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "new_tokens": n,
        "prompt_tokens": args.prompt_tokens,
        "temperature": args.temperature,
        "top_logprobs": args.top_logprobs,
        "repeats": args.repeats,
        "off_tok_s": round(args.batch / off_s, 1),
        "on_tok_s": round(args.batch / on_s, 1),
        "cost": round(on_s / off_s - 1, 3),  # medians of each side
        "cost_paired": round(
            statistics.median(b / a - 1 for a, b in zip(step_s["off"], step_s["on"], strict=True)), 3
        ),
        "step_ms_off": round(off_s * 1e3, 1),
        "logprobs_ms": work_ms,  # the log-prob work alone, per step
        "logprobs_share": round(work_ms / (off_s * 1e3), 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value}")
    return 0
