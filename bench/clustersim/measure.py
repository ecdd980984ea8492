"""`--measure`: time our real engine in-process on the default model and write the `Costs`.

1) Write `batch_sizes[-1] + loads` rank-8 q,k,v,o adapters with `bench make-adapters`'s writer
   into a temp dir (the adapter root).
2) Decode step at each batch size b, every sequence on one adapter and on b distinct adapters:
   (T(N) - T(1)) / (N - 1), T(n) the wall time for b prompts to get n tokens (prefill, adapter
   loads and the first token cancel out; `bench engine`'s method), best of `repeats`.
3) Prefill per prompt token: (T(1) at long prompts - T(1) at short ones) / the extra tokens.
4) Adapter loads, after the engine has stepped (every slot then holds an adapter): disk -> host
   is `AdapterManager.prefetch` of an adapter never read (read, validated, device-ready form;
   the files were just written, so they come from the page cache, not the disk), a host hit is
   the same call again, host -> device is `DeviceSlots.acquire` of it (a slot evicted and
   filled). Medians over `loads` adapters.
Everything runs on this machine's CPU with the engine's default threads; `about` records where.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.clustersim.costs import Costs

TARGETS = "q_proj,k_proj,v_proj,o_proj"


@dataclass(frozen=True)
class MeasureConfig:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    new_tokens: int = 12  # N of the decode timing
    short_prompt: int = 16
    long_prompt: int = 240
    repeats: int = 2
    loads: int = 5
    rank: int = 8


def measure_costs(config: MeasureConfig, progress: Callable[[str], None] = print) -> Costs:
    from bench.engine_bench import best_of, make_prompts, run_engine
    from bench.make_adapters_bench import add_arguments, plan_from_args, prepare_out, write_adapters
    from server.config import AdapterConfig, EngineConfig, ServerConfig
    from server.runtime import build_engine

    largest = config.batch_sizes[-1]
    with tempfile.TemporaryDirectory(prefix="loramux-cluster-costs-") as tmp:
        # 1) the adapters
        root = Path(tmp)
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        count = largest + config.loads
        plan = plan_from_args(
            parser.parse_args(
                ["--count", str(count), "--out", tmp, "--rank", str(config.rank), "--targets", TARGETS]
            )
        )
        prepare_out(root, plan, count, force=True)
        write_adapters(plan, root, count)
        names = [plan.name(i) for i in range(count)]
        engine = build_engine(
            ServerConfig(
                device="cpu",
                engine=EngineConfig(max_running=largest, max_batched_tokens=max(512, largest)),
                adapters=AdapterConfig(roots=(tmp,), max_slots=largest, max_rank=config.rank),
            )
        )
        engine.start()
        try:
            prompts = make_prompts(engine.tokenizer, largest, config.long_prompt)

            def seconds(batch: int, prompt: int, tokens: int, adapters: list[str]) -> float:
                rows = [p[:prompt] for p in prompts[:batch]]
                return best_of(config.repeats, lambda: run_engine(engine, rows, tokens, adapters))

            # 2) decode steps
            same: list[float] = []
            distinct: list[float] = []
            for batch in config.batch_sizes:
                for adapters, out in (([names[0]] * batch, same), (names[:batch], distinct)):
                    t_n = seconds(batch, config.short_prompt, config.new_tokens, adapters)
                    t_1 = seconds(batch, config.short_prompt, 1, adapters)
                    out.append((t_n - t_1) / (config.new_tokens - 1))
                progress(
                    f"batch {batch}: decode step {same[-1] * 1e3:.1f} ms one adapter, "
                    f"{distinct[-1] * 1e3:.1f} ms {batch} adapters"
                )
            # 3) prefill
            batch = 2
            extra = batch * (config.long_prompt - config.short_prompt)
            long_s = seconds(batch, config.long_prompt, 1, names[:batch])
            short_s = seconds(batch, config.short_prompt, 1, names[:batch])
            prefill = max(long_s - short_s, 0.0) / extra
            progress(f"prefill: {prefill * 1e6:.0f} us per prompt token")
            # 4) adapter loads
            manager = engine.adapters
            assert manager is not None
            disk, hit, device, nbytes = [], [], [], 0
            for name in names[largest:]:
                start = time.perf_counter()
                manager.prefetch(name).result()
                disk.append(time.perf_counter() - start)
                time.sleep(0.05)  # the finished load forgets itself on the loader thread
                start = time.perf_counter()
                ready = manager.prefetch(name).result()
                hit.append(time.perf_counter() - start)
                start = time.perf_counter()
                slot = manager.slots.acquire(ready)
                device.append(time.perf_counter() - start)
                assert slot is not None, "every slot is pinned: the engine should be idle here"
                manager.slots.release(slot)
                nbytes = ready.adapter.nbytes
            progress(
                f"loads: disk -> host {statistics.median(disk) * 1e3:.1f} ms, host hit "
                f"{statistics.median(hit) * 1e3:.2f} ms, host -> device {statistics.median(device) * 1e3:.2f} ms"
            )
        finally:
            engine.shutdown()
    return Costs(
        batch_sizes=config.batch_sizes,
        same_adapter_s=tuple(round(s, 6) for s in same),
        distinct_adapters_s=tuple(round(s, 6) for s in distinct),
        prefill_per_token_s=round(prefill, 8),
        disk_to_host_s=round(statistics.median(disk), 6),
        host_hit_s=round(statistics.median(hit), 6),
        host_to_device_s=round(statistics.median(device), 6),
        adapter_host_bytes=nbytes,
        about=_about(config, plan.nbytes),
    )


def _about(config: MeasureConfig, disk_bytes: int) -> dict[str, Any]:
    import torch

    from bench.make_adapters_bench import base_model_config

    return {
        "command": "loramux bench cluster-sim --measure",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": base_model_config(None)[0],
        "machine": f"{platform.machine()} {_cpu_name()}".strip(),
        "torch_threads": torch.get_num_threads(),
        "adapter": f"LoRA rank {config.rank} on {TARGETS}, {disk_bytes} bytes of fp16 factors on disk",
        "method": "decode: (T(N) - T(1)) / (N - 1), best of repeats; loads: medians; "
        "disk -> host from the page cache (files just written)",
        "config": {
            "new_tokens": config.new_tokens,
            "short_prompt": config.short_prompt,
            "long_prompt": config.long_prompt,
            "repeats": config.repeats,
            "loads": config.loads,
        },
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
