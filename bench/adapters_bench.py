"""`loramux bench adapters`: multi-adapter decode throughput against our base-only engine and PEFT.

On SmolLM2 at batch B (default 32), every request its adapter drawn by popularity
(`distinct`: one adapter per request; `uniform`: sqrt(B) adapters; `zipf:A`; `identical`):
- `tok_s`: our engine with the adapters; `base_tok_s`: our engine, same prompts, no adapter;
- `peft_tok_s`: PEFT's mixed-adapter batch (`generate(..., adapter_names=[...])`) on transformers.
Decode throughput is B * (N - 1) / (T(N) - T(1)) as in `bench engine` (prefill, adapter loads
and the first token cancel out). Workloads W1 = r=8 on q,k,v,o; W2 = r=16 on all seven.

`--scale` adds the S-LoRA-style check: a stream of requests under zipf:1.5 over 1,000 adapters on
disk vs 8 (cold loads included, end-to-end tokens/s), each in a fresh subprocess so its peak RSS
is its own, against the budget base model + host cache + slots + KV cache; and the cold-load
latency of one W2 adapter (disk -> host -> device slot). Adapters are random PEFT-format
safetensors written to a temp dir (hard links make 1,000 cheap). In-process micro/macro
benchmark: it drives the engine directly, not over the wire.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench.engine_bench import AdapterSpec, best_of, make_prompts, run_engine
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.runtime import build_engine

WORKLOADS = {
    "W1": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "W2": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}
POPULARITIES = ("distinct", "uniform", "zipf:1.5", "identical")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of our engine (best kept)")
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--popularities", default=",".join(POPULARITIES))
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline (slow)")
    parser.add_argument("--scale", action="store_true", help="also run the 1,000-vs-8 adapters check")
    parser.add_argument(
        "--threads", type=int, default=None, help="as `serve --threads` (default: CPUs usable)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--scale-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", default="", help=argparse.SUPPRESS)


# ---- adapters on disk ---------------------------------------------------------------------------


def write_adapter(directory: Path, arch: Any, rank: int, targets: tuple[str, ...], seed: int) -> None:
    """A random PEFT LoRA adapter for `arch` (fp16 on disk, as PEFT saves after half training)."""
    sizes = {
        "q_proj": (arch.hidden_size, arch.q_size),
        "k_proj": (arch.hidden_size, arch.kv_size),
        "v_proj": (arch.hidden_size, arch.kv_size),
        "o_proj": (arch.q_size, arch.hidden_size),
        "gate_proj": (arch.hidden_size, arch.intermediate_size),
        "up_proj": (arch.hidden_size, arch.intermediate_size),
        "down_proj": (arch.intermediate_size, arch.hidden_size),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(arch.num_layers):
        for proj in targets:
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            d_in, d_out = sizes[proj]
            a = torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in)
            b = torch.randn(d_out, rank, generator=generator) * 0.02
            tensors[f"{prefix}.lora_A.weight"] = a.half()
            tensors[f"{prefix}.lora_B.weight"] = b.half()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "lora_dropout": 0.0,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))


def make_adapters(
    root: Path, arch: Any, workload: str, count: int, distinct_files: int, prefix: str = ""
) -> list[str]:
    """`count` adapters named {prefix}{workload}-{i}; only `distinct_files` distinct weight files (hard links)."""
    rank, targets = WORKLOADS[workload]
    names = []
    for i in range(count):
        name = f"{prefix}{workload}-{i:04d}"
        directory = root / name
        if i < distinct_files:
            write_adapter(directory, arch, rank, targets, seed=i)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            source = root / f"{prefix}{workload}-{i % distinct_files:04d}"
            os.link(source / "adapter_model.safetensors", directory / "adapter_model.safetensors")
            (directory / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
        names.append(name)
    return names


def assign(popularity: str, batch: int, names: list[str], rng: random.Random) -> list[str]:
    if popularity == "distinct":
        return names[:batch]
    if popularity == "uniform":
        pool = names[: max(1, round(math.sqrt(batch)))]
        return [pool[i % len(pool)] for i in range(batch)]
    if popularity.startswith("zipf:"):
        alpha = float(popularity.split(":", 1)[1])
        weights = [1.0 / (i + 1) ** alpha for i in range(len(names))]
        return rng.choices(names, weights=weights, k=batch)
    if popularity == "identical":
        return [names[0]] * batch
    raise SystemExit(f"unknown popularity {popularity!r}: use {', '.join(POPULARITIES)}")


# ---- runs ---------------------------------------------------------------------------------------


def decode_tok_s(batch: int, new_tokens: int, t_n: float, t_1: float) -> float:
    return round(batch * (new_tokens - 1) / (t_n - t_1), 1)


def measure_engine(
    args: argparse.Namespace, engine: Engine, prompts: list[list[int]], adapters: Sequence[AdapterSpec]
) -> float:
    t_n = best_of(args.repeats, lambda: run_engine(engine, prompts, args.new_tokens, adapters))
    t_1 = best_of(args.repeats, lambda: run_engine(engine, prompts, 1, adapters))
    return decode_tok_s(len(prompts), args.new_tokens, t_n, t_1)


def measure_peft(
    model_dir: Path, root: Path, prompts: list[list[int]], adapters: list[str], new_tokens: int
) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    unique = list(dict.fromkeys(adapters))
    model = PeftModel.from_pretrained(base, root / unique[0], adapter_name=unique[0])
    for name in unique[1:]:
        model.load_adapter(root / name, adapter_name=name)
    model.eval()
    input_ids = torch.tensor(prompts)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                adapter_names=adapters,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    generate(2)  # warm-up
    return decode_tok_s(len(prompts), new_tokens, generate(new_tokens), generate(1))


def engine_for(
    args: argparse.Namespace, roots: tuple[str, ...], max_slots: int, max_rank: int = 16
) -> Engine:
    config = ServerConfig(
        device="cpu",
        threads=args.threads,
        engine=EngineConfig(max_running=args.batch, max_queue=4096, max_batched_tokens=max(512, args.batch)),
        adapters=AdapterConfig(roots=roots, max_slots=max_slots, max_rank=max_rank, host_cache_mb=1024),
    )
    engine = build_engine(config)
    engine.start()
    return engine


def emit(args: argparse.Namespace, row: dict[str, Any]) -> None:
    print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def throughput_cases(args: argparse.Namespace, root: Path) -> None:
    """Each workload on an engine whose --max-rank is the workload's rank, as an operator would size it
    (slots are as wide as --max-rank, and at decode the LoRA term is bound by reading them)."""
    rng = random.Random(0)
    workloads = [w for w in args.workloads.split(",") if w]
    cases = []
    base = 0.0
    for workload in workloads:
        rank, _ = WORKLOADS[workload]
        engine = engine_for(args, (str(root),), max_slots=args.batch, max_rank=rank)
        try:
            prompts = make_prompts(engine.tokenizer, args.batch, args.prompt_tokens)
            names = make_adapters(root, engine.model.arch, workload, args.batch, args.batch)
            if not base:
                base = measure_engine(args, engine, prompts, [""] * args.batch)
            for popularity in [p for p in args.popularities.split(",") if p]:
                adapters = assign(popularity, args.batch, names, rng)
                cases.append(
                    (workload, popularity, adapters, measure_engine(args, engine, prompts, adapters))
                )
        finally:
            engine.shutdown()
    model_dir = Path(engine_model_dir())
    for workload, popularity, adapters, tok_s in cases:
        row: dict[str, Any] = {
            "workload": workload,
            "popularity": popularity,
            "batch": args.batch,
            "distinct_adapters": len(set(adapters)),
            "tok_s": tok_s,
            "base_tok_s": base,
            "vs_base": round(tok_s / base, 2),
        }
        if not args.no_peft:
            row["peft_tok_s"] = measure_peft(model_dir, root, prompts, adapters, args.new_tokens)
            row["vs_peft"] = round(tok_s / row["peft_tok_s"], 2)
        emit(args, row)


def engine_model_dir() -> str:
    from server.model.loader import resolve_model_dir

    return str(resolve_model_dir(None)[1])


# ---- scale: 1,000 adapters on disk vs 8 -----------------------------------------------------------


def scale_child(args: argparse.Namespace) -> int:
    """One stream of requests over `--scale-child` adapters; prints JSON with tok/s and peak RSS."""
    root = Path(args.adapter_dir)
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("W1-"))[: args.scale_child]
    engine = engine_for(args, (str(root),), max_slots=args.batch, max_rank=8)
    prompts = make_prompts(engine.tokenizer, 4 * args.batch, args.prompt_tokens)
    rng = random.Random(1)
    try:
        run_engine(engine, prompts[: args.batch], 2)  # warm the engine, not the adapters
        adapters = assign("zipf:1.5", len(prompts), names, rng)
        seconds = run_engine(engine, prompts, args.new_tokens, adapters)
        host, slots = engine.adapters.stats() if engine.adapters else (None, None)
        budget = _memory_budget(engine)
    finally:
        engine.shutdown()
    print(
        json.dumps(
            {
                "adapters_on_disk": len(names),
                "requests": len(prompts),
                "distinct_adapters_used": len(set(adapters)),
                "e2e_tok_s": round(len(prompts) * args.new_tokens / seconds, 1),
                "host_loads": host.loads if host else 0,
                "slot_loads": slots.loads if slots else 0,
                # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's RSS across fork + exec
                "peak_rss_mb": _status_mb("VmHWM"),
                "rss_end_mb": _status_mb("VmRSS"),
                "budget_mb": budget,
            }
        )
    )
    return 0


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _memory_budget(engine: Engine) -> dict[str, float]:
    mb = 1 / (1 << 20)
    model_bytes = sum(t.numel() * t.element_size() for t in engine.model.state_dict().values())
    slot_bytes = 0
    if engine.adapters is not None:
        for _, _, stack in engine.adapters.slots.stacks():
            slot_bytes += sum(t.numel() * t.element_size() for t in (stack.lora_a, *stack.lora_b))
    return {
        "model": round(model_bytes * mb, 1),
        "host_cache": 1024.0,
        "slots": round(slot_bytes * mb, 1),
        "kv_cache": round(engine.kv.nbytes() * mb, 1),
    }


def scale_cases(args: argparse.Namespace, root: Path) -> None:
    engine = engine_for(args, (str(root),), max_slots=4)
    arch = engine.model.arch
    # cold load of one W2 adapter: disk -> host, then host -> device slot
    make_adapters(root, arch, "W2", 1, 1, prefix="cold-")
    manager = engine.adapters
    assert manager is not None
    start = time.perf_counter()
    ready = manager.prefetch("cold-W2-0000").result()  # read, validated, device-ready
    host_s = time.perf_counter() - start
    start = time.perf_counter()
    slot = manager.slots.acquire(ready)
    slot_s = time.perf_counter() - start
    assert slot is not None
    manager.slots.release(slot)
    engine.shutdown()
    emit(
        args,
        {
            "case": "cold_load_W2",
            "disk_to_host_ms": round(host_s * 1e3, 1),
            "host_to_slot_ms": round(slot_s * 1e3, 1),
        },
    )
    scale_root = root / "scale"
    make_adapters(scale_root, arch, "W1", 1000, 8)
    for count in (8, 1000):
        command = [sys.executable, "-m", "bench.adapters_bench", "--scale-child", str(count)]
        command += ["--adapter-dir", str(scale_root)]
        command += ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
        command += ["--threads", str(args.threads)] if args.threads else []
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        emit(args, {"case": "scale", **json.loads(result.stdout.strip().splitlines()[-1])})


def main(args: argparse.Namespace) -> int:
    if args.scale_child:
        return scale_child(args)
    with tempfile.TemporaryDirectory(prefix="loramux-bench-adapters-") as tmp:
        root = Path(tmp)
        throughput_cases(args, root)
        if args.scale:
            scale_cases(args, root)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
