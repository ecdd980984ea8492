"""`loramux bench load`: a load test of a running server, adapter-aware, open-loop.

A client of any loramux server (gRPC, `HOST:PORT`) or OpenAI-compatible HTTP endpoint
(`http://HOST:PORT`: loramux's shim, vLLM, SGLang, ...). It plans a reproducible workload from a
seed (which adapters, when, how long: bench/loadtest/workload.py), records each adapter's greedy
answer to a canary prompt, sends the plan while scraping the server's /metrics, mixes canary
requests into the load and checks their answers, and reports TTFT, TPOT, inter-token and
end-to-end latency (mean, p50, p90, p99), throughput, goodput under an objective, errors by kind,
per-adapter latencies and fairness, and latency by the tier the adapter was in on arrival
(cold vs warm). `--sweep` finds the highest rate that meets the objective.

    loramux bench load --target http://127.0.0.1:8000 --adapters a,b,c --popularity zipf:1.5 \\
        --rate 2 --num-requests 200 --prompt-tokens 128 --max-tokens 64 --seed 0 \\
        --json run.json --plots plots/
    loramux bench load --target 127.0.0.1:50051 --concurrency 8 --num-requests 100
    loramux bench load ... --objective ttft_p99=2,tpot_mean=0.2 --sweep auto --json sweep.json
    loramux bench load --compare a.json b.json --plots cmp/

Latencies count from each request's planned send time, so a client that falls behind shows it
(lateness is reported too). Load requests sample at the API's default temperature 1.0 and run to
their max tokens (`ignore_eos`), as `vllm bench serve` does; canaries decode greedily.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.loadtest import canary, workload
from bench.loadtest.clients import Client, RunClock, Sampling, make_client
from bench.loadtest.records import RequestRecord
from bench.loadtest.report import Objective, build_report
from bench.loadtest.runner import RunOptions, run_plan
from bench.loadtest.sweep import sweep

BASE_ALIAS = "@base"  # in --adapters: the base model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    target = parser.add_argument_group("server")
    target.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="HOST:PORT of a loramux gRPC server, or http://HOST:PORT of an OpenAI-compatible one "
        "(default: %(default)s)",
    )
    target.add_argument(
        "--metrics-url",
        help="the server's Prometheus endpoint, scraped during the run (default: TARGET/metrics for "
        "an http target; none for gRPC: `loramux serve` exposes it at http://HOST:8000/metrics)",
    )
    target.add_argument("--no-metrics", action="store_true", help="do not scrape the server's metrics")
    target.add_argument(
        "--scrape-interval", type=float, default=1.0, metavar="S", help="seconds between scrapes"
    )
    target.add_argument("--api-key", default=os.environ.get("LORAMUX_API_KEY"), help="(env LORAMUX_API_KEY)")
    target.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request timeout")

    load = parser.add_argument_group("workload")
    load.add_argument(
        "--adapters",
        help=f"comma-separated adapter names ({BASE_ALIAS} = the base model); default: every adapter the server lists",
    )
    load.add_argument(
        "--popularity",
        default="uniform",
        help="distinct | uniform | zipf:ALPHA | identical (default: %(default)s)",
    )
    load.add_argument(
        "--churn",
        type=float,
        default=0.0,
        help="zipf/identical: share of the ranking that turns over per 100 requests",
    )
    arrivals = load.add_mutually_exclusive_group()
    arrivals.add_argument(
        "--rate", type=float, help="open loop: requests per second (Poisson, or Gamma with --burstiness)"
    )
    arrivals.add_argument(
        "--concurrency", type=int, help="closed loop: this many clients, each one request at a time"
    )
    arrivals.add_argument(
        "--trace",
        metavar="FILE.jsonl",
        help="replay: {timestamp, adapter, prompt_tokens, output_tokens} lines",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Gamma arrivals, vLLM's convention: 1 = Poisson, < 1 burstier, > 1 more regular",
    )
    load.add_argument("--num-requests", type=int, default=200, help="requests to send (default: %(default)s)")
    load.add_argument("--duration", type=float, metavar="S", help="send nothing after this many seconds")
    load.add_argument(
        "--prompt-tokens", default="128", help="N | uniform:LO-HI | normal:MEAN,STD | lognormal:MEDIAN,SIGMA"
    )
    load.add_argument("--max-tokens", default="64", help="as --prompt-tokens (default: %(default)s)")
    load.add_argument(
        "--token-ids",
        default="1000-10000",
        help="prompt token ids are drawn from LOW-HIGH (default: %(default)s)",
    )
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--temperature", type=float, default=1.0, help="load requests' temperature (default: the APIs' 1.0)"
    )
    load.add_argument(
        "--no-ignore-eos", action="store_true", help="let answers stop at EOS (default: run to max tokens)"
    )
    load.add_argument(
        "--max-in-flight", type=int, default=4096, help="stop sending (saturated) past this many unanswered"
    )

    checks = parser.add_argument_group("canaries and objective")
    checks.add_argument(
        "--canary-adapters",
        type=int,
        default=8,
        help="adapters given a canary (0: none; default %(default)s)",
    )
    checks.add_argument(
        "--canary-every", type=int, default=20, help="a canary beside every N-th load request"
    )
    checks.add_argument("--canary-tokens", type=int, default=16, help="tokens each canary generates")
    checks.add_argument("--canary-save", metavar="PATH", help="write the recorded canary answers here")
    checks.add_argument(
        "--canary-load",
        metavar="PATH",
        help="check canaries against answers saved earlier (--canary-save) instead of recording them now",
    )
    checks.add_argument(
        "--objective", default="", help="ttft_p99=SECONDS,tpot_mean=SECONDS: goodput, and the sweep's test"
    )
    checks.add_argument(
        "--sweep",
        metavar="auto|R1,R2,...",
        help="find the highest rate meeting --objective: the given rates in order, or doubling from "
        "--sweep-start then bisecting (auto); stops early once the server is over-saturated",
    )
    checks.add_argument("--sweep-start", type=float, default=1.0, help="auto sweep's first rate")
    checks.add_argument("--sweep-steps", type=int, default=3, help="auto sweep's bisection steps")

    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the report (or the sweep) as JSON")
    out.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    out.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="plot two earlier reports side by side"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            return _compare(args)
        objective = Objective.parse(args.objective)
        if args.sweep and objective.empty:
            raise ValueError("--sweep needs --objective (e.g. ttft_p99=2,tpot_mean=0.2)")
        return asyncio.run(_run(args, objective))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, objective: Objective) -> int:
    clock = RunClock()
    sampling = Sampling(temperature=args.temperature, ignore_eos=not args.no_ignore_eos)
    client = make_client(args.target, sampling, clock, args.api_key, args.timeout)
    try:
        adapters = await _adapters(client, args)
        bench = _LoadRun(args, client, clock, adapters, objective)
        if args.sweep:
            rates = (
                None
                if args.sweep == "auto"
                else [_positive(r, "--sweep rate") for r in args.sweep.split(",")]
            )
            result = await sweep(bench.run_at, objective, rates, args.sweep_start, args.sweep_steps)
            result["config"] = bench.config(None)
            _print_sweep(result)
            exit_code = 0 if result["best_rate"] is not None else 1
        else:
            result = await bench.run_at(args.rate)
            _print_report(result)
            exit_code = 0 if not result["errors"] else 1
    finally:
        await client.close()
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    if args.plots:
        from bench.loadtest import plots

        written = (
            plots.plot_sweep(result, Path(args.plots) / "sweep.png")
            if args.sweep
            else plots.plot_report(result, Path(args.plots))
        )
        for item in written if isinstance(written, list) else [written]:
            print(f"wrote {item}")
    return exit_code


class _LoadRun:
    """One workload against one server, run at any rate; canaries recorded once, before the first run."""

    def __init__(
        self,
        args: argparse.Namespace,
        client: Client,
        clock: RunClock,
        adapters: list[str],
        objective: Objective,
    ) -> None:
        self.args = args
        self.client = client
        self.clock = clock
        self.adapters = adapters
        self.objective = objective
        self.expected: dict[str, canary.Expected] | None = None
        self.canary_failures: list[RequestRecord] = []

    def workload(self, rate: float | None) -> workload.WorkloadConfig:
        args = self.args
        arrival = workload.TRACE if args.trace else workload.CLOSED if args.concurrency else workload.POISSON
        if arrival == workload.POISSON and args.burstiness != 1.0:
            arrival = workload.GAMMA
        return workload.WorkloadConfig(
            adapters=tuple(self.adapters),
            token_ids=_id_range(args.token_ids),
            popularity=args.popularity,
            churn=args.churn,
            arrival=arrival,
            rate=rate if arrival in (workload.POISSON, workload.GAMMA) else None,
            burstiness=args.burstiness,
            trace_path=args.trace,
            num_requests=args.num_requests,
            duration_s=args.duration if arrival != workload.CLOSED else None,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )

    def config(self, rate: float | None) -> dict[str, Any]:
        args = self.args
        return {
            "target": args.target,
            "protocol": "http" if args.target.startswith(("http://", "https://")) else "grpc",
            "adapters": len(self.adapters),
            "popularity": args.popularity,
            "churn": args.churn,
            "rate": rate,
            "concurrency": args.concurrency,
            "burstiness": args.burstiness,
            "trace": args.trace,
            "num_requests": args.num_requests,
            "duration_s": args.duration,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "ignore_eos": not args.no_ignore_eos,
            "seed": args.seed,
            "objective": args.objective,
            "client_host": platform.node(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    async def run_at(self, rate: float | None) -> dict[str, Any]:
        args = self.args
        if rate is None and not (args.concurrency or args.trace):
            raise ValueError("give --rate R, --concurrency C or --trace FILE")
        plan = workload.plan(self.workload(rate))
        if self.expected is None:
            self.expected = await self._canaries(plan)
        plan = canary.mix_in(plan, self.expected, args.canary_every, args.canary_tokens)
        before = await self._totals()
        label = f"{rate:g} req/s" if rate else "load"
        options = RunOptions(
            concurrency=args.concurrency,
            duration_s=args.duration,
            max_in_flight=args.max_in_flight,
            progress=not args.no_progress,
            label=label,
        )
        result = await run_plan(self.client, plan, options, self.clock, self._scraper())
        canary.check(result.records, self.expected)
        after = await self._totals(settle=True)
        report = build_report(
            result.records + self.canary_failures,
            self.config(rate),
            self.objective,
            result.server_metrics,
            result.saturated,
        )
        report["not_sent"] = result.not_sent
        report["canaries"]["recorded"] = sorted(self.expected)
        if before is not None and after is not None:
            from bench.loadtest.scrape import deltas

            report["server_counted"] = deltas(before, after)
        self.canary_failures = []  # counted once
        return report

    async def _canaries(self, plan: list[Any]) -> dict[str, canary.Expected]:
        args = self.args
        if args.canary_load:
            expected, args.canary_tokens = canary.load(Path(args.canary_load))
            return {name: answer for name, answer in expected.items() if name in set(self.adapters)}
        picked = canary.pick_adapters(plan, args.canary_adapters)
        expected, self.canary_failures = await canary.record_expected(self.client, picked, args.canary_tokens)
        if args.canary_save:
            canary.save(expected, args.canary_tokens, Path(args.canary_save))
        return expected

    def _metrics_url(self) -> str | None:
        args = self.args
        if args.no_metrics:
            return None
        if args.metrics_url:
            return args.metrics_url
        if args.target.startswith(("http://", "https://")):
            return args.target.rstrip("/") + "/metrics"
        return None

    def _scraper(self) -> Callable[[float], Any] | None:
        url = self._metrics_url()
        if url is None:
            return None
        from bench.loadtest.scrape import ScrapeConfig, Scraper

        config = ScrapeConfig(url, self.args.scrape_interval)
        return lambda start_s: Scraper(config, start_s)

    async def _totals(self, settle: bool = False) -> dict[str, float] | None:
        """The server's counters now (None without a metrics URL or when it cannot be read).
        `settle`: after a run, until two reads agree (a server counts a request just after its
        last token went out)."""
        url = self._metrics_url()
        if url is None:
            return None
        from bench.loadtest.scrape import ScrapeError, scrape_once

        try:
            sample = await scrape_once(url)
            for _ in range(20 if settle else 0):
                await asyncio.sleep(0.1)
                again = await scrape_once(url)
                if again == sample:
                    break
                sample = again
        except ScrapeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            return None
        return sample


async def _adapters(client: Client, args: argparse.Namespace) -> list[str]:
    if args.adapters:
        names = [name.strip() for name in args.adapters.split(",") if name.strip()]
        return ["" if name == BASE_ALIAS else name for name in names]
    if args.trace:
        return []
    try:
        listed = await client.adapters()
    except Exception as exc:  # grpc's AioRpcError, httpx's errors: the server could not be asked
        raise ValueError(
            f"could not list the adapters of {args.target} ({type(exc).__name__}: {_first_line(exc)}); "
            "is the server running there? Or pass --adapters"
        ) from None
    if not listed:
        raise ValueError("the server lists no adapters: pass --adapters (@base for the base model)")
    return listed


def _first_line(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return (text or repr(exc)).splitlines()[0][:200]


def _id_range(spec: str) -> tuple[int, int]:
    low, sep, high = spec.partition("-")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"--token-ids {spec!r}: expected LOW-HIGH, e.g. 1000-10000") from None


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{what} {text!r} must be > 0")
    return value


def _compare(args: argparse.Namespace) -> int:
    from bench.loadtest import plots

    reports = [json.loads(Path(p).read_text()) for p in args.compare]
    for path, report in zip(args.compare, reports, strict=True):
        print(f"== {path}")
        _print_report(report)
    if args.plots:
        out = Path(args.plots) / "compare.png"
        plots.plot_compare(reports[0], reports[1], [Path(p).stem for p in args.compare], out)
        print(f"wrote {out}")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _print_report(report: dict[str, Any]) -> None:
    rate = report["config"].get("rate")
    print(
        f"requests {report['requests']}  completed {report['completed']}  errors {report['errors'] or 'none'}"
        + (f"  not sent {report.get('not_sent')}" if report.get("not_sent") else "")
        + ("  SATURATED" if report.get("saturated") else "")
    )
    shown: set[str] = set()
    for sample in report.get("error_samples", ()):  # the first of each kind, to say what it was
        if sample["kind"] not in shown:
            shown.add(sample["kind"])
            print(
                f"  {sample['kind']}: request {sample['index']} ({sample['adapter'] or 'base'}): {sample['detail']}"
            )
    through = report["throughput"]
    print(
        f"duration {report['duration_s']:.1f} s  offered {rate if rate else '-'} req/s  "
        f"answered {through['requests_per_s']:.2f} req/s  {through['output_tokens_per_s']:.1f} output tok/s"
    )
    print(f"{'ms':>10} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name in ("ttft", "tpot", "itl", "e2e", "lateness"):
        row = report[name]
        print(f"{name:>10} " + " ".join(f"{_ms(row[k]):>9}" for k in ("mean", "p50", "p90", "p99")))
    goodput = report["goodput"]
    if report.get("meets_objective") is not None:
        print(
            f"objective {report['config'].get('objective')}: {'met' if report['meets_objective'] else 'NOT met'}; "
            f"goodput {goodput['requests_per_s']:.2f} req/s ({(goodput['fraction'] or 0) * 100:.0f}% of requests)"
        )
    fairness = report["fairness"]
    jain = fairness["jain_speed"]
    spread = fairness["ttft_p99"]
    print(
        f"adapters {fairness['adapters']}  Jain's index (per-request speed) {'-' if jain is None else f'{jain:.3f}'}  "
        f"p99 TTFT across adapters {_ms(spread['min'])}-{_ms(spread['max'])} ms"
    )
    for tier, row in report["by_tier"].items():
        print(
            f"  {tier:>7}: {row['requests']:5d} requests  TTFT p50 {_ms(row['ttft']['p50'])} ms  p99 {_ms(row['ttft']['p99'])} ms"
        )
    canaries = report["canaries"]
    if canaries["sent"]:
        bad = canaries["mismatches"]
        print(
            f"canaries: {canaries['checked']} checked over {canaries['adapters']} adapters, {len(bad)} mismatched"
        )
        for mismatch in bad[:5]:
            print(f"  MISMATCH {mismatch['adapter']}: {mismatch['detail']}")
    counted = report.get("server_counted")
    if counted:
        print("server counted: " + ", ".join(f"{k} {v:g}" for k, v in sorted(counted.items())))


def _print_sweep(result: dict[str, Any]) -> None:
    for point in result["points"]:
        report = point["report"]
        print(
            f"rate {point['rate']:8.3f} req/s: {'meets' if point['meets_objective'] else 'fails'}  "
            f"TTFT p99 {_ms(report['ttft']['p99'])} ms  TPOT mean {_ms(report['tpot']['mean'])} ms  "
            f"{report['throughput']['output_tokens_per_s']:.1f} tok/s"
            + ("  over-saturated" if point["over_saturated"] else "")
        )
    best = result["best_rate"]
    print(f"highest rate meeting the objective: {'none' if best is None else f'{best:g} req/s'}")
