"""The server's Prometheus `/metrics` text -> one flat sample per scrape -> time series.

One sample is `{series name: value}`: the few numbers a load test plots or checks, whatever the
server (loramux, or vLLM under its own names):

    queue_depth                 requests waiting to run       loramux_queue_depth, vllm:num_requests_waiting
    running                     requests in the running batch loramux_running_requests, vllm:num_requests_running
    kv_usage                    KV cache in use, 0..1         loramux_kv_cache_usage_ratio,
                                                              vllm:kv_cache_usage_perc (or gpu_cache_usage_perc)
    kv_cache_bytes              bytes the KV cache holds      loramux_kv_cache_bytes
    adapters_<tier>             adapters by highest tier      loramux_adapters{tier}
    adapter_slots               device adapter slots          loramux_adapter_slots
    adapter_loads_<tier>        loads into a tier (total)     loramux_adapter_loads_total{tier}
    adapter_evictions_<tier>    evictions from a tier (total) loramux_adapter_evictions_total{tier}
    requests_total              requests counted (total)      loramux_requests_total, vllm:request_success_total
    requests_<outcome>          ... by outcome                {outcome}, vLLM's {finished_reason}
    generation_tokens_total     tokens generated (total)      loramux_generation_tokens_total, vllm:...
    prompt_tokens_total         prompt tokens (total)         loramux_prompt_tokens_total, vllm:...
    engine_steps_total          engine steps (total)          loramux_engine_step_seconds_count
    engine_step_seconds_total   their wall seconds (total)    loramux_engine_step_seconds_sum
    engine_threads              the engine's threads now      loramux_engine_threads

Counters and counts are summed over every other label (adapters, vLLM's engines); the KV ratio is
averaged over them. A metric the server does not expose is simply absent from the sample.

`Scraper` polls a URL every `interval_s` seconds in a task until stopped and keeps
`{"t_s": [...], "series": {name: [...]}}` (the report's `server_metrics`): each series aligned
with `t_s`, None where a scrape lacked it. A failed scrape is counted, never raised: the load
goes on without it. `scrape_once` is the one-shot for before/after totals.

It knows nothing of the workload, the report or how the run sends requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

QUEUE_DEPTH = "queue_depth"
RUNNING = "running"
KV_USAGE = "kv_usage"
KV_CACHE_BYTES = "kv_cache_bytes"
ADAPTER_SLOTS = "adapter_slots"
REQUESTS_TOTAL = "requests_total"
GENERATION_TOKENS_TOTAL = "generation_tokens_total"
PROMPT_TOKENS_TOTAL = "prompt_tokens_total"
ENGINE_STEPS_TOTAL = "engine_steps_total"
ENGINE_STEP_SECONDS_TOTAL = "engine_step_seconds_total"
ENGINE_THREADS = "engine_threads"
# Prefixes of the labelled series: ADAPTERS + "device", ADAPTER_LOADS + "host", REQUESTS + "stop".
ADAPTERS = "adapters_"
ADAPTER_LOADS = "adapter_loads_"
ADAPTER_EVICTIONS = "adapter_evictions_"
REQUESTS = "requests_"
TIERS = ("device", "host", "disk")


@dataclass(frozen=True)
class _Rule:
    """One exposed sample name feeding one series (or one series per value of `by_label`)."""

    sample: str  # the sample's name as exposed (`_total` included for counters)
    series: str  # the series name, or its prefix when by_label is set
    by_label: str | None = None
    mean: bool = False  # a ratio: averaged over label sets, not summed


# When two sample names feed one series (vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc
# and exposed both for a while), the first rule listed that the server exposes wins.
RULES: tuple[_Rule, ...] = (
    _Rule("loramux_queue_depth", QUEUE_DEPTH),
    _Rule("loramux_running_requests", RUNNING),
    _Rule("loramux_kv_cache_usage_ratio", KV_USAGE, mean=True),
    _Rule("loramux_kv_cache_bytes", KV_CACHE_BYTES),
    _Rule("loramux_adapters", ADAPTERS, by_label="tier"),
    _Rule("loramux_adapter_slots", ADAPTER_SLOTS),
    _Rule("loramux_adapter_loads_total", ADAPTER_LOADS, by_label="tier"),
    _Rule("loramux_adapter_evictions_total", ADAPTER_EVICTIONS, by_label="tier"),
    _Rule("loramux_requests_total", REQUESTS_TOTAL),
    _Rule("loramux_requests_total", REQUESTS, by_label="outcome"),
    _Rule("loramux_generation_tokens_total", GENERATION_TOKENS_TOTAL),
    _Rule("loramux_prompt_tokens_total", PROMPT_TOKENS_TOTAL),
    _Rule("loramux_engine_step_seconds_count", ENGINE_STEPS_TOTAL),
    _Rule("loramux_engine_step_seconds_sum", ENGINE_STEP_SECONDS_TOTAL),
    _Rule("loramux_engine_threads", ENGINE_THREADS),
    _Rule("vllm:num_requests_waiting", QUEUE_DEPTH),
    _Rule("vllm:num_requests_running", RUNNING),
    _Rule("vllm:kv_cache_usage_perc", KV_USAGE, mean=True),  # a ratio 0..1 despite the name
    _Rule("vllm:gpu_cache_usage_perc", KV_USAGE, mean=True),
    _Rule("vllm:request_success_total", REQUESTS_TOTAL),
    _Rule("vllm:request_success_total", REQUESTS, by_label="finished_reason"),
    _Rule("vllm:generation_tokens_total", GENERATION_TOKENS_TOTAL),
    _Rule("vllm:prompt_tokens_total", PROMPT_TOKENS_TOTAL),
)


def _index(rules: tuple[_Rule, ...]) -> dict[str, list[tuple[int, _Rule]]]:
    by_sample: dict[str, list[tuple[int, _Rule]]] = defaultdict(list)
    for order, rule in enumerate(rules):
        by_sample[rule.sample].append((order, rule))
    return dict(by_sample)


_RULES_BY_SAMPLE = _index(RULES)


def is_counter(name: str) -> bool:
    """Whether series `name` only grows (a before/after difference means something)."""
    return name.endswith("_total") or name.startswith((ADAPTER_LOADS, ADAPTER_EVICTIONS, REQUESTS))


def parse_sample(text: str) -> dict[str, float]:
    """The flat sample of one `/metrics` text (raises ValueError on text that is not an exposition)."""
    # series -> (rule order, values): only the values of the series' first-listed rule are kept
    found: dict[str, tuple[int, list[float]]] = {}
    means: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for order, rule in _RULES_BY_SAMPLE.get(sample.name, ()):
                if not math.isfinite(sample.value):
                    continue
                if rule.by_label is None:
                    name = rule.series
                elif rule.by_label in sample.labels:
                    name = rule.series + sample.labels[rule.by_label]
                else:
                    continue
                held = found.get(name)
                if held is None or order < held[0]:
                    found[name] = held = (order, [])
                if held[0] == order:
                    held[1].append(sample.value)
                if rule.mean:
                    means.add(name)
    return {
        name: (math.fsum(values) / len(values) if name in means else math.fsum(values))
        for name, (_, values) in sorted(found.items())
    }


def deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """after - before for every counter of `after` (what the server counted in between); a counter
    absent before counts from 0 (a labelled counter has no sample until its first count)."""
    return {name: after[name] - before.get(name, 0.0) for name in after if is_counter(name)}


class ScrapeError(Exception):
    """A `/metrics` scrape that did not give a sample (unreachable, not 200, not an exposition)."""


async def _fetch(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    try:
        answer = await client.get(url)
    except httpx.HTTPError as error:
        raise ScrapeError(f"scraping {url}: {type(error).__name__}: {error}") from error
    if answer.status_code != 200:
        raise ScrapeError(f"scraping {url}: HTTP {answer.status_code} (is this the server's /metrics URL?)")
    try:
        return parse_sample(answer.text)
    except ValueError as error:
        raise ScrapeError(f"scraping {url}: not a Prometheus text exposition ({error})") from error


async def scrape_once(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """One sample of `url` (the before/after totals of a run); raises ScrapeError when it fails."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        return await _fetch(client, url)


@dataclass(frozen=True)
class ScrapeConfig:
    url: str  # the server's metrics URL, e.g. http://127.0.0.1:8000/metrics
    interval_s: float = 1.0
    timeout_s: float = 5.0  # one scrape; a slower one counts as failed

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.timeout_s > 0):
            raise ValueError(f"scrape interval and timeout must be positive seconds, got {self}")


class Scraper:
    """Polls one metrics URL on a fixed schedule and keeps the series (see the module docstring).

    Times are seconds since `start_s` (a `time.monotonic()` value the caller gives: the run's
    start), taken when each scrape is sent. A scrape slower than the interval delays the next one
    rather than overlapping it; the schedule then picks up from now, not with a burst.
    """

    def __init__(self, config: ScrapeConfig, start_s: float) -> None:
        self.config = config
        self.start_s = start_s
        self.t_s: list[float] = []
        self.series: dict[str, list[float | None]] = {}
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling in a task of the running event loop."""
        if self._task is not None:
            raise RuntimeError("this Scraper was already started")
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="metrics-scraper")

    async def stop(self) -> None:
        """Stop polling (a scrape in flight is abandoned, not counted)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def result(self) -> dict[str, Any]:
        """`{"t_s": [...], "series": {name: [...]}}`: copies, aligned, ready for the report."""
        return {"t_s": list(self.t_s), "series": {name: list(values) for name, values in self.series.items()}}

    def add(self, t_s: float, sample: Mapping[str, float]) -> None:
        """Append one sample at `t_s`, keeping every series aligned with `t_s`."""
        for name in sample.keys() - self.series.keys():  # first seen now: None at the earlier scrapes
            self.series[name] = [None] * len(self.t_s)
        self.t_s.append(t_s)
        for name, values in self.series.items():
            values.append(sample.get(name))

    async def _poll(self) -> None:
        interval = self.config.interval_s
        async with httpx.AsyncClient(timeout=self.config.timeout_s) as client:
            next_at = time.monotonic()
            while True:
                sent_s = time.monotonic()
                try:
                    sample = await _fetch(client, self.config.url)
                except Exception as error:  # any failure: counted, and the load goes on
                    self.failures += 1
                    self.last_error = str(error) if isinstance(error, ScrapeError) else repr(error)
                else:
                    self.add(sent_s - self.start_s, sample)
                next_at = max(next_at + interval, time.monotonic())
                await asyncio.sleep(next_at - time.monotonic())
