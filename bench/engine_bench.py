"""`loramux bench engine`: our engine's generation throughput against transformers `generate`.

Same model (the default SmolLM2 unless --model), same prompts of the same length, greedy unless
--temperature (then both sides sample with --temperature and --top-p over the whole vocabulary:
transformers gets top_k=0, not its default 50), every request producing exactly --new-tokens
tokens (EOS ignored on both sides); each timing is the best of --repeats runs after one warm-up.
Two figures per side:
- decode throughput (`*_tok_s`): B * (N - 1) / (T(N) - T(1)), where T(n) is the wall time to
  generate n tokens for all B prompts: the prefill and first token cancel out;
- end-to-end throughput (`*_e2e_tok_s`): B * N / T(N), prefill included.
When sampling, our greedy decode is measured too in the same run (`engine_greedy_tok_s`), and
`sampled_vs_greedy` is the cost of sampling as a ratio of the two.
A micro-benchmark: it drives the engine in-process, not over the wire. The engine runs first and
is shut down before transformers runs, so the two never share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from server.config import MODEL_KERNELS, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import InvalidRequest, RequestOutput, SamplingParams
from server.preparation import RequestInput, RequestPreparer
from server.prompts import PromptInput
from server.runtime import build_engine

_TEXT = (
    "The history of the printing press begins with movable type in East Asia and continues in "
    "Europe, where Gutenberg combined a screw press, oil-based ink and cast metal type into a "
    "system that could produce books quickly and cheaply; within decades presses spread to more "
    "than two hundred cities, and the price of books fell so far that reading became common."
)

# What one request runs with: an adapter's name ("" = the base model) or a weighted mixture.
AdapterSpec = str | tuple[tuple[str, float], ...]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="concurrent sequences (default 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (best is kept)")
    parser.add_argument("--model", default=None, help="local checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="both sides run here, in the engine's dtype (cuda: bf16); default cpu",
    )
    parser.add_argument(
        "--model-kernels",
        choices=list(MODEL_KERNELS),
        default="auto",
        help="our engine's non-GEMM ops and CPU matmuls, as `serve --model-kernels` (default auto)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="as `serve --threads` (default: CPUs usable)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature on both sides (default 0 = greedy)",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling on both sides (default 1.0 = off)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def make_prompts(tokenizer: Any, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(_TEXT, add_special_tokens=False)
    while len(ids) < length + batch:
        ids = ids + ids
    return [ids[i : i + length] for i in range(batch)]  # distinct prompts, equal length


def run_engine(
    engine: Engine,
    prompts: list[list[int]],
    new_tokens: int,
    adapters: Sequence[AdapterSpec] | None = None,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
) -> float:
    """Seconds to generate new_tokens for every prompt (with its adapter or mixture, "" = base), all
    submitted at once.

    `sampling` (greedy when None; one for all, or one per prompt) has its max_tokens replaced by
    new_tokens."""
    remaining = threading.Semaphore(0)
    given_params = sampling if isinstance(sampling, Sequence) else [sampling] * len(prompts)
    per_prompt = [
        replace(p or SamplingParams(temperature=0.0), max_tokens=new_tokens, ignore_eos=True)
        for p in given_params
    ]
    errors: list[str] = []

    def sink(out: RequestOutput) -> None:
        if out.finished:
            if out.error is not None:
                errors.append(out.error)
            remaining.release()

    preparer = RequestPreparer.for_engine(engine)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        adapter = adapters[i] if adapters else ""
        name, mixture = (adapter, ()) if isinstance(adapter, str) else ("", adapter)
        given = RequestInput(
            PromptInput(token_ids=tuple(prompt)), per_prompt[i], f"bench-{start}-{i}", name, mixture
        )
        engine.submit(preparer.prepare(given), sink)
    for _ in prompts:
        remaining.acquire()
    seconds = time.perf_counter() - start
    if errors:  # a failed request finishes early: its time would flatter the figure
        raise RuntimeError(f"{len(errors)} of {len(prompts)} bench requests failed, first: {errors[0]}")
    return seconds


def run_hf(
    model: Any, prompts: list[list[int]], new_tokens: int, sampling: SamplingParams | None = None
) -> float:
    input_ids = torch.tensor(prompts, device=model.device)
    # top_k=0: transformers' default top_k=50 would make its sampling cheaper than over the vocabulary
    how: dict[str, Any] = {"do_sample": False}
    if sampling is not None and not sampling.greedy:
        how = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **how,
        )
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_of(repeats: int, fn: Any) -> float:
    fn()  # warm-up
    return min(fn() for _ in range(repeats))


def measure(args: argparse.Namespace, generate: Any) -> dict[str, float]:
    """Decode and end-to-end tokens/s from timings of N and of 1 new tokens."""
    batch, n = args.batch, args.new_tokens
    t_n = best_of(args.repeats, lambda: generate(n))
    t_1 = best_of(args.repeats, lambda: generate(1))
    return {"decode": round(batch * (n - 1) / (t_n - t_1), 1), "e2e": round(batch * n / t_n, 1)}


def main(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        raise SystemExit(
            "bench engine: need --batch >= 1, --new-tokens >= 2, --prompt-tokens >= 1, --repeats >= 1"
        )
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    try:
        sampling.validate(vocab_size=1)
    except InvalidRequest as exc:
        raise SystemExit(f"bench engine: {exc}") from None
    config = ServerConfig(
        model=args.model,
        device=args.device,
        model_kernels=args.model_kernels,
        threads=args.threads,
        engine=EngineConfig(max_running=max(args.batch, 1), max_batched_tokens=max(512, args.batch)),
    )
    engine = build_engine(config)
    engine.start()
    prompts = make_prompts(engine.tokenizer, args.batch, args.prompt_tokens)
    try:
        ours = measure(args, lambda n: run_engine(engine, prompts, n, sampling=sampling))
        if not sampling.greedy:
            greedy = measure(args, lambda n: run_engine(engine, prompts, n))
    finally:
        engine.shutdown()
    result: dict[str, Any] = {
        "batch": args.batch,
        "device": f"{args.device} {torch.cuda.get_device_name()}" if args.device == "cuda" else "cpu",
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "model_kernels": engine.model.ops.name,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "engine_tok_s": ours["decode"],
        "engine_e2e_tok_s": ours["e2e"],
    }
    if not sampling.greedy:
        result |= {"temperature": sampling.temperature, "top_p": sampling.top_p}
        result["engine_greedy_tok_s"] = greedy["decode"]
        result["sampled_vs_greedy"] = round(ours["decode"] / greedy["decode"], 2)
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        from server.model.loader import resolve_model_dir

        directory = resolve_model_dir(args.model)[1]
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=engine.model.dtype).to(args.device)
        theirs = measure(args, lambda n: run_hf(hf.eval(), prompts, n, sampling))
        result["hf_tok_s"] = theirs["decode"]
        result["hf_e2e_tok_s"] = theirs["e2e"]
        result["speedup"] = round(ours["decode"] / theirs["decode"], 2)
        result["e2e_speedup"] = round(ours["e2e"] / theirs["e2e"], 2)
    result["torch_threads"] = torch.get_num_threads()
    result["openmp_env"] = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))}
    result["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value}")
    return 0
