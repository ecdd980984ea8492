"""The event loop: a planned workload through a router onto R replicas, and what came of it.

    simulate(workload, FleetConfig, costs) -> SimResult;  SimResult.summary(warmup) -> Summary

Arrivals come from the load harness's planner (`bench.loadtest.workload.plan`), so the
simulation and `loramux bench load` draw the same requests from the same seed. Events (a
replica's step ends, a sleeping replica's load is done) sit in one heap ordered by (time, order
of scheduling); arrivals are merged in without going through it. Every request runs to its end:
the loop stops when the heap is empty, after the last arrival.

The summary leaves out the first `warmup` fraction of requests (cold caches) and reports the
rest over the window from the first counted arrival to the last arrival: slot hit rate (the
adapter was in a device slot of the replica the request was sent to, when it got there), where
the others found it (host tier, disk), cold loads per second (disk -> host reads, host -> device
slot copies), completed requests and output tokens per second, TTFT percentiles (from the planned
arrival, so time held at a router counts), the fraction of replica-time spent stepping and the mean batch.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, replace

import numpy as np

from bench.clustersim.costs import Costs
from bench.clustersim.replica import (
    DEVICE,
    DISK,
    HOST,
    STEP_END,
    LoadLog,
    Replica,
    ReplicaShape,
    RequestTable,
)
from bench.clustersim.routing import PolicySpec, make_router
from bench.clustersim.state import FleetState
from bench.loadtest.workload import WorkloadConfig, _Streams, expected_frequencies, parse_length, plan


@dataclass(frozen=True)
class Workload:
    """The planned requests as columns (adapter = index into `names`)."""

    arrival_s: tuple[float, ...]
    adapter: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    max_tokens: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not n or not len(self.adapter) == len(self.prompt_tokens) == len(self.max_tokens) == n:
            raise ValueError("a workload needs >= 1 request and one of each column per request")
        if any(b < a for a, b in itertools.pairwise(self.arrival_s)):
            raise ValueError("a workload's arrivals must not decrease")


def workload_from(config: WorkloadConfig) -> Workload:
    """Plan `config` (open loop: it needs arrival times) into columns.

    Only prompt lengths matter here, so a synthetic plan is made with one-token prompts (a
    million requests of 128 token ids would not fit in memory) and the lengths are drawn from the
    planner's own prompt-length stream: each aspect of a plan has its own stream, so the times,
    adapters and max tokens are the same draws and the lengths are what `plan(config)` draws (a
    test holds the two equal). A trace, whose lines may give their own lengths, is planned whole.
    """
    if config.arrival not in ("poisson", "gamma", "trace"):
        raise ValueError(f"the simulation replays planned times; arrival {config.arrival!r} has none")
    if config.arrival == "trace":
        planned = plan(config)
        prompt_tokens = tuple(len(p.prompt_token_ids) for p in planned)
    else:
        planned = plan(replace(config, prompt_tokens="1"))
        lengths = parse_length(config.prompt_tokens).sample(
            _Streams(config.seed).prompt_lengths, len(planned)
        )
        prompt_tokens = tuple(lengths.tolist())
    names = tuple(dict.fromkeys((*config.adapters, *(p.adapter for p in planned))))
    index = {name: i for i, name in enumerate(names)}
    return Workload(
        arrival_s=tuple(float(p.at_s or 0.0) for p in planned),
        adapter=tuple(index[p.adapter] for p in planned),
        prompt_tokens=prompt_tokens,
        max_tokens=tuple(p.max_tokens for p in planned),
        names=names,
    )


@dataclass(frozen=True)
class FleetConfig:
    replicas: int
    shape: ReplicaShape
    policy: PolicySpec
    seed: int = 0  # the router's random draws (the workload has its own seed)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas {self.replicas}: need at least one")


@dataclass(frozen=True)
class Summary:
    requests: int  # counted (after the warm-up)
    window_s: float
    offered_rps: float
    slot_hit_rate: float
    host_rate: float  # found it in the host tier only
    disk_rate: float  # found it nowhere nearer than disk
    disk_loads_per_s: float
    device_loads_per_s: float
    throughput_rps: float
    output_tok_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    stepping: float  # fraction of replica-time spent in a step (any batch at all)
    mean_batch: float  # sequences per step


@dataclass(frozen=True)
class SimResult:
    config: FleetConfig
    workload: Workload
    requests: RequestTable
    loads: LoadLog
    busy_s: tuple[float, ...]  # per replica
    steps: int
    sequence_steps: int
    end_s: float

    def summary(self, warmup: float = 0.2) -> Summary:
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup {warmup}: a fraction in [0, 1)")
        arrival = np.asarray(self.workload.arrival_s)
        first = min(int(len(arrival) * warmup), len(arrival) - 1)
        start, stop = arrival[first], arrival[-1]
        window = max(stop - start, 1e-12)
        tier = np.asarray(self.requests.tier[first:])
        ttft = np.asarray(self.requests.first_token_s[first:]) - arrival[first:]
        finish = np.asarray(self.requests.finish_s)
        done = (finish >= start) & (finish < stop)

        def per_s(times: list[float]) -> float:
            stamps = np.asarray(times)
            return float(((stamps >= start) & (stamps < stop)).sum() / window)

        return Summary(
            requests=len(tier),
            window_s=float(window),
            offered_rps=float(len(tier) / window),
            slot_hit_rate=float(np.mean(tier == DEVICE)),
            host_rate=float(np.mean(tier == HOST)),
            disk_rate=float(np.mean(tier == DISK)),
            disk_loads_per_s=per_s(self.loads.disk_s),
            device_loads_per_s=per_s(self.loads.device_s),
            throughput_rps=float(done.sum() / window),
            output_tok_s=float(np.asarray(self.workload.max_tokens)[done].sum() / window),
            ttft_p50_s=float(np.percentile(ttft, 50)),
            ttft_p99_s=float(np.percentile(ttft, 99)),
            ttft_mean_s=float(ttft.mean()),
            stepping=float(sum(self.busy_s) / (len(self.busy_s) * max(self.end_s, 1e-12))),
            mean_batch=self.sequence_steps / max(self.steps, 1),
        )


def simulate(workload: Workload, config: FleetConfig, costs: Costs) -> SimResult:
    heap: list[tuple[float, int, int, int]] = []
    order = itertools.count()

    def schedule(time: float, replica: int, kind: int) -> None:
        heapq.heappush(heap, (time, next(order), replica, kind))

    requests = RequestTable(list(workload.adapter), list(workload.prompt_tokens), list(workload.max_tokens))
    state = FleetState(config.replicas, keep_changes=config.policy.name.startswith("llm-d"))
    loads = LoadLog()
    replicas = [
        Replica(i, config.shape, costs, (requests, state, loads), schedule) for i in range(config.replicas)
    ]
    router = make_router(config.policy, state, config.shape.slots, config.shape.max_running, config.seed)

    def dispatch(request: int, replica: int, now: float) -> None:
        adapter = requests.adapter[request]
        requests.replica[request] = replica
        requests.sent_s[request] = now
        requests.tier[request] = replicas[replica].where_is(adapter, now)
        replicas[replica].accept(request, now)
        router.sent(replica, adapter)

    def run_event() -> None:
        now, _, index, kind = heapq.heappop(heap)
        replica = replicas[index]
        if kind != STEP_END:
            replica.wake(now)
            return
        if replica.end_step(now) and router.pending:
            while (held := router.take_pending(index)) is not None:
                dispatch(held[0], index, now)
        replica.start_step(now)

    now = 0.0
    for request, now in enumerate(workload.arrival_s):
        while heap and heap[0][0] <= now:
            run_event()
        adapter = workload.adapter[request]
        replica = router.route(adapter, now)
        if replica is None:
            router.pending.append((request, adapter))
        else:
            dispatch(request, replica, now)
    while heap:
        now = heap[0][0]
        run_event()
    if router.pending:
        raise RuntimeError(f"{len(router.pending)} requests were still held at the router at the end")
    return SimResult(
        config=config,
        workload=workload,
        requests=requests,
        loads=loads,
        busy_s=tuple(r.busy_s for r in replicas),
        steps=sum(r.steps for r in replicas),
        sequence_steps=sum(r.sequence_steps for r in replicas),
        end_s=now,
    )


def replica_capacity_rps(costs: Costs, shape: ReplicaShape, config: WorkloadConfig) -> float:
    """Requests per second one replica completes at a full batch of `config`'s requests, no cold
    loads: max_running requests, their expected number of distinct adapters, mean lengths."""
    batch = shape.max_running
    probabilities = np.asarray(list(expected_frequencies(config).values()))
    distinct = float(np.sum(1.0 - (1.0 - probabilities) ** batch))
    lengths = np.random.default_rng(0)
    prompt = float(parse_length(config.prompt_tokens).sample(lengths, 100_000).mean())
    output = float(parse_length(config.max_tokens).sample(lengths, 100_000).mean())
    return batch / costs.full_batch_s(batch, distinct, prompt, output)
