"""`loramux bench penalties`: what the sampling controls cost, the rows that use them and those beside them.

Part 1, the engine (in-process, the default SmolLM2 unless --model): decode throughput of a batch of
--batch requests at the API's default sampling (temperature 1.0), every request producing exactly
--new-tokens tokens, in these cases:
- `plain`: no request uses a control (the baseline);
- `8 penalized`: --penalized requests use frequency_penalty + presence_penalty + repetition_penalty,
  the rest none;
- `all penalized`: every request does;
- `8 min_p`: --penalized requests use min_p (its own sampling group), the rest none.
Decode throughput is B * (N - 1) / (T(N) - T(1)) (prefill and first token cancel out); the cases run
interleaved, --repeats rounds of all of them, and each keeps its best round, so a neighbour's noise
on the shared cores hits every case alike. `vs_plain` is a case's best over the baseline's best;
`vs_plain_median_round` the median over rounds of the ratio within a round.

Part 3, the whole step after the forward (processor + sampler) for each case of part 1, on
SmolLM2-shaped logits, one thread, the cases interleaved step by step: ms per step, median.

Part 2, the logits processor alone on a [batch, vocab] step (ms per step, median of --micro-steps,
one thread):
how a sequence's token counts are kept. `incremental` is server/engine/logits_processors.py (counts
kept per sequence and updated with the new token; a sparse gather/scatter over the tokens seen);
`on-demand dense` is the alternative it was measured against: bincount of each row's tokens every
step into a [rows, vocab] buffer, and the penalties over whole rows. Flags belong to this module.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bench.engine_bench import make_prompts, run_engine
from server.config import EngineConfig, ServerConfig
from server.engine.logits_processors import LogitsProcessor
from server.engine.request import PreparedRequest, SamplingParams
from server.runtime import build_engine

PLAIN = SamplingParams(temperature=1.0)
PENALIZED = replace(PLAIN, frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1)
MIN_P = replace(PLAIN, min_p=0.05)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="concurrent requests (default 32)")
    parser.add_argument("--penalized", type=int, default=8, help="requests with controls in the mixed cases")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every case (best kept)")
    parser.add_argument("--model", default=None, help="local checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=None, help="as `serve --threads`")
    parser.add_argument("--micro-steps", type=int, default=50, help="steps timed per micro case")
    parser.add_argument("--no-engine", action="store_true", help="only the processor micro-benchmark")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cases(batch: int, penalized: int) -> dict[str, list[SamplingParams]]:
    """Each case's params, one per request; controlled requests spread through the batch."""
    every = max(batch // max(penalized, 1), 1)
    mixed = [i % every == 0 and i // every < penalized for i in range(batch)]
    return {
        "plain": [PLAIN] * batch,
        f"{penalized} penalized": [PENALIZED if m else PLAIN for m in mixed],
        "all penalized": [PENALIZED] * batch,
        f"{penalized} min_p": [MIN_P if m else PLAIN for m in mixed],
    }


def engine_part(args: argparse.Namespace) -> dict[str, Any]:
    config = ServerConfig(
        model=args.model,
        device="cpu",
        threads=args.threads,
        engine=EngineConfig(max_running=args.batch, max_batched_tokens=max(512, args.batch)),
    )
    engine = build_engine(config)
    engine.start()
    try:
        prompts = make_prompts(engine.tokenizer, args.batch, args.prompt_tokens)
        all_cases = cases(args.batch, args.penalized)
        for params in all_cases.values():  # warm-up, every case once
            run_engine(engine, prompts, 2, sampling=params)
        rounds: list[dict[str, float]] = []  # per round: each case's decode tok/s
        for _ in range(args.repeats):
            decode: dict[str, float] = {}
            for name, params in all_cases.items():
                t_n = run_engine(engine, prompts, args.new_tokens, sampling=params)
                t_1 = run_engine(engine, prompts, 1, sampling=params)
                decode[name] = args.batch * (args.new_tokens - 1) / (t_n - t_1)
            rounds.append(decode)
    finally:
        engine.shutdown()
    best = {name: max(r[name] for r in rounds) for name in all_cases}
    return {
        name: {
            "decode_tok_s": round(best[name], 1),
            "vs_plain": round(best[name] / best["plain"], 3),
            # the same ratio within each round, median over rounds: less sensitive to a noisy round
            "vs_plain_median_round": round(statistics.median(r[name] / r["plain"] for r in rounds), 3),
        }
        for name in all_cases
    }


# -- part 2: the processor alone ----------------------------------------------------------------


@dataclass(eq=False)
class _Seq:
    request: PreparedRequest
    output_ids: list[int] = field(default_factory=list)


def _sequences(batch: int, penalized: int, vocab: int, prompt_tokens: int, outputs: int) -> list[_Seq]:
    rng = random.Random(0)
    return [
        _Seq(
            PreparedRequest(
                str(i),
                tuple(rng.randrange(vocab) for _ in range(prompt_tokens)),
                PENALIZED if i < penalized else PLAIN,
            ),
            [rng.randrange(vocab) for _ in range(outputs)],
        )  # fmt: skip
        for i in range(batch)
    ]


def _dense_on_demand(logits: torch.Tensor, seqs: list[_Seq]) -> Any:
    """The alternative: every step, bincount each penalized row's tokens, then [rows, vocab] ops."""
    rows = [i for i, s in enumerate(seqs) if s.request.sampling.processes_logits]
    if not rows:
        return
    counts = torch.zeros(len(rows), logits.shape[-1])  # [rows, vocab]
    for i, r in enumerate(rows):
        output = torch.tensor(seqs[r].output_ids)
        counts[i].index_add_(0, output, torch.ones(len(output)))
    seen = counts > 0
    for i, r in enumerate(rows):
        seen[i].index_fill_(0, torch.tensor(seqs[r].request.prompt_token_ids), True)
    params = [seqs[r].request.sampling for r in rows]
    repetition = torch.tensor([p.repetition_penalty for p in params]).unsqueeze(-1)
    frequency = torch.tensor([p.frequency_penalty for p in params]).unsqueeze(-1)
    presence = torch.tensor([p.presence_penalty for p in params]).unsqueeze(-1)
    index = torch.tensor(rows)
    values = logits.index_select(0, index)
    penalty = torch.where(seen, repetition, 1.0)
    values = torch.where(values > 0, values / penalty, values * penalty)
    values -= frequency * counts + presence * (counts > 0)
    logits.index_copy_(0, index, values)


def micro_part(args: argparse.Namespace, vocab: int = 49152) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for outputs in (32, 512):
        for penalized in (0, args.penalized, args.batch):
            seqs = _sequences(args.batch, penalized, vocab, args.prompt_tokens, outputs)
            processor = LogitsProcessor(frozenset())
            logits = torch.randn(args.batch, vocab)
            rng = random.Random(1)
            times: dict[str, list[float]] = {"incremental": [], "on-demand dense": []}
            processor.apply(logits, seqs)  # the counts of the tokens so far, as a running engine has them
            for _ in range(args.micro_steps):
                for seq in seqs:
                    seq.output_ids.append(rng.randrange(vocab))
                for name, apply in (("incremental", processor.apply), ("on-demand dense", _dense_on_demand)):
                    start = time.perf_counter()
                    apply(logits, seqs)
                    times[name].append(time.perf_counter() - start)
            result[f"{penalized}/{args.batch} penalized, {outputs} tokens out"] = {
                name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()
            }
    return {"ms_per_step": result}


def after_forward_part(args: argparse.Namespace, vocab: int = 49152) -> dict[str, float]:
    """ms per step of what runs between the forward and the next step (processor + sampler) for each
    case, on SmolLM2-shaped logits, the cases interleaved step by step; median of --micro-steps."""
    from bench.sampling_bench import make_logits
    from server.engine.sampling import Sampler

    logits = make_logits("lm", args.batch, vocab)
    runs = {}
    for name, params in cases(args.batch, args.penalized).items():
        seqs = _sequences(args.batch, 0, vocab, args.prompt_tokens, 32)
        for seq, p in zip(seqs, params, strict=True):
            seq.request = replace(seq.request, sampling=p)
        runs[name] = (LogitsProcessor(frozenset()), Sampler(torch.Generator().manual_seed(0)), seqs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    rng = random.Random(2)
    for _ in range(args.micro_steps):
        for name, (processor, sampler, seqs) in runs.items():
            for seq in seqs:
                seq.output_ids.append(rng.randrange(vocab))
            step = logits.clone()
            start = time.perf_counter()
            processor.apply(step, seqs)
            sampler.sample(step, [s.request.sampling for s in seqs], [None] * len(seqs))
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}


def main(args: argparse.Namespace) -> int:
    if args.batch < 1 or not 0 <= args.penalized <= args.batch or args.new_tokens < 2 or args.repeats < 1:
        raise SystemExit("bench penalties: need --batch >= 1, 0 <= --penalized <= --batch, --new-tokens >= 2")
    result: dict[str, Any] = {
        "batch": args.batch,
        "penalized": args.penalized,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "controls": "frequency_penalty=0.5 presence_penalty=0.5 repetition_penalty=1.1; min_p=0.05; T=1.0",
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine runs on shared, busy cores (server/engine/threads.py)
    with torch.inference_mode():
        result["processor"] = micro_part(args)
        result["after_forward_ms_per_step"] = after_forward_part(args)
    torch.set_num_threads(threads)
    if not args.no_engine:
        result["engine"] = engine_part(args)
    result["torch_threads"] = torch.get_num_threads()
    result["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0
