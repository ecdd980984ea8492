"""The fleet simulation (bench/clustersim, `loramux bench cluster-sim`) against closed forms.

Tiny configurations with made-up costs, fixed seeds: hit rates that queueing-free caches must
give (everything fits: 1; uniform popularity under random routing: S/A in a slot, (H-S)/A in the
host tier only; zipf under random routing: Che's approximation of LRU), the M/D/1 mean wait (Pollaczek-Khinchine) for one replica serving one request
at a time, affinity routing against random on zipf, Ray's and llm-d's choices on hand-made
states, and bookkeeping: every request finishes exactly once, the same seed gives the same run.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from bench.cluster_sim import add_arguments, main
from bench.clustersim.costs import COSTS_PATH, Costs, costs_from_json, read_costs, write_costs
from bench.clustersim.replica import DEVICE, DISK, HOST, ReplicaShape
from bench.clustersim.routing import EXTRA_POLICIES, POLICIES, LlmdRouter, PolicySpec, RayRouter
from bench.clustersim.sim import FleetConfig, SimResult, simulate, workload_from
from bench.clustersim.state import RESIDENT, RUNS, WAITS, FleetState
from bench.loadtest.workload import WorkloadConfig, plan

# Decode 10 ms at batch 1 .. 30 ms at 32 (40 ms with 32 adapters), cheap loads.
COSTS = Costs(
    batch_sizes=(1, 32),
    same_adapter_s=(0.010, 0.030),
    distinct_adapters_s=(0.010, 0.040),
    prefill_per_token_s=0.0001,
    disk_to_host_s=0.02,
    host_hit_s=0.001,
    host_to_device_s=0.002,
    adapter_host_bytes=1000,
)


def names(count: int) -> tuple[str, ...]:
    return tuple(f"a{i:03d}" for i in range(count))


def workload(adapters: int, popularity: str, rate: float, count: int, **lengths: str):  # type: ignore[no-untyped-def]
    config = WorkloadConfig(
        adapters=names(adapters),
        token_ids=(0, 1),
        popularity=popularity,
        rate=rate,
        num_requests=count,
        prompt_tokens=lengths.get("prompt", "16"),
        max_tokens=lengths.get("output", "4"),
        seed=3,
    )
    return workload_from(config)


def run(wl, replicas: int, shape: ReplicaShape, policy: str = "random", **knobs) -> SimResult:  # type: ignore[no-untyped-def]
    return simulate(wl, FleetConfig(replicas, shape, PolicySpec(policy, **knobs), seed=7), COSTS)


def test_every_adapter_fitting_in_the_slots_always_hits_after_warm_up() -> None:
    wl = workload(adapters=6, popularity="uniform", rate=5.0, count=3000)
    for policy in POLICIES:
        summary = run(wl, 3, ReplicaShape(slots=8, host_adapters=8), policy).summary(warmup=0.2)
        assert summary.slot_hit_rate == 1.0, policy
        assert summary.disk_loads_per_s == summary.device_loads_per_s == 0.0, policy


def test_random_routing_over_uniform_adapters_hits_s_over_a_in_slots_and_h_over_a_in_host() -> None:
    # Light load: each replica's LRU sees an independent uniform stream, so any S of the A
    # adapters are resident and a request finds its own there with probability S/A; the host
    # tier holds the H most recently read, a superset of the slots.
    adapters, slots, host = 40, 4, 10
    wl = workload(adapters=adapters, popularity="uniform", rate=1.0, count=20_000)
    summary = run(wl, 3, ReplicaShape(slots=slots, host_adapters=host)).summary(warmup=0.1)
    assert summary.slot_hit_rate == pytest.approx(slots / adapters, abs=0.012)
    assert summary.host_rate == pytest.approx((host - slots) / adapters, abs=0.012)
    assert summary.disk_rate == pytest.approx(1 - host / adapters, abs=0.015)


def che_lru_hit_rate(probabilities: np.ndarray, size: int) -> float:
    """Che's approximation of an LRU cache of `size` under independent requests: the characteristic
    time T solves sum_i (1 - exp(-p_i T)) = size, and the hit rate is sum_i p_i (1 - exp(-p_i T))."""
    low, high = 0.0, 1.0
    while np.sum(1 - np.exp(-probabilities * high)) < size:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if np.sum(1 - np.exp(-probabilities * middle)) < size else (low, middle)
    return float(np.sum(probabilities * (1 - np.exp(-probabilities * high))))


@pytest.mark.parametrize(("adapters", "alpha", "slots"), [(500, 1.0, 10), (2000, 1.5, 8)])
def test_random_routing_over_zipf_adapters_hits_as_che_approximates_lru(
    adapters: int, alpha: float, slots: int
) -> None:
    # Light load again: each replica's slots and host tier are LRU caches under independent
    # zipf requests, which Che's approximation predicts to within a fraction of a percent.
    probabilities = np.arange(1, adapters + 1, dtype=np.float64) ** -alpha
    probabilities /= probabilities.sum()
    wl = workload(adapters=adapters, popularity=f"zipf:{alpha}", rate=1.0, count=20_000)
    summary = run(wl, 2, ReplicaShape(slots=slots, host_adapters=3 * slots)).summary(warmup=0.1)
    assert summary.slot_hit_rate == pytest.approx(che_lru_hit_rate(probabilities, slots), abs=0.015)
    in_host = summary.slot_hit_rate + summary.host_rate
    assert in_host == pytest.approx(che_lru_hit_rate(probabilities, 3 * slots), abs=0.015)


def test_affinity_routing_beats_random_on_zipf() -> None:
    # llm-d's affinity counts only adapters with a running request, so it needs batches to
    # show: this load keeps ~3 requests on each replica.
    wl = workload(adapters=200, popularity="zipf:1.5", rate=200.0, count=8000, output="8")
    shape = ReplicaShape(slots=4, host_adapters=50)
    hits = {policy: run(wl, 8, shape, policy).summary().slot_hit_rate for policy in POLICIES}
    assert hits["ray"] > hits["random"] + 0.25
    assert hits["llm-d"] > hits["random"] + 0.1
    assert hits["least-loaded"] == pytest.approx(hits["random"], abs=0.03)  # load says nothing of adapters


def test_one_replica_one_request_at_a_time_waits_as_m_d_1() -> None:
    # Service D = prompt * prefill_per_token (one step, decode free, loads free), Poisson arrivals
    # at rho = 0.6: mean wait rho * D / (2 (1 - rho)) (Pollaczek-Khinchine), TTFT = wait + D.
    costs = Costs((1,), (0.0,), (0.0,), 0.001, 0.0, 0.0, 0.0, 1)
    service, rho = 100 * 0.001, 0.6
    config = WorkloadConfig(
        adapters=("a",), token_ids=(0, 1), rate=rho / service, num_requests=40_000,
        prompt_tokens="100", max_tokens="1", seed=11,
    )  # fmt: skip
    shape = ReplicaShape(slots=1, host_adapters=1, max_running=1, max_batched_tokens=512)
    result = simulate(workload_from(config), FleetConfig(1, shape, PolicySpec("random")), costs)
    wait = result.summary(warmup=0.05).ttft_mean_s - service
    expected = rho * service / (2 * (1 - rho))
    assert wait == pytest.approx(expected, rel=0.07)
    assert result.summary().throughput_rps == pytest.approx(rho / service, rel=0.03)


@pytest.mark.parametrize("policy", POLICIES + EXTRA_POLICIES)
def test_every_request_finishes_exactly_once_after_it_arrived(policy: str) -> None:
    # Heavy enough that queues form, slots get pinned and (Ray, 2 ongoing) requests wait at the router.
    wl = workload(
        adapters=30,
        popularity="zipf:1.0",
        rate=60.0,
        count=3000,
        prompt="uniform:8-600",
        output="uniform:1-30",
    )
    result = run(wl, 4, ReplicaShape(slots=3, host_adapters=6, max_running=4), policy, ray_max_ongoing=2)
    requests = result.requests
    assert requests.finishes == [1] * len(requests.finishes)
    arrival = np.asarray(wl.arrival_s)
    sent, first, finish = (
        np.asarray(x) for x in (requests.sent_s, requests.first_token_s, requests.finish_s)
    )
    assert np.all(arrival <= sent) and np.all(sent <= first) and np.all(first <= finish)
    assert sorted(set(requests.replica)) == [0, 1, 2, 3]
    assert set(requests.tier) <= {DEVICE, HOST, DISK}
    if policy == "ray":
        assert np.any(sent > arrival)  # some were held at the router...
        assert _most_ongoing(requests.replica, sent, finish) <= 2  # ...so that none had more than 2


def _most_ongoing(replicas: list[int], sent: np.ndarray, finish: np.ndarray) -> int:
    most = 0
    for replica in set(replicas):
        mine = np.asarray(replicas) == replica
        # +1 at each send, -1 at each finish; finishes first at equal times (the slot is free then)
        events = sorted([(t, 1) for t in sent[mine]] + [(t, -1) for t in finish[mine]])
        most = max(most, int(np.max(np.cumsum([change for _, change in events]))))
    return most


def test_the_same_seed_gives_the_same_run_and_another_router_seed_another() -> None:
    wl = workload(adapters=50, popularity="zipf:1.2", rate=30.0, count=2000)
    shape = ReplicaShape(slots=4, host_adapters=10)
    for policy in POLICIES:
        first, again = (run(wl, 4, shape, policy) for _ in range(2))
        assert first.requests.first_token_s == again.requests.first_token_s, policy
        assert first.requests.replica == again.requests.replica, policy
    other = simulate(wl, FleetConfig(4, shape, PolicySpec("random"), seed=8), COSTS)
    assert other.requests.replica != run(wl, 4, shape).requests.replica


def test_the_workload_is_the_load_harness_plan() -> None:
    config = WorkloadConfig(
        adapters=names(20), token_ids=(0, 1), popularity="zipf:1.1", churn=2.0, arrival="gamma",
        rate=5.0, burstiness=0.5, num_requests=300, prompt_tokens="uniform:4-9", max_tokens="lognormal:8,0.5",
    )  # fmt: skip
    planned = plan(config)
    wl = workload_from(config)
    assert wl.arrival_s == tuple(p.at_s for p in planned)
    assert [wl.names[a] for a in wl.adapter] == [p.adapter for p in planned]
    assert wl.prompt_tokens == tuple(len(p.prompt_token_ids) for p in planned)
    assert wl.max_tokens == tuple(p.max_tokens for p in planned)


def test_ray_prefers_a_holder_until_it_is_full_then_spills_over() -> None:
    state = FleetState(4)
    router = RayRouter(state, random.Random(0), slots=2, max_ongoing=3)
    for replica, adapter in ((0, 7), (1, 8), (2, 8), (3, 9)):
        router.sent(replica, adapter)
    assert {router.route(7, 0.0) for _ in range(50)} == {0}
    state.ongoing[0] = 3  # at max_ongoing_requests: it refuses
    assert {router.route(7, 0.0) for _ in range(50)} <= {1, 2, 3}
    state.ongoing[:] = 3
    assert router.route(7, 0.0) is None  # held at the router
    router.pending.append((5, 7))
    state.ongoing[2] = 2
    assert router.take_pending(2) == (5, 7)
    router.sent(2, 10)
    router.sent(2, 11)  # the LRU of 2 models unloads 8
    assert router.holders[8] == {1}


def test_llm_d_scores_running_adapter_then_room_then_waiting() -> None:
    state = FleetState(3, keep_changes=True)
    state.add(RUNS, 5, 0)  # pod 0 runs adapter 5
    state.add(RUNS, 6, 1)  # pod 1 runs another: with max_lora 2 it has room
    state.add(RUNS, 6, 2)
    state.add(WAITS, 5, 2)  # pod 2 is full (2 adapters) but 5 waits there
    router = LlmdRouter(state, random.Random(0), (2, 4), PolicySpec("llm-d", scrape_s=0.0))
    assert router.route(5, 0.0) == 0  # 1.0 > 0.8 > 0.6
    state.remove(RUNS, 5, 0)
    state.add(RUNS, 6, 0)
    state.add(RUNS, 7, 0)  # pod 0 full now, without 5
    assert router.route(5, 1.0) == 1  # room (0.8) beats waiting (0.6)
    state.waiting[1] = 4  # pod 1's queue: its queue score drops from 1 to 0
    assert router.route(5, 2.0) == 2


def test_llm_d_resident_also_counts_an_idle_adapter_in_a_slot() -> None:
    def chosen(policy: str) -> set[int | None]:
        state = FleetState(2, keep_changes=True)
        state.add(RESIDENT, 5, 1)  # in pod 1's slot, no request on it
        spec = PolicySpec(policy, llmd_weights=(0, 0, 1), scrape_s=0.0)
        router = LlmdRouter(state, random.Random(0), (4, 4), spec)
        return {router.route(5, 0.0) for _ in range(30)}

    assert chosen("llm-d") == {0, 1}  # vLLM's metrics do not say what sits idle in a slot
    assert chosen("llm-d-resident") == {1}


def test_llm_d_sees_the_pods_as_last_scraped() -> None:
    state = FleetState(2, keep_changes=True)
    router = LlmdRouter(state, random.Random(0), (4, 4), PolicySpec("llm-d", llmd_weights=(0, 0, 1)))
    assert router.route(3, 0.0) in (0, 1)  # scraped at 0: nothing runs
    state.add(RUNS, 3, 1)
    assert {router.route(3, 0.01) for _ in range(30)} == {0, 1}  # still the copy of t=0
    assert router.route(3, 0.05) == 1  # the next scrape (50 ms) sees it


def test_costs_interpolate_between_measured_batches_and_adapters() -> None:
    costs = Costs((2, 4, 8), (0.02, 0.03, 0.05), (0.02, 0.05, 0.09), 0.0, 0.0, 0.0, 0.0, 1)
    assert costs.decode_s(4, 1) == pytest.approx(0.03)
    assert costs.decode_s(4, 4) == pytest.approx(0.05)
    assert costs.decode_s(6, 1) == pytest.approx(0.04)
    assert costs.decode_s(6, 6) == pytest.approx(0.07)
    assert costs.decode_s(6, 3) == pytest.approx(0.052)
    assert costs.decode_s(16, 1) == pytest.approx(0.09)  # the last segment, extended
    assert costs_from_json(json.loads(json.dumps(costs.to_json()))) == costs


def test_the_committed_costs_are_this_machines_measurements() -> None:
    costs = read_costs(COSTS_PATH)
    assert costs.about["command"] == "loramux bench cluster-sim --measure"
    assert all(later >= 0.5 * earlier for earlier, later in itertools.pairwise(costs.same_adapter_s))
    assert 0 < costs.host_to_device_s < costs.disk_to_host_s
    assert costs.distinct_adapters_s[-1] >= costs.same_adapter_s[-1]


def test_cli_sweeps_every_configuration_and_refuses_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    write_costs(COSTS, tmp_path / "costs.json")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [
        "--costs",
        str(tmp_path / "costs.json"),
        "--adapters",
        "100",
        "--replicas",
        "2,3",
        "--slots",
        "2,4",
    ]
    flags += ["--min-requests", "400", "--requests-per-replica", "10", "--json"]
    assert main(parser.parse_args(flags)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["slots"], r["replicas"], r["policy"]) for r in rows} == {
        (s, r, p) for s in (2, 4) for r in (2, 3) for p in POLICIES
    }
    assert all(
        math.isclose(r["rate_rps"] / r["replicas"], rows[0]["rate_rps"] / rows[0]["replicas"]) for r in rows
    )
    assert main(parser.parse_args([*flags, "--policies", "round-robin"])) == 2
    assert "round-robin" in capsys.readouterr().err
