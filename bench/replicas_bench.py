"""`loramux bench replicas`: one `loramux serve` against loramux on Ray Serve with 1 and 2 replicas.

Each setup (`--setups`, default serve,ray-1,ray-2) is started fresh on this machine over the same
adapter root (default: the shipped demo adapters) and driven by `loramux bench load` over HTTP with
the same seeded workload (zipf popularity, Poisson arrivals at `--rate`): throughput, TTFT, TPOT,
and behind Ray the requests per replica and the adapter affinity (the share of an adapter's
requests, after its first, answered by a replica that had answered for it before; every answer
names its replica in `x-loramux-replica`). `--repeats K` goes round the setups K times and the
table takes medians. Results: `--out` (each run's JSON report, summary.json, table.md).

On one machine replicas share its cores, so a second replica adds no compute: this measures what
Ray Serve's routing and the extra hop cost, and whether affinity holds, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.served import ServerProcess, free_port, loramux_command, machine, median, run_load

REPO = Path(__file__).resolve().parent.parent
SETUPS = ("serve", "ray-1", "ray-2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help="serve and/or ray-N (default: %(default)s)"
    )
    parser.add_argument("--adapter-root", default=str(REPO / "adapters"), help="default: adapters/")
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=80)
    parser.add_argument("--popularity", default="zipf:1.5")
    parser.add_argument("--prompt-tokens", default="64")
    parser.add_argument("--max-tokens", default="32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the setups; medians")
    parser.add_argument("--server-args", default="", help="extra flags for every setup, e.g. '--max-slots 8'")
    parser.add_argument("--out", default="build/replicas", help="results directory (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for setup in setups:
        if setup != "serve" and not (setup.startswith("ray-") and setup[4:].isdigit()):
            print(f"error: unknown setup {setup!r}: serve or ray-N", file=sys.stderr)
            return 2
    if any(s.startswith("ray-") for s in setups):
        try:
            import ray  # noqa: F401
        except ImportError:
            print("error: the ray setups need the `ray` extra (make serve-ray installs it)", file=sys.stderr)
            return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.adapter_root)
    adapters = ",".join(sorted(p.name for p in root.iterdir() if p.is_dir()))
    runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in setups}
    for repeat in range(args.repeats):
        for setup in setups:  # round-robin: a slow minute on a shared machine spreads over setups
            runs[setup].append(_run_one(args, setup, root, adapters, out / f"{setup}-{repeat}"))
    summary = _summary(args, runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(_table(summary) + "\n")
    print(_table(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}")
    return 0


def _command(args: argparse.Namespace, setup: str, root: Path, http_port: int) -> list[str]:
    common = ["--adapter-root", str(root), "--host", "127.0.0.1", "--http-port", str(http_port)]
    common += ["--no-router", *args.server_args.split()]
    if setup == "serve":
        return [*loramux_command(), "serve", *common, "--grpc-port", str(free_port())]
    return [*loramux_command(), "ray", *common, "--replicas", setup[4:]]


def _run_one(args: argparse.Namespace, setup: str, root: Path, adapters: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    server = ServerProcess(
        _command(args, setup, root, http_port), http_port, out / "server.log", "/v1/models", timeout_s=600
    )
    try:
        argv = ["--target", server.url, "--adapters", adapters, "--popularity", args.popularity]
        argv += ["--rate", str(args.rate), "--num-requests", str(args.num_requests)]
        argv += ["--prompt-tokens", args.prompt_tokens, "--max-tokens", args.max_tokens]
        argv += ["--seed", str(args.seed), "--no-progress", "--canary-every", "10"]
        if setup != "serve":
            argv.append("--no-metrics")  # Ray's ingress has no /metrics (each replica has its own)
        return run_load(argv, out / "report.json")
    finally:
        server.close()


def _summary(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    for setup, reports in runs.items():

        def pick(path: tuple[str, ...], reports: list[dict[str, Any]] = reports) -> float | None:
            values = []
            for report in reports:
                value: Any = report
                for key in path:
                    value = value.get(key) if isinstance(value, dict) else None
                values.append(value)
            return median(values)

        last = reports[-1]
        replicas = last.get("replicas") or {}
        rows.append(
            {
                "setup": setup,
                "runs": len(reports),
                "output_tokens_per_s": pick(("throughput", "output_tokens_per_s")),
                "ttft_p50_s": pick(("ttft", "p50")),
                "ttft_p99_s": pick(("ttft", "p99")),
                "tpot_mean_s": pick(("tpot", "mean")),
                "e2e_p50_s": pick(("e2e", "p50")),
                "affinity": pick(("replicas", "affinity")),
                "requests_per_replica": sorted((replicas.get("requests") or {}).values(), reverse=True),
                "errors": sum(sum(r["errors"].values()) for r in reports),
                "canary_mismatches": sum(len(r["canaries"]["mismatches"]) for r in reports),
            }
        )
    return {
        "machine": machine(),
        "command": "loramux bench replicas " + " ".join(sys.argv[3:]),
        "rate": args.rate,
        "num_requests": args.num_requests,
        "popularity": args.popularity,
        "rows": rows,
    }


def _fmt(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _table(summary: dict[str, Any]) -> str:
    lines = [
        "| setup | runs | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT ms | e2e p50 s | requests per replica"
        " | affinity | errors | canary mismatches |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        per_replica = "/".join(str(n) for n in row["requests_per_replica"]) or "-"
        lines.append(
            f"| {row['setup']} | {row['runs']} | {_fmt(row['output_tokens_per_s'], digits=1)} "
            f"| {_fmt(row['ttft_p50_s'], 1000)} | {_fmt(row['ttft_p99_s'], 1000)} "
            f"| {_fmt(row['tpot_mean_s'], 1000)} | {_fmt(row['e2e_p50_s'], digits=2)} | {per_replica} "
            f"| {_fmt(row['affinity'], digits=3)} | {row['errors']} | {row['canary_mismatches']} |"
        )
    return "\n".join(lines)
