"""`loramux bench cluster-sim`: a discrete-event simulation of a loramux fleet and its router.

    loramux bench cluster-sim                     # the table: 10,000 adapters, zipf:1.5
    loramux bench cluster-sim --replicas 4,16 --slots 8 --policies ray,llm-d --json
    loramux bench cluster-sim --measure           # re-time this machine into bench/cluster_costs.json

R replicas, each with S device slots (LRU), a host tier (LRU, --host-mb or --host-adapters) and
continuous batching as loramux runs it (bench/clustersim/replica.py), behind one of four routers
(bench/clustersim/routing.py: random, least-loaded, Ray Serve multiplexing, the llm-d endpoint
picker's LoRA-affinity score), fed by the load harness's planner (`bench.loadtest.workload`: the
same popularity, arrival and length specs and seed as `loramux bench load`). Step times and
cold-load costs are this machine's, measured on the real engine (bench/cluster_costs.json,
`--measure`). The offered rate scales with R: `--utilisation` (0.7) times what one replica
completes at a full batch of this workload, times R. Reported per (S, R, policy) after the first
`--warmup` of requests: slot hit rate, where the others found their adapter, cold loads/s, offered
and completed req/s, output tok/s, TTFT p50/p99 and the mean batch (the JSON also has the fraction of
replica-time spent stepping).

It is a model: no network, no KV-cache memory, no refusals, every request runs to its
max_tokens; see the modules' docstrings for what each part leaves out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.clustersim.costs import COSTS_PATH, Costs, read_costs, write_costs
from bench.clustersim.replica import ReplicaShape
from bench.clustersim.report import markdown_header, markdown_row, plot, sizing
from bench.clustersim.routing import EXTRA_POLICIES, POLICIES, PolicySpec
from bench.clustersim.sim import FleetConfig, Workload, replica_capacity_rps, simulate, workload_from
from bench.loadtest.workload import MAX_PLANNED_REQUESTS, WorkloadConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", default="4,16,64,256", help="replica counts R (default 4,16,64,256)")
    parser.add_argument("--slots", default="8,32", help="device slots per replica S (default 8,32)")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help=f"of {', '.join(POLICIES + EXTRA_POLICIES)}"
    )
    parser.add_argument("--adapters", type=int, default=10_000, help="adapters in the fleet (default 10,000)")
    parser.add_argument("--popularity", default="zipf:1.5", help="as `bench load` (default zipf:1.5)")
    parser.add_argument("--churn", type=float, default=0.0, help="as `bench load` (zipf/identical)")
    parser.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals (vLLM's)")
    parser.add_argument("--prompt-tokens", default="128", help="length spec, as `bench load` (default 128)")
    parser.add_argument("--max-tokens", default="128", help="length spec, as `bench load` (default 128)")
    parser.add_argument(
        "--utilisation", type=float, default=0.7, help="offered load per replica, of its full-batch rate"
    )
    parser.add_argument("--requests-per-replica", type=int, default=3900, help="requests planned per replica")
    parser.add_argument("--min-requests", type=int, default=60_000, help="at least this many per run")
    parser.add_argument("--warmup", type=float, default=0.7, help="fraction of requests not counted")
    parser.add_argument("--host-mb", type=int, default=1024, help="host tier per replica (serve's default)")
    parser.add_argument("--host-adapters", type=int, default=0, help="host tier in adapters (overrides MiB)")
    parser.add_argument("--max-running", type=int, default=32, help="as EngineConfig.max_running")
    parser.add_argument("--max-batched-tokens", type=int, default=512, help="as EngineConfig")
    parser.add_argument("--loader-threads", type=int, default=2, help="adapter loader threads per replica")
    parser.add_argument(
        "--ray-max-ongoing", type=int, default=0, help="Ray max_ongoing_requests (0: max-running)"
    )
    parser.add_argument("--llmd-weights", default="1,1,1", help="llm-d scorer weights queue,kv,lora")
    parser.add_argument(
        "--scrape-s", type=float, default=0.05, help="llm-d metrics refresh (EPP default 50 ms)"
    )
    parser.add_argument("--seed", type=int, default=0, help="workload and router seed")
    parser.add_argument(
        "--costs", default=str(COSTS_PATH), help="costs JSON (default bench/cluster_costs.json)"
    )
    parser.add_argument("--measure", action="store_true", help="time this machine's engine into --costs")
    parser.add_argument("--target-hit", type=float, default=0.9, help="slot hit rate for the sizing lines")
    parser.add_argument("--out", default="", help="directory for cluster_sim.json and cluster_sim.png")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: comma-separated integers, e.g. 4,16") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: give at least one integer >= 1")
    return values


def _policies(args: argparse.Namespace) -> list[PolicySpec]:
    try:
        weights = tuple(float(w) for w in args.llmd_weights.split(","))
    except ValueError:
        raise ValueError(f"--llmd-weights {args.llmd_weights!r}: three numbers queue,kv,lora") from None
    if len(weights) != 3:
        raise ValueError(f"--llmd-weights {args.llmd_weights!r}: three numbers queue,kv,lora")
    max_ongoing = args.ray_max_ongoing or args.max_running
    names = [name.strip() for name in args.policies.split(",") if name.strip()]
    return [
        PolicySpec(name, max_ongoing, (weights[0], weights[1], weights[2]), args.scrape_s) for name in names
    ]


def _workload_config(args: argparse.Namespace, rate: float, count: int) -> WorkloadConfig:
    return WorkloadConfig(
        adapters=tuple(f"adapter-{i:05d}" for i in range(args.adapters)),
        token_ids=(0, 1),
        popularity=args.popularity,
        churn=args.churn,
        arrival=args.arrival,
        rate=rate,
        burstiness=args.burstiness,
        num_requests=count,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )


def sweep(args: argparse.Namespace, costs: Costs) -> list[dict[str, Any]]:
    replica_counts = _ints(args.replicas, "--replicas")
    slot_counts = _ints(args.slots, "--slots")
    policies = _policies(args)
    if not 0 < args.utilisation <= 2:
        raise ValueError(f"--utilisation {args.utilisation}: a fraction of a replica's rate, in (0, 2]")
    host = args.host_adapters or max(1, args.host_mb * 2**20 // costs.adapter_host_bytes)
    shapes = {
        s: ReplicaShape(s, host, args.max_running, args.max_batched_tokens, args.loader_threads)
        for s in slot_counts
    }
    per_replica = args.utilisation * replica_capacity_rps(
        costs, shapes[slot_counts[0]], _workload_config(args, 1.0, 1)
    )
    rows = []
    workloads: dict[int, Workload] = {}  # one per R: every S and policy sees the same requests
    if not args.json:
        print(f"host tier: {host} adapters per replica; offered {per_replica:.3f} req/s per replica")
        print(markdown_header(), flush=True)
    for slots in slot_counts:
        for replicas in replica_counts:
            if replicas not in workloads:
                wanted = max(args.min_requests, args.requests_per_replica * replicas)
                count = min(wanted, MAX_PLANNED_REQUESTS)  # the planner's guard
                workloads[replicas] = workload_from(_workload_config(args, per_replica * replicas, count))
            for policy in policies:
                started = time.perf_counter()
                config = FleetConfig(replicas, shapes[slots], policy, seed=args.seed)
                result = simulate(workloads[replicas], config, costs)
                row = {"slots": slots, "replicas": replicas, "policy": policy.name}
                row |= {"rate_rps": per_replica * replicas, **asdict(result.summary(args.warmup))}
                row["sim_s"] = round(time.perf_counter() - started, 2)
                rows.append(row)
                print(json.dumps(row) if args.json else markdown_row(row), flush=True)
    return rows


def main(args: argparse.Namespace) -> int:
    costs_path = Path(args.costs)
    try:
        if args.measure:
            from bench.clustersim.measure import MeasureConfig, measure_costs

            costs = measure_costs(MeasureConfig())
            write_costs(costs, costs_path)
            print(f"wrote {costs_path}")
            return 0
        costs = read_costs(costs_path)
        rows = sweep(args, costs)
    except ValueError as error:
        print(f"loramux bench cluster-sim: error: {error}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"\nsizing at slot hit rate >= {args.target_hit:g} (of the configurations swept):")
        print("\n".join(sizing(rows, args.target_hit)))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        run = {key: value for key, value in vars(args).items() if key not in ("out", "json", "measure")}
        (out / "cluster_sim.json").write_text(json.dumps({"args": run, "rows": rows}, indent=1) + "\n")
        title = f"{args.adapters} adapters, {args.popularity}, {args.utilisation:g} of full-batch rate per replica"
        plot(rows, out / "cluster_sim.png", title)
        print(f"wrote {out / 'cluster_sim.json'} and {out / 'cluster_sim.png'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
