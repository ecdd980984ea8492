"""`loramux bench engine`: our engine's generation throughput against transformers `generate`.

Same model (the default SmolLM2 unless --model), same prompts of the same length, greedy,
every request producing exactly --new-tokens tokens (EOS ignored on both sides). Throughput is
generated tokens / wall time of the whole batch, prefill included, best of --repeats runs after
one warm-up each. A micro-benchmark: it drives the engine in-process, not over the wire.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from typing import Any

import torch

from server.config import EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, RequestOutput, SamplingParams
from server.runtime import build_engine

_TEXT = (
    "The history of the printing press begins with movable type in East Asia and continues in "
    "Europe, where Gutenberg combined a screw press, oil-based ink and cast metal type into a "
    "system that could produce books quickly and cheaply; within decades presses spread to more "
    "than two hundred cities, and the price of books fell so far that reading became common."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="concurrent sequences (default 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (best is kept)")
    parser.add_argument("--model", default=None, help="local checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def make_prompts(tokenizer: Any, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(_TEXT, add_special_tokens=False)
    while len(ids) < length + batch:
        ids = ids + ids
    return [ids[i : i + length] for i in range(batch)]  # distinct prompts, equal length


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds to generate new_tokens for every prompt, all submitted at once."""
    remaining = threading.Semaphore(0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def sink(out: RequestOutput) -> None:
        if out.finished:
            remaining.release()

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(f"bench-{start}-{i}", tuple(prompt), params), sink)
    for _ in prompts:
        remaining.acquire()
    return time.perf_counter() - start


def run_hf(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    input_ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - start


def best_of(repeats: int, fn: Any) -> float:
    fn()  # warm-up
    return min(fn() for _ in range(repeats))


def main(args: argparse.Namespace) -> int:
    config = ServerConfig(
        model=args.model,
        device="cpu",
        engine=EngineConfig(max_running=max(args.batch, 1), max_batched_tokens=max(512, args.batch)),
    )
    engine = build_engine(config)
    engine.start()
    prompts = make_prompts(engine.tokenizer, args.batch, args.prompt_tokens)
    total_tokens = args.batch * args.new_tokens
    try:
        engine_s = best_of(args.repeats, lambda: run_engine(engine, prompts, args.new_tokens))
    finally:
        engine.shutdown()
    result: dict[str, Any] = {
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "engine_tok_s": round(total_tokens / engine_s, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        from server.model.loader import resolve_model_dir

        hf = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model)[1], dtype=torch.float32)
        hf_s = best_of(args.repeats, lambda: run_hf(hf.eval(), prompts, args.new_tokens))
        result["hf_tok_s"] = round(total_tokens / hf_s, 1)
        result["speedup"] = round(hf_s / engine_s, 2)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value}")
    return 0
