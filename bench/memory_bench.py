"""`loramux bench memory`: resident memory while 1,000 distinct adapters are requested one after another.

The S-LoRA question for a host tier: does memory stay bounded when every request names a new
adapter? Adapters are random PEFT LoRA directories (W1: r=8 on q,k,v,o of SmolLM2; 1,000 names,
hard links to --distinct-files weight files, so each name is a distinct adapter to the server)
requested in order, --concurrency at a time, through a host cache of --host-cache-mb. Every
--every requests the benchmark records the process' VmRSS; the report is that curve, the peak
(VmHWM) and the budget it must stay within: model + host cache + device slots + KV cache, plus
the process' own baseline (Python, torch, tokenizer) measured before the first request. Beyond the
host cache, adapters in flight take memory too: each running or loading request holds its
adapter's host form until its slot is filled (at most concurrency + loader threads of them).
In-process: it drives the engine directly, not over the wire.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.adapters_bench import _memory_budget, _status_mb, make_adapters
from bench.engine_bench import make_prompts
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.request import RequestOutput, SamplingParams
from server.preparation import RequestInput, RequestPreparer
from server.prompts import PromptInput
from server.runtime import build_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", type=int, default=1000, help="distinct adapter names (default 1000)")
    parser.add_argument("--distinct-files", type=int, default=16, help="distinct weight files behind them")
    parser.add_argument("--host-cache-mb", type=int, default=64, help="the host tier (default 64)")
    parser.add_argument("--max-slots", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--every", type=int, default=50, help="requests between RSS samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="loramux-bench-memory-") as tmp:
        root = Path(tmp)
        config = ServerConfig(
            device="cpu",
            engine=EngineConfig(max_running=args.concurrency, max_queue=4 * args.concurrency),
            adapters=AdapterConfig(
                roots=(str(root),), max_slots=args.max_slots, max_rank=8, host_cache_mb=args.host_cache_mb
            ),
        )
        engine = build_engine(config)
        engine.start()
        try:
            report = _run(args, engine, root)
        finally:
            engine.shutdown()
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>16}: {value}")
    return 0


def _run(args: argparse.Namespace, engine: Any, root: Path) -> dict[str, Any]:
    names = make_adapters(root, engine.model.arch, "W1", args.adapters, args.distinct_files)
    prompt = make_prompts(engine.tokenizer, 1, 16)[0]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    preparer = RequestPreparer.for_engine(engine)
    in_flight = threading.Semaphore(args.concurrency)
    errors: list[str] = []

    def sink(output: RequestOutput) -> None:
        if output.finished:
            if output.error:
                errors.append(output.error)
            in_flight.release()

    base_request = RequestInput(PromptInput(token_ids=tuple(prompt)), params, "warm-up")
    in_flight.acquire()
    engine.submit(preparer.prepare(base_request), sink)  # warm the engine, not the adapters
    baseline_mb = 0.0
    curve: list[tuple[int, float]] = []
    for i, name in enumerate(names):
        in_flight.acquire()
        if i == 0:
            baseline_mb = _status_mb("VmRSS")
            curve.append((0, baseline_mb))
        given = RequestInput(PromptInput(token_ids=tuple(prompt)), params, f"m{i}", adapter=name)
        engine.submit(preparer.prepare(given), sink)
        if (i + 1) % args.every == 0:
            curve.append((i + 1, _status_mb("VmRSS")))
    for _ in range(args.concurrency):
        in_flight.acquire()
    curve.append((len(names), _status_mb("VmRSS")))
    budget = _memory_budget(engine)
    budget["host_cache"] = float(args.host_cache_mb)
    budget["process_before_adapters"] = baseline_mb
    host, slots = engine.adapters.stats()
    adapter_mb = host.bytes / max(host.entries, 1) / (1 << 20)
    in_flight_mb = (args.concurrency + 2) * adapter_mb  # 2 loader threads
    return {
        "adapters": len(names),
        "host_cache_mb": args.host_cache_mb,
        "errors": len(errors),
        "host_loads": host.loads,
        "host_evictions": host.evictions,
        "slot_loads": slots.loads,
        "rss_curve_mb": curve,
        "peak_rss_mb": _status_mb("VmHWM"),
        "budget_mb": budget,
        "adapter_mb": round(adapter_mb, 2),
        # the model, slots and KV cache are resident in the baseline: the adapters may add the host
        # cache and the adapters in flight
        "bound_mb": round(baseline_mb + args.host_cache_mb + in_flight_mb, 1),
    }
