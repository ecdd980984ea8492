"""Every Prometheus metric of loramux, in one place.

One `Metrics` owns one `CollectorRegistry` (no module-level state, so a process or a test may hold
many engines). The engine records per-request metrics once, when a request finishes or is
refused, and one observation per engine step (its wall time); per-step state (queue depth, running requests, KV cache, adapter tiers, the vLLM LoRA
gauge) is read at scrape time by a collector, so nothing here runs per token or per layer.

Requests of the base model carry the base model's name as `adapter` label (the `model` an
OpenAI client sends for it, like vLLM's `model_name`); a refused request naming an adapter the
server cannot serve is labelled `<unknown>`, so garbage names cannot grow the label set; an `auto`
request refused before the router chose (bad sampling values, say) is labelled `auto`. The per-adapter
series are bounded: the first `max_adapter_labels` adapter labels (`--metrics-max-adapters`, default
256; a mixture's "a+b" is one, "b+a" the same, and mixtures take at most a quarter of them) get
series of their own, later ones are counted under `<other>`. Each
label costs about 80 series (three histograms): at 1,000 labels a scrape was 6.3 MB and 0.45 s of
Python under the GIL, at 5,000 32 MB and 2.2 s (bench/RESULTS.md). The base model's name, `auto`
and `<unknown>` always have their own.

    loramux_requests_total{adapter,outcome}            outcome: stop | length | cancelled | error |
                                                       invalid | overloaded | unavailable
    loramux_requests_by_tier_total{tier}               adapter requests that left the engine, by where
                                                       their adapter was when they arrived: device |
                                                       host | disk (a cold start); a mixture's coldest
    loramux_time_to_first_token_seconds{adapter}       histogram, submit -> first token
    loramux_time_per_output_token_seconds{adapter}     histogram, (last - first token) / (tokens - 1)
    loramux_e2e_request_latency_seconds{adapter}       histogram, submit -> finish
    loramux_prompt_tokens_total{adapter}               prompt tokens prefilled
    loramux_generation_tokens_total{adapter}           tokens generated
    loramux_queue_depth                                requests submitted, not yet running
    loramux_running_requests                           requests holding a KV slot (the running batch)
    loramux_kv_cache_usage_ratio                       KV slots in use / KV slots
    loramux_kv_cache_bytes                             bytes the KV cache holds now
    loramux_adapters{tier}                             adapters by highest tier: device | host | disk
    loramux_adapter_loads_total{tier}                  disk -> host loads, host -> device slot fills
    loramux_adapter_evictions_total{tier}              LRU evictions from the host cache / device slots
    loramux_adapter_load_seconds{tier}                 histogram of those loads
    loramux_adapter_slots                              device slots
    loramux_engine_step_seconds                        histogram, wall time of one engine step
    loramux_engine_threads                             the engine's intra-op threads now (fewer while
                                                       other processes contend for the CPUs)
    vllm:num_requests_running{model_name}              as loramux_running_requests, vLLM's name
    vllm:num_requests_waiting{model_name}              as loramux_queue_depth, vLLM's name
    vllm:kv_cache_usage_perc{model_name}               as loramux_kv_cache_usage_ratio: a fraction, 0..1
    vllm:lora_requests_info{running_lora_adapters,     value: when these sets were first seen as they are
        waiting_lora_adapters,max_lora}                (unix seconds); running = adapters of requests in
                                                       the running batch, waiting = of queued requests
    vllm:lora_adapter_loaded{adapter_name,level,       1 per adapter in memory: level "gpu" = a device
        pinned,rank}                                   slot (whatever the device), "cpu" = the host tier
                                                       only; pinned "true" while a running request holds it
    vllm:num_gpu_loaded_lora_adapters                  adapters in a device slot
    vllm:max_gpu_lora_adapters                         device slots
    loramux_router_decisions_total{adapter}            "auto" requests routed, by what serves them (the
                                                       base model's name on a fallback)
    loramux_router_fallbacks_total{reason}             "auto" requests sent to the base model: no routable
                                                       adapter | below threshold | out of domain
    loramux_router_route_seconds                       histogram, routing one "auto" request
    loramux_router_examples_learned_total              example prompts learned at run time (RegisterExamples,
                                                       LoadAdapter's example_prompts)
    loramux_router_adapters{by}                        adapters routable now, by: examples | weights

The `vllm:` series are what the Gateway API Inference Extension's endpoint picker (llm-d) scrapes
from vLLM, with vLLM's names, types and ranges, so a pool of loramux pods is scored as a pool of
vLLM pods. `vllm:lora_requests_info` is one series: the picker takes the series of largest value
and splits each adapter label on commas. vLLM lists the same adapters under both labels; loramux
lists what the names say. The residency series follow the schema proposed to vLLM
(vllm-project/vllm#54830) for a load-state scorer: a series per adapter in the host tier or a
device slot, none per adapter that is only on disk, so a scrape costs the same with 8 or 10,000
adapters on disk.

A routing decision's `adapter` label is the one its request's metrics carry: servable adapter
names only (the router picks nothing else), so it is bounded as the other per-adapter labels are;
fallback reasons are a fixed set.

`Metrics` is an `EngineEvents` (the engine reports finished and refused requests and adapter loads
to it) and a `RouterEvents` (the gRPC service reports routing decisions and learned examples), and
reads an engine's `EngineSnapshot` and the adapters it holds in memory (`watch`) and the router's
adapter counts (`watch_router`) at scrape time; all are wired where the server is assembled
(`server.serve_commands.watch_engine`). The only state it keeps for a scrape is when the LoRA
request sets last changed. It never imports the engine, and a scrape reads memory only. It knows
nothing about gRPC or HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.events import UNKNOWN_ADAPTER, EngineSnapshot, FinishedRequest

__all__ = ["CONTENT_TYPE", "UNKNOWN_ADAPTER", "Metrics", "ResidentAdapter"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets as vLLM's, so dashboards built for it read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
ROUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FALLBACK_REASONS = ("no routable adapter", "below threshold", "out of domain")  # server.router.router
ADAPTER_TIERS = ("device", "host", "disk")  # server.engine.adapters.TIER_ORDER
AUTO_LABEL = "auto"  # server.preparation.AUTO_ADAPTER
OTHER_ADAPTERS = "<other>"  # the label of adapters past max_adapter_labels
MAX_ADAPTER_LABELS = 256


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter held in memory, as `vllm:lora_adapter_loaded` shows it."""

    name: str
    level: str  # "gpu": in a device slot (whatever the device) | "cpu": in the host tier only
    pinned: bool  # a running request holds its slot: it cannot be evicted now
    rank: int  # its largest per-module rank


Residency = Callable[[], Sequence[ResidentAdapter]]


class Metrics:
    """The registry of one server process and the metrics the engine records into it."""

    def __init__(self, process_metrics: bool = True, max_adapter_labels: int = MAX_ADAPTER_LABELS) -> None:
        if max_adapter_labels < 0:
            raise ValueError(f"max_adapter_labels must be >= 0, got {max_adapter_labels}")
        self.registry = CollectorRegistry()
        self._max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()  # adapter labels with series of their own
        self._mixture_labels = 0  # of them, mixtures ("a+b")
        self._own_labels = {UNKNOWN_ADAPTER, AUTO_LABEL}  # never folded (and the base model's name)
        self._labels_lock = threading.Lock()
        if process_metrics:  # what the default registry shows: CPU, memory, fds, GC, Python version
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            self.registry.register(GC_COLLECTOR)
        adapter = ["adapter"]
        self.requests = Counter(
            "loramux_requests",
            "Requests by outcome: finish reason, or why it was refused at submit.",
            ["adapter", "outcome"],
            registry=self.registry,
        )
        self.requests_by_tier = Counter(
            "loramux_requests_by_tier",
            "Adapter requests that left the engine, by where their adapter was when they arrived "
            "(disk: a cold start; a mixture counts as its coldest adapter).",
            ["tier"],
            registry=self.registry,
        )
        for (
            tier
        ) in ADAPTER_TIERS:  # present (at 0) from the start, so a cold-start ratio needs no special case
            self.requests_by_tier.labels(tier)
        self.time_to_first_token = Histogram(
            "loramux_time_to_first_token_seconds",
            "Seconds from submit to the first generated token (adapter loads and queueing included).",
            adapter,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "loramux_time_per_output_token_seconds",
            "Mean seconds per generated token after the first, one observation per request.",
            adapter,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "loramux_e2e_request_latency_seconds",
            "Seconds from submit to finish (any finish reason).",
            adapter,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "loramux_prompt_tokens", "Prompt tokens prefilled.", adapter, registry=self.registry
        )
        self.generation_tokens = Counter(
            "loramux_generation_tokens", "Tokens generated.", adapter, registry=self.registry
        )
        self.adapter_load_seconds = Histogram(
            "loramux_adapter_load_seconds",
            "Seconds to load an adapter into a tier: disk -> host (read + validate), host -> device (slot copy).",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.route_decisions = Counter(
            "loramux_router_decisions",
            'Requests for adapter "auto", by the adapter label that serves them (the base model\'s name on a fallback).',
            adapter,
            registry=self.registry,
        )
        self.route_fallbacks = Counter(
            "loramux_router_fallbacks",
            'Requests for adapter "auto" served by the base model, by why.',
            ["reason"],
            registry=self.registry,
        )
        for reason in FALLBACK_REASONS:  # present (at 0) from the start, so rates need no special case
            self.route_fallbacks.labels(reason)
        self.route_seconds = Histogram(
            "loramux_router_route_seconds",
            'Seconds to route one "auto" request (the base model\'s first layers over its prompt, scoring).',
            buckets=ROUTE_BUCKETS,
            registry=self.registry,
        )
        self.examples_learned_total = Counter(
            "loramux_router_examples_learned",
            "Example prompts the router learned at run time (RegisterExamples, LoadAdapter example_prompts).",
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "loramux_engine_step_seconds",
            "Wall seconds of one engine step (admit and plan, forward, sample, deliver).",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self._watching = False
        self._watching_router = False

    def watch(
        self,
        snapshot: Callable[[], EngineSnapshot],
        residency: Residency | None = None,
        model_name: str = "",
    ) -> None:
        """Read an engine's state (`Engine.snapshot`) at every scrape (one engine per Metrics).

        residency: the adapters it holds in memory (`vllm:lora_adapter_loaded`; none without it).
        model_name: the served model's name, the `model_name` label of the vLLM scheduler gauges.
        """
        if self._watching:
            raise ValueError("this Metrics already watches an engine; give every engine its own Metrics()")
        self.registry.register(_EngineCollector(snapshot, residency, model_name))
        if model_name:
            with self._labels_lock:
                self._own_labels.add(model_name)
        self._watching = True

    def watch_router(self, routable: Callable[[], tuple[int, int]]) -> None:
        """Read the router's (adapters by examples, by weights only) at every scrape
        (`server.router.router.Router.routable_counts`)."""
        if self._watching_router:
            raise ValueError("this Metrics already watches a router")
        self.registry.register(_RouterCollector(routable))
        self._watching_router = True

    # -- RouterEvents: reported by the gRPC service ---------------------------------------------

    def adapter_label(self, label: str) -> str:
        """`label` itself while the label set has room (or it has its own series already), else
        `<other>`. A mixture's "b+a" is counted as "a+b" (adapter names hold no '+'), and mixtures
        take at most a quarter of the labels, so permutations and routed mixtures cannot use up
        the room single adapters need."""
        if label in self._adapter_labels:  # the common case, without the lock
            return label
        with self._labels_lock:
            if label in self._own_labels:
                return label
            mixture = "+" in label
            if mixture:
                label = "+".join(sorted(label.split("+")))
                if label in self._adapter_labels:
                    return label
            room = self._max_adapter_labels // 4 - self._mixture_labels if mixture else 1
            if len(self._adapter_labels) < self._max_adapter_labels and room > 0:
                self._adapter_labels.add(label)
                self._mixture_labels += mixture
                return label
        return OTHER_ADAPTERS

    def request_routed(self, adapter: str, fallback_reason: str, seconds: float) -> None:
        self.route_decisions.labels(self.adapter_label(adapter)).inc()
        if fallback_reason:
            self.route_fallbacks.labels(fallback_reason).inc()
        self.route_seconds.observe(seconds)

    def examples_learned(self, count: int) -> None:
        self.examples_learned_total.inc(count)

    # -- EngineEvents: reported by the engine ---------------------------------------------------

    def request_finished(self, request: FinishedRequest) -> None:
        adapter, generated = self.adapter_label(request.adapter), request.generated_tokens
        self.requests.labels(adapter, request.outcome).inc()
        if request.adapter_tier:
            self.requests_by_tier.labels(request.adapter_tier).inc()
        self.prompt_tokens.labels(adapter).inc(request.prompt_tokens)
        self.generation_tokens.labels(adapter).inc(generated)
        self.e2e_latency.labels(adapter).observe(request.finished_at - request.submitted_at)
        if request.first_token_at:
            self.time_to_first_token.labels(adapter).observe(request.first_token_at - request.submitted_at)
            if generated > 1:
                tpot = (request.finished_at - request.first_token_at) / (generated - 1)
                self.time_per_output_token.labels(adapter).observe(tpot)

    def request_refused(self, adapter: str, outcome: str) -> None:
        self.requests.labels(self.adapter_label(adapter), outcome).inc()

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        self.adapter_load_seconds.labels(tier).observe(seconds)

    def step_finished(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format of everything in the registry."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and tier counters read from an engine snapshot at scrape time (cheaper than per step)."""

    def __init__(
        self, snapshot: Callable[[], EngineSnapshot], residency: Residency | None, model_name: str
    ) -> None:
        self.snapshot = snapshot
        self.residency = residency
        self.model_labels = {"model_name": model_name} if model_name else {}
        self.lora_sets_clock = _ChangeClock()
        self.lora_sets_clock.since(_lora_sets(snapshot()))  # the sets at start date from the start

    def collect(self) -> Iterator[Metric]:
        state = self.snapshot()
        kv_usage = state.num_running / state.kv_slots if state.kv_slots else 0.0
        yield GaugeMetricFamily(
            "loramux_queue_depth", "Requests submitted and not yet running.", value=state.num_waiting
        )
        yield GaugeMetricFamily(
            "loramux_running_requests",
            "Requests in the running batch (holding a KV slot).",
            value=state.num_running,
        )
        yield GaugeMetricFamily(
            "loramux_kv_cache_usage_ratio",
            "KV cache slots in use / KV cache slots (1 = no request can be admitted).",
            value=kv_usage,
        )
        yield GaugeMetricFamily(
            "loramux_kv_cache_bytes", "Bytes the KV cache holds now (it grows with the longest sequence).",
            value=state.kv_bytes,
        )  # fmt: skip
        if state.threads:
            yield GaugeMetricFamily(
                "loramux_engine_threads",
                "The engine's intra-op threads now (one while other processes contend for the CPUs).",
                value=state.threads,
            )
        yield from self._vllm_scheduler(state, kv_usage)
        tiers = GaugeMetricFamily(
            "loramux_adapters",
            "Adapters the server can serve, by the highest tier they are in.",
            labels=["tier"],
        )
        loads = CounterMetricFamily(
            "loramux_adapter_loads",
            "Adapter loads into a tier (disk -> host, host -> device slot).",
            labels=["tier"],
        )
        evictions = CounterMetricFamily(
            "loramux_adapter_evictions", "Adapters evicted from a tier to make room (LRU).", labels=["tier"]
        )
        adapters = state.adapters
        if adapters is not None:
            for tier in ("device", "host", "disk"):
                tiers.add_metric([tier], adapters.tiers.get(tier, 0))
            loads.add_metric(["host"], adapters.host_loads)
            loads.add_metric(["device"], adapters.device_loads)
            evictions.add_metric(["host"], adapters.host_evictions)
            evictions.add_metric(["device"], adapters.device_evictions)
        yield tiers
        yield loads
        yield evictions
        num_slots = adapters.num_slots if adapters is not None else 0
        yield GaugeMetricFamily("loramux_adapter_slots", "Device adapter slots.", value=num_slots)
        if adapters is not None:  # vLLM exposes its LoRA series only with LoRA enabled
            yield self._vllm_lora_requests(state, num_slots)
            yield from self._vllm_residency(adapters.tiers.get("device", 0), num_slots)

    def _vllm_scheduler(self, state: EngineSnapshot, kv_usage: float) -> Iterator[Metric]:
        """What the endpoint picker's queue and KV-cache scorers read, as vLLM names them."""
        names, values = list(self.model_labels), list(self.model_labels.values())
        for name, documentation, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", state.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to be processed.", state.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage),
        ):
            family = GaugeMetricFamily(name, documentation, labels=names)
            family.add_metric(values, value)
            yield family

    def _vllm_lora_requests(self, state: EngineSnapshot, num_slots: int) -> Metric:
        """vLLM's LoRA gauge: one series, valued at when its label values were first seen as they are."""
        running, waiting = ",".join(state.running_adapters), ",".join(state.waiting_adapters)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests: adapters of running and of waiting requests; the value is "
            "when these sets were first seen as they are (unix seconds).",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        info.add_metric([str(num_slots), waiting, running], self.lora_sets_clock.since(_lora_sets(state)))
        return info

    def _vllm_residency(self, on_device: int, num_slots: int) -> Iterator[Metric]:
        """The per-adapter residency schema proposed to vLLM: device slots are "gpu", the host tier "cpu"."""
        loaded = GaugeMetricFamily(
            "vllm:lora_adapter_loaded",
            'LoRA adapters in memory: level "gpu" = a device slot, "cpu" = the host tier only; pinned '
            "while a running request holds it.",
            labels=["adapter_name", "level", "pinned", "rank"],
        )
        if self.residency is not None:
            resident = self.residency()
            on_device = sum(adapter.level == "gpu" for adapter in resident)
            for adapter in resident:
                pinned = "true" if adapter.pinned else "false"
                loaded.add_metric([adapter.name, adapter.level, pinned, str(adapter.rank)], 1)
        yield loaded
        yield GaugeMetricFamily(
            "vllm:num_gpu_loaded_lora_adapters", "LoRA adapters in a device slot.", value=on_device
        )
        yield GaugeMetricFamily("vllm:max_gpu_lora_adapters", "Device LoRA adapter slots.", value=num_slots)


def _lora_sets(state: EngineSnapshot) -> Hashable:
    return state.running_adapters, state.waiting_adapters


class _ChangeClock:
    """When a value last changed, as the scrapes see it: the wall-clock time it was first seen as it
    is (scrapes may run on several threads at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: Hashable = None
        self._since = 0.0

    def since(self, value: Hashable) -> float:
        with self._lock:
            if value != self._value:
                self._value, self._since = value, time.time()
            return self._since


class _RouterCollector(Collector):
    """How many adapters the router can route now, read from its tables (memory only) at scrape time."""

    def __init__(self, routable: Callable[[], tuple[int, int]]) -> None:
        self.routable = routable

    def collect(self) -> Iterator[Metric]:
        by_examples, by_weights = self.routable()
        family = GaugeMetricFamily(
            "loramux_router_adapters",
            'Adapters adapter "auto" can pick now, by what they are routed by: examples | weights (only).',
            labels=["by"],
        )
        family.add_metric(["examples"], by_examples)
        family.add_metric(["weights"], by_weights)
        yield family
