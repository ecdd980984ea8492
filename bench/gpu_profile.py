"""Where a GPU decode step's time goes: the engine's wall time per step against the time its kernels
keep the GPU busy (torch.profiler), for the base model and for a batch of distinct adapters of one
format. A step whose kernels fill a small part of its wall time is bound by the host (Python and
launches), which a CUDA graph of the step would remove; one that fills most of it is bound by the
kernels. CUDA only; run by bench/gpu_check.sh.

    python -m bench.gpu_profile --model DIR [--batch 32] [--new-tokens 16] [--formats lora,mos,compeft-10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench.engine_bench import make_prompts, run_engine
from bench.formats_bench import FORMATS, copy_adapters
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.runtime import build_engine


def profile(engine, prompts, new_tokens: int, adapters: list[str] | None, top: int) -> dict:  # type: ignore[no-untyped-def]
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run_engine(engine, prompts, new_tokens, adapters)  # warm: kernels compiled, slots filled
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds = run_engine(engine, prompts, new_tokens, adapters)
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]  # the kernels and copies themselves
    device_us = sum(e.device_time_total for e in on_gpu)
    kernels = sum(e.count for e in on_gpu)
    table = events.table(sort_by="self_device_time_total", row_limit=top)
    steps = new_tokens  # one prefill step and new_tokens - 1 decode steps
    return {
        "wall_ms_per_step": round(seconds * 1e3 / steps, 2),
        "gpu_busy_ms_per_step": round(device_us / 1e3 / steps, 2),
        "gpu_busy_fraction": round(device_us / 1e6 / seconds, 3),
        "kernels_per_step": round(kernels / steps),
        "table": table,
    }


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("bench/gpu_profile.py needs a CUDA GPU")
        return 0
    formats = [f for f in args.formats.split(",") if f]
    results = []
    with tempfile.TemporaryDirectory(prefix="loramux-gpu-profile-") as tmp:
        root = Path(tmp)
        names = {f: copy_adapters(root, FORMATS[f], args.batch, f) for f in formats}
        for what in ["base", *formats]:
            config = ServerConfig(
                model=args.model,
                device="cuda",
                engine=EngineConfig(max_running=args.batch, max_batched_tokens=max(512, args.batch)),
                adapters=AdapterConfig(roots=(str(root),), max_slots=args.batch, max_rank=16),
            )
            engine = build_engine(config)
            engine.start()
            try:
                prompts = make_prompts(engine.tokenizer, args.batch, args.prompt_tokens)
                row = profile(engine, prompts, args.new_tokens, names.get(what), args.top)
            finally:
                engine.shutdown()
            table = row.pop("table")
            results.append({"adapters": what, "batch": args.batch, **row})
            print(json.dumps(results[-1]))
            if args.tables:
                print(table)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint of SmolLM2's shapes (default SmolLM2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--formats", default="lora,mos,compeft-10")
    parser.add_argument("--top", type=int, default=12, help="rows of each profile table")
    parser.add_argument("--tables", action="store_true", help="print each profile's table")
    sys.exit(main(parser.parse_args()))
