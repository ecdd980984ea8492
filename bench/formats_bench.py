"""`loramux bench formats`: LoRA, MoS and ComPEFT adapters side by side on the default model.

For each format, from the demo adapters shipped in `adapters/` (`<task>`, `<task>-mos`,
`<task>-compeft-<percent>`), copied under `--batch` distinct names (each copy is a distinct adapter
to the server: its own host entry and device slot):
- `disk_bytes`: the adapter's weight + config files; `host_bytes`: its host-tier form (what
  `--host-cache-mb` counts: MoS pools once, ComPEFT codes as stored); `per_gib`: adapters of that
  form in 1 GiB of host cache;
- cold load, median over the copies: `disk_to_host_ms` (read + validate), `to_device_form_ms`
  (the loader thread's decode / materialization into the slot layout) and `to_slot_ms` (the
  engine thread's copy into a device slot);
- `tok_s`: decode throughput of one batch of `--batch` requests, each with its own adapter of
  that format (B * (N - 1) / (T(N) - T(1)) as in `bench engine`), and `vs_lora` against the plain
  LoRA batch measured in the same run. Each format gets a fresh engine (in one engine, formats
  measured later decoded up to 2x slower whatever their format). On CPU every format decodes
  through the same plain-LoRA slots, so `tok_s` differs between formats only by noise there.
An in-process micro/macro benchmark (it drives the engine directly, not over the wire).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.adapters_bench import decode_tok_s, emit
from bench.engine_bench import best_of, make_prompts, run_engine
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.runtime import build_engine

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
TASKS = ("sql", "sentiment", "extract", "arith", "shout")
FORMATS = {  # name -> the suffix of its demo adapters' directories
    "lora": "",
    "mos": "-mos",
    "compeft-05": "-compeft-05",
    "compeft-10": "-compeft-10",
    "compeft-20": "-compeft-20",
}
GiB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="requests, each its own adapter (default 32)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (best kept)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="as `serve --threads`")
    parser.add_argument(
        "--model", default=None, help="local checkpoint of SmolLM2's shapes (default: SmolLM2)"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: MoS and ComPEFT run from their compact slots (Triton kernels), in bf16",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def copy_adapters(root: Path, suffix: str, count: int, prefix: str) -> list[str]:
    """`count` copies of the five demo adapters of one format under distinct names; their names."""
    names = []
    for i in range(count):
        source = ADAPTERS / f"{TASKS[i % len(TASKS)]}{suffix}"
        if not source.is_dir():
            raise SystemExit(f"{source} is missing: run `make demo-adapters` first")
        name = f"{prefix}-{i:03d}"
        shutil.copytree(source, root / name)
        names.append(name)
    return names


def disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".safetensors", ".json")
               and f.name != "training.json")  # fmt: skip


def cold_loads(engine: Engine, names: list[str]) -> dict[str, float]:
    """Median disk -> host, host -> device form, device form -> slot over `names` (none loaded before)."""
    manager = engine.adapters
    assert manager is not None
    host, form, slot_s = [], [], []
    for name in names:
        start = time.perf_counter()
        adapter = manager.store.get(name)
        host.append(time.perf_counter() - start)
        start = time.perf_counter()
        ready = manager.slots.prepare(adapter)
        form.append(time.perf_counter() - start)
        start = time.perf_counter()
        slot = manager.slots.acquire(ready)
        slot_s.append(time.perf_counter() - start)
        assert slot is not None
        manager.slots.release(slot)
    return {
        "disk_to_host_ms": round(statistics.median(host) * 1e3, 2),
        "to_device_form_ms": round(statistics.median(form) * 1e3, 2),
        "to_slot_ms": round(statistics.median(slot_s) * 1e3, 2),
        "host_bytes": manager.store.get(names[0]).nbytes,
    }


def _engine(args: argparse.Namespace, root: Path) -> Engine:
    config = ServerConfig(
        model=args.model,
        device=args.device,
        threads=args.threads,
        engine=EngineConfig(max_running=args.batch, max_queue=4096, max_batched_tokens=max(512, args.batch)),
        adapters=AdapterConfig(roots=(str(root),), max_slots=args.batch, max_rank=8, host_cache_mb=1024),
    )
    engine = build_engine(config)
    engine.start()
    return engine


def main(args: argparse.Namespace) -> int:
    formats = [f for f in args.formats.split(",") if f]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise SystemExit(f"unknown format {sorted(unknown)[0]!r}: choose among {', '.join(FORMATS)}")
    if "lora" not in formats:
        formats.insert(0, "lora")  # the baseline of vs_lora
    with tempfile.TemporaryDirectory(prefix="loramux-bench-formats-") as tmp:
        root = Path(tmp)
        names = {f: copy_adapters(root, FORMATS[f], args.batch, f) for f in formats}
        rows: list[dict[str, Any]] = []
        for adapter_format in formats:  # a fresh engine each: no format inherits another's state
            engine = _engine(args, root)
            try:
                prompts = make_prompts(engine.tokenizer, args.batch, args.prompt_tokens)
                # On a thread of its own, as the server loads: torch work on the main thread would
                # leave an OpenMP pool there that slows every engine step (server/runtime.py).
                with ThreadPoolExecutor(max_workers=1) as loader:
                    loads = loader.submit(
                        cold_loads, engine, names[adapter_format][: min(10, args.batch)]
                    ).result()
                adapters = names[adapter_format]
                t_n = best_of(args.repeats, lambda: run_engine(engine, prompts, args.new_tokens, adapters))  # noqa: B023
                t_1 = best_of(args.repeats, lambda: run_engine(engine, prompts, 1, adapters))  # noqa: B023
            finally:
                engine.shutdown()
            rows.append(
                {
                    "format": adapter_format,
                    "disk_bytes": disk_bytes(root / adapters[0]),
                    **loads,
                    "per_gib": GiB // loads["host_bytes"],
                    "batch": args.batch,
                    "distinct_adapters": len(set(adapters)),
                    "tok_s": decode_tok_s(args.batch, args.new_tokens, t_n, t_1),
                }
            )
    lora_tok_s = next(row["tok_s"] for row in rows if row["format"] == "lora")
    for row in rows:
        row["vs_lora"] = round(row["tok_s"] / lora_tok_s, 2)
        row["machine"] = platform.processor() or platform.machine()
        row["device"] = args.device
        emit(args, row)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
