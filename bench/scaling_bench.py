"""`loramux bench scaling`: the scaling study, from 8 to 1,000 adapters, one command to rerun.

For each adapter count N (`--counts`, default 8,64,256,1000): write N random PEFT LoRA adapters
for the base model (`loramux bench make-adapters`, seeded), start `loramux serve` over them (a
subprocess on this machine, router off), and drive it with `loramux bench load` over HTTP:
zipf:1.5 popularity at one fixed rate (`--rate`), then a rate sweep for the highest rate meeting
`--objective`. The same is run over the repository's shipped demo adapters (`adapters/`).

Everything lands in `--out` (default build/scaling/): each run's JSON report, the sweep's, a
summary (`summary.json`, `table.md`: throughput drop and TTFT growth against the smallest count,
the highest rate meeting the objective, cold vs warm TTFT, fairness) and plots (`scaling.png`,
each run's plots). The bars of issue 13: throughput drop <= 10% and p50 TTFT growth <= 1.5x from
8 to 1,000 adapters.

`--repeats K` runs each count's fixed-rate run K times, going round the counts each time (each
run against a freshly started server), and the table takes the medians: on a shared machine a
slow minute then spreads over every count instead of deciding one.

The server and the load client share this machine's cores, as they would on a one-box deployment;
the report's `lateness` says when the client fell behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.served import ServerProcess, free_port, loramux_command, machine, median, run_load

REPO = Path(__file__).resolve().parent.parent
DEMO = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counts", default="8,64,256,1000", help="adapter counts (default: %(default)s)")
    parser.add_argument(
        "--demo", action=argparse.BooleanOptionalAction, default=True, help="also run over adapters/"
    )
    parser.add_argument(
        "--rate", type=float, default=1.0, help="the fixed rate, requests/s (default: %(default)s)"
    )
    parser.add_argument("--num-requests", type=int, default=150, help="requests per fixed-rate run")
    parser.add_argument("--sweep-requests", type=int, default=60, help="requests per sweep point")
    parser.add_argument("--objective", default="ttft_p99=2,tpot_mean=0.2", help="the sweep's objective")
    parser.add_argument("--sweep-start", type=float, default=0.5)
    parser.add_argument("--sweep-steps", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true", help="fixed-rate runs only")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fixed-rate runs per count, interleaved; the table takes medians",
    )
    parser.add_argument("--popularity", default="zipf:1.5")
    parser.add_argument("--prompt-tokens", default="64")
    parser.add_argument("--max-tokens", default="32")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-args", default="", help="extra `loramux serve` flags, e.g. '--max-slots 16'"
    )
    parser.add_argument("--out", default="build/scaling", help="results directory (default: %(default)s)")
    parser.add_argument("--model", help="base model directory (default: the embedded SmolLM2-135M-Instruct)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    roots: dict[str, tuple[Path, str | None]] = {}
    for count in counts:
        root = out / f"adapters-{count}"
        if not (root / ".complete").exists():
            _make_adapters(args, count, root)
        roots[str(count)] = (root, _names(root))
    if args.demo:
        roots[DEMO] = (REPO / "adapters", None)
    # Repeats go round the counts (8, 64, ..., 8, 64, ...): a neighbour that slows the machine for a
    # while spreads over every count instead of landing on one of them.
    runs: dict[str, dict[str, Any]] = {name: {"fixed": [], "sweep": None} for name in roots}
    for repeat in range(args.repeats):
        for name, (root, adapters) in roots.items():
            fixed, sweep = _study_one(args, root, out / f"n{name}", adapters, repeat)
            runs[name]["fixed"].append(fixed)
            runs[name]["sweep"] = runs[name]["sweep"] or sweep
    summary = _summary(args, runs, counts)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(_table(summary) + "\n")
    from bench.loadtest import plots

    by_count = {count: runs[str(count)]["fixed"][0] for count in counts}
    plots.plot_scaling(by_count, out / "scaling.png")
    print(_table(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'scaling.png'}")
    return 0


def _make_adapters(args: argparse.Namespace, count: int, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    command = [
        *loramux_command(),
        "bench",
        "make-adapters",
        "--count",
        str(count),
        "--rank",
        str(args.rank),
        "--targets",
        args.targets,
        "--out",
        str(root),
        "--seed",
        str(args.seed),
    ]
    if args.model:
        command += ["--model", args.model]
    subprocess.run(command, check=True)
    (root / ".complete").touch()


def _names(root: Path) -> str:
    return ",".join(sorted(p.name for p in root.iterdir() if p.is_dir()))


def _server(args: argparse.Namespace, root: Path, log: Path) -> ServerProcess:
    """`loramux serve` over one adapter root, router off."""
    http_port = free_port()
    command = [
        *loramux_command(),
        "serve",
        "--adapter-root",
        str(root),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(free_port()),
        "--host",
        "127.0.0.1",
        "--no-router",
        *args.server_args.split(),
    ]
    if args.model:
        command += ["--model", args.model]
    return ServerProcess(command, http_port, log)


def _study_one(
    args: argparse.Namespace, root: Path, out: Path, adapters: str | None, repeat: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One fixed-rate run (and, in the first repeat, the sweep) against a fresh server over `root`."""
    out.mkdir(parents=True, exist_ok=True)
    server = _server(args, root, out / "server.log")
    try:
        common = [
            "--target",
            server.url,
            "--popularity",
            args.popularity,
            "--prompt-tokens",
            args.prompt_tokens,
            "--max-tokens",
            args.max_tokens,
            "--seed",
            str(args.seed),
            "--no-progress",
        ]
        if adapters is not None:
            common += ["--adapters", adapters]
        fixed = run_load(
            [
                *common,
                "--rate",
                str(args.rate),
                "--num-requests",
                str(args.num_requests),
                "--objective",
                args.objective,
                "--canary-every",
                "10",
                "--plots",
                str(out / "plots"),
            ],
            out / f"fixed-{repeat}.json",
        )
        sweep = None
        if not args.no_sweep and repeat == 0:
            sweep = run_load(
                [
                    *common,
                    "--num-requests",
                    str(args.sweep_requests),
                    "--objective",
                    args.objective,
                    "--sweep",
                    "auto",
                    "--sweep-start",
                    str(args.sweep_start),
                    "--sweep-steps",
                    str(args.sweep_steps),
                    "--canary-adapters",
                    "0",
                    "--plots",
                    str(out / "plots"),
                ],
                out / "sweep.json",
            )
        return fixed, sweep
    finally:
        server.close()


def _summary(args: argparse.Namespace, runs: dict[str, dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    rows = []
    for name, run in runs.items():
        fixed = run["fixed"]
        sweep = run["sweep"]
        first = fixed[0]
        row = {
            "adapters": name,
            "repeats": len(fixed),
            "tokens_per_s": median([f["throughput"]["output_tokens_per_s"] for f in fixed]),
            "tokens_per_s_each": [f["throughput"]["output_tokens_per_s"] for f in fixed],
            "ttft_p50": median([f["ttft"]["p50"] for f in fixed]),
            "ttft_p50_each": [f["ttft"]["p50"] for f in fixed],
            "ttft_p99": median([f["ttft"]["p99"] for f in fixed]),
            "tpot_mean": median([f["tpot"]["mean"] for f in fixed]),
            "errors": sum(sum(f["errors"].values()) for f in fixed),
            "canary_mismatches": sum(len(f["canaries"]["mismatches"]) for f in fixed),
            "jain": median([f["fairness"]["jain_speed"] for f in fixed]),
            "ttft_p50_by_tier": {tier: row["ttft"]["p50"] for tier, row in first["by_tier"].items()},
            "requests_by_tier": {tier: row["requests"] for tier, row in first["by_tier"].items()},
            "best_rate": sweep["best_rate"] if sweep else None,
            "lateness_p99": median([f["lateness"]["p99"] for f in fixed]),
        }
        rows.append(row)
    base = rows[0] if counts else None
    for row in rows:
        if base is not None and row["adapters"] != DEMO:
            row["throughput_vs_first"] = (row["tokens_per_s"] or 0) / (base["tokens_per_s"] or 1)
            row["ttft_p50_vs_first"] = (row["ttft_p50"] or 0) / (base["ttft_p50"] or 1)
            if row["best_rate"] is not None and base["best_rate"]:
                row["best_rate_vs_first"] = row["best_rate"] / base["best_rate"]
    return {
        "machine": machine(),
        "command": "loramux bench scaling " + " ".join(sys.argv[3:]),
        "rate": args.rate,
        "objective": args.objective,
        "rows": rows,
    }


def _fmt(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _table(summary: dict[str, Any]) -> str:
    lines = [
        "| adapters | output tok/s | vs first | TTFT p50 ms | vs first | TTFT p99 ms | TPOT ms | TTFT p50 device / host / disk ms | "
        "Jain | best rate (req/s) | vs first | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        tiers = row["ttft_p50_by_tier"]
        lines.append(
            f"| {row['adapters']} | {_fmt(row['tokens_per_s'], digits=1)} | {_fmt(row.get('throughput_vs_first'), digits=3)} "
            f"| {_fmt(row['ttft_p50'], 1000)} | {_fmt(row.get('ttft_p50_vs_first'), digits=2)} | {_fmt(row['ttft_p99'], 1000)} "
            f"| {_fmt(row['tpot_mean'], 1000)} | {_fmt(tiers.get('device'), 1000)} / {_fmt(tiers.get('host'), 1000)} / {_fmt(tiers.get('disk'), 1000)} "
            f"| {_fmt(row['jain'], digits=3)} | {_fmt(row['best_rate'], digits=2)} "
            f"| {_fmt(row.get('best_rate_vs_first'), digits=2)} | {row['errors'] or 0} |"
        )
    return "\n".join(lines)
