"""`--measure`: time our real engine in-process on the default model and write the `Costs`.

1) Write `batch_sizes[-1] + loads` rank-8 q,k,v,o adapters with `bench make-adapters`'s writer
   into a temp dir (the adapter root) and start an engine on it (`max_slots` = the largest batch).
2) Every engine step is timed as it runs (`Engine.step` wrapped, the step's plan noted from
   `Scheduler.schedule`), so each figure is the 25th percentile of many steps of one kind, runs
   of every kind interleaved over `repeats` rounds after a warm-up round (which also copies the
   adapters into their slots): on a shared machine a burst of other work slows some steps and
   never speeds one, and no kind gets all of a burst.
   - decode step at batch b: the steps with b decode tokens and no prompt, every sequence on one
     adapter, and on b distinct adapters (runs of `new_tokens` tokens);
   - prefill per prompt token: the steps that prefill (two) `long_prompt`-token prompts and decode
     nothing, less a decode step at batch 1 (the step's fixed part), over their prompt tokens.
3) Adapter loads, after the engine has stepped (every slot then holds an adapter): disk -> host
   is `AdapterManager.prefetch` of an adapter never read (read, validated, device-ready form;
   the files were just written, so they come from the page cache, not the disk), a host hit is
   the same call again, host -> device is `DeviceSlots.acquire` of it (a slot evicted and
   filled). Medians over `loads` adapters.
Everything runs on this machine's CPU with as many threads as it has usable CPUs, fixed (a fleet's
replica has its CPUs to itself: the thread governor, which backs off beside a busy neighbour, is
off); `about` records where, and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.clustersim.costs import Costs

TARGETS = "q_proj,k_proj,v_proj,o_proj"
QUANTILE = 25  # of a kind of step's times


@dataclass(frozen=True)
class MeasureConfig:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    new_tokens: int = 16  # tokens per request in a decode run
    short_prompt: int = 16
    long_prompt: int = 240
    repeats: int = 5
    loads: int = 7
    rank: int = 8


@dataclass(frozen=True)
class StepSample:
    seconds: float
    decodes: int  # decode tokens in the step
    prompt_tokens: int  # prompt tokens prefilled in it


class StepTimer:
    """Times every step of `engine` on its own thread, with what the step ran."""

    def __init__(self, engine: Any) -> None:
        self.samples: list[StepSample] = []
        schedule, step = engine.scheduler.schedule, engine.step
        planned: list[Any] = [None]

        def noted_schedule() -> Any:
            planned[0] = schedule()
            return planned[0]

        def timed_step() -> None:
            start = time.perf_counter()
            step()
            plan = planned[0]
            prompt = sum(chunk for _, chunk in plan.prefills)
            self.samples.append(StepSample(time.perf_counter() - start, len(plan.decodes), prompt))

        engine.scheduler.schedule = noted_schedule
        engine.step = timed_step


def low_quantile(values: list[float], what: str) -> float:
    """The 25th percentile: a burst of the machine's other work slows some steps, never speeds one."""
    if not values:
        raise RuntimeError(f"no engine step ran {what}")
    return float(np.percentile(values, QUANTILE))


def decode_step_s(samples: list[StepSample], batch: int) -> float:
    chosen = [s.seconds for s in samples if s.decodes == batch and not s.prompt_tokens]
    return low_quantile(chosen, f"{batch} decodes and no prompt")


def prefill_per_token_s(samples: list[StepSample], overhead: float) -> float:
    """(step - `overhead`) / its prompt tokens, over the steps that prefill and decode nothing."""
    chosen = [
        max(s.seconds - overhead, 0.0) / s.prompt_tokens for s in samples if s.prompt_tokens and not s.decodes
    ]
    return low_quantile(chosen, "a prompt without decoding")


def measure_costs(config: MeasureConfig, progress: Callable[[str], None] = print) -> Costs:
    from bench.engine_bench import make_prompts, run_engine
    from bench.make_adapters_bench import add_arguments, plan_from_args, prepare_out, write_adapters
    from server.config import AdapterConfig, EngineConfig, ServerConfig
    from server.cpus import default_threads
    from server.runtime import build_engine

    largest = config.batch_sizes[-1]
    with tempfile.TemporaryDirectory(prefix="loramux-cluster-costs-") as tmp:
        # 1) the adapters and the engine
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
                threads=default_threads(os.environ),  # fixed: no governor (see the module docstring)
                engine=EngineConfig(max_running=largest, max_batched_tokens=max(512, largest)),
                adapters=AdapterConfig(roots=(tmp,), max_slots=largest, max_rank=config.rank),
            )
        )
        timer = StepTimer(engine)
        engine.start()
        try:
            prompts = make_prompts(engine.tokenizer, largest, config.long_prompt)

            # 2) every kind of run once as a warm-up (it also fills the slots), then `repeats` rounds
            # of all of them, so that a burst of other work on the machine spreads over every kind
            kinds: dict[str, tuple[int, int, int, list[str]]] = {}  # batch, prompt, tokens, adapters
            for batch in config.batch_sizes:
                kinds[f"same-{batch}"] = (batch, config.short_prompt, config.new_tokens, [names[0]] * batch)
                kinds[f"distinct-{batch}"] = (batch, config.short_prompt, config.new_tokens, names[:batch])
            kinds["prefill"] = (2, config.long_prompt, 1, names[:2])
            samples: dict[str, list[StepSample]] = {kind: [] for kind in kinds}
            for round_ in range(config.repeats + 1):
                for kind, (batch, prompt, tokens, adapters) in kinds.items():
                    since = len(timer.samples)
                    run_engine(engine, [p[:prompt] for p in prompts[:batch]], tokens, adapters)
                    if round_:
                        samples[kind] += timer.samples[since:]
                progress(f"round {round_} of {config.repeats} done" if round_ else "warm-up done")
            same = [decode_step_s(samples[f"same-{b}"], b) for b in config.batch_sizes]
            distinct = [decode_step_s(samples[f"distinct-{b}"], b) for b in config.batch_sizes]
            for batch, one, many in zip(config.batch_sizes, same, distinct, strict=True):
                progress(
                    f"batch {batch}: decode step {one * 1e3:.1f} ms one adapter, {many * 1e3:.1f} ms {batch}"
                )
            prefill = prefill_per_token_s(samples["prefill"], overhead=distinct[0])
            progress(f"prefill: {prefill * 1e6:.0f} us per prompt token")
            # 3) adapter loads
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
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # others' work on a shared machine
        "adapter": f"LoRA rank {config.rank} on {TARGETS}, {disk_bytes} bytes of fp16 factors on disk",
        "method": "25th percentile of timed engine steps of one kind (decode at batch b, prefill "
        "of long prompts), kinds interleaved over rounds; loads: medians; disk -> host from the "
        "page cache (files just written)",
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
