"""RequestRecords of one run (and the server's scraped metrics) -> the JSON report.

The report, as `loramux bench load --json PATH` writes it (all times in seconds):

    config          the run's options (target, protocol, workload, seed, objective)
    duration_s      first planned send -> last answer
    saturated       the client stopped sending: too many requests unanswered (runner.RunOptions)
    requests        load requests sent (canaries are counted apart, under `canaries`)
    completed       of those, answered in full
    errors          {kind: count} (records.ERR_*), canary mismatches included
    error_samples   up to MAX_ERROR_SAMPLES per kind: [{kind, index, adapter, detail}] (what the
                    client or the server said), so a rare error can be diagnosed from the report
    prompt_tokens, output_tokens                       totals over completed requests
    ttft, tpot, itl, e2e, lateness                     {count, mean, p50, p90, p99, max}
    quantiles       {ttft | tpot | itl | e2e: [[q, seconds], ...]} at q = 0..100, 99.5, 99.9 (the CDFs)
    throughput      {requests_per_s, output_tokens_per_s, total_tokens_per_s}
    goodput         {objective, requests_per_s, fraction}: completed requests that met the objective
                    per request (TTFT and TPOT each within their bounds), as DistServe counts goodput
    meets_objective whether the run as a whole met it (p99 TTFT and mean TPOT within the bounds)
    per_adapter     {adapter: {requests, completed, errors, output_tokens, output_tokens_per_s,
                     speed_tokens_per_s (mean output tokens / e2e of its requests), ttft, tpot, e2e}}  ("" is the base model, named `<base>`)
    fairness        {jain_throughput: Jain's index over per-adapter output tokens/s (1 = equal; under
                     skewed popularity it shows the skew, not unfairness),
                     jain_speed: Jain's index over each adapter's mean per-request speed (output
                     tokens / e2e): whether every adapter's users see the same service,
                     ttft_p99: {min, max, ratio} over adapters with >= MIN_FAIRNESS_REQUESTS}
    by_tier         {device | host | disk | unknown: {requests, ttft, e2e}}: each request by the
                    tier its adapter was in when it arrived (from the server's answer)
    replicas        behind several replicas (answers named theirs): {requests: {replica: count},
                     affinity: the share of an adapter's requests after its first that went to a
                     replica that had already answered for it, affinity_requests: how many counted}
    canaries        {adapters, sent, checked, mismatches: [{adapter, index, expected, got}]}
    server_metrics  {t_s: [...], series: {name: [...]}} scraped during the run (scrape.py)

Everything here is pure arithmetic on records: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, cast

from bench.loadtest.records import CANARY, ERR_CANARY, LOAD, RequestRecord, percentile, summarize

BASE_LABEL = "<base>"
TIERS = ("device", "host", "disk", "unknown")
MAX_ERROR_SAMPLES = 5  # per error kind, in the report's `error_samples`
# An adapter with fewer requests than this has no meaningful p99: left out of the TTFT spread.
MIN_FAIRNESS_REQUESTS = 5


@dataclass(frozen=True)
class Objective:
    """A service-level objective: p99 TTFT and mean TPOT bounds (None = no bound)."""

    ttft_p99_s: float | None = None
    tpot_mean_s: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Objective:
        """`ttft_p99=2.0,tpot_mean=0.1` (seconds; either part may be left out)."""
        bounds: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("ttft_p99", "tpot_mean"):
                raise ValueError(f"objective part {part!r}: expected ttft_p99=SECONDS or tpot_mean=SECONDS")
            try:
                bound = float(value)
            except ValueError:
                raise ValueError(f"objective part {part!r}: {value!r} is not a number of seconds") from None
            if not math.isfinite(bound) or bound <= 0:
                raise ValueError(f"objective part {part!r}: the bound must be a positive number of seconds")
            bounds[key.strip() + "_s"] = bound
        return cls(**bounds)

    @property
    def empty(self) -> bool:
        return self.ttft_p99_s is None and self.tpot_mean_s is None

    def met_by_request(self, record: RequestRecord) -> bool:
        """Goodput's per-request test: its TTFT and TPOT each within the bounds."""
        if not record.ok:
            return False
        ttft, tpot = record.ttft, record.tpot
        if self.ttft_p99_s is not None and (ttft is None or ttft > self.ttft_p99_s):
            return False
        return not (self.tpot_mean_s is not None and tpot is not None and tpot > self.tpot_mean_s)

    def met_by_run(self, report: dict[str, Any]) -> bool:
        """The run's test: every request answered, p99 TTFT and mean TPOT within the bounds."""
        if report.get("saturated") or report["completed"] < report["requests"] or report["completed"] == 0:
            return False
        ttft, tpot = report["ttft"]["p99"], report["tpot"]["mean"]
        if self.ttft_p99_s is not None and (ttft is None or ttft > self.ttft_p99_s):
            return False
        return not (self.tpot_mean_s is not None and tpot is not None and tpot > self.tpot_mean_s)


def jain_index(values: list[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one takes all."""
    if not values:
        return None
    squares = math.fsum(v * v for v in values)
    if squares == 0:
        return None
    return math.fsum(values) ** 2 / (len(values) * squares)


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _latencies(records: list[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    return {
        "ttft": summarize([t for r in ok if (t := r.ttft) is not None]),
        "tpot": summarize([t for r in ok if (t := r.tpot) is not None]),
        "e2e": summarize([t for r in ok if (t := r.e2e) is not None]),
    }


def build_report(
    records: list[RequestRecord],
    config: dict[str, Any],
    objective: Objective,
    server_metrics: dict[str, Any] | None = None,
    saturated: bool = False,
) -> dict[str, Any]:
    """The report of one run (see the module docstring)."""
    load = [r for r in records if r.kind == LOAD]
    canaries = [r for r in records if r.kind == CANARY]
    ok = [r for r in load if r.ok]
    ends = [r.end_s for r in records if r.end_s is not None]
    starts = [r.planned_s for r in records]
    duration = max(ends, default=0.0) - min(starts, default=0.0)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)

    errors = Counter(r.error for r in records if r.error is not None)
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if objective.met_by_request(r)]

    report: dict[str, Any] = {
        "config": config,
        "duration_s": duration,
        "saturated": saturated,
        "requests": len(load),
        "completed": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_samples": _error_samples(records),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        **_latencies(load),
        "itl": summarize([gap for r in ok for gap in r.itls]),
        "quantiles": _quantiles(ok),
        "lateness": summarize([r.lateness for r in load]),
        "throughput": {
            "requests_per_s": per_second(len(ok)),
            "output_tokens_per_s": per_second(output_tokens),
            "total_tokens_per_s": per_second(output_tokens + prompt_tokens),
        },
        "goodput": {
            "objective": asdict(objective),
            "requests_per_s": per_second(len(good)),
            "fraction": len(good) / len(load) if load else None,
        },
    }
    report["per_adapter"] = _per_adapter(load, per_second)
    report["fairness"] = _fairness(report["per_adapter"])
    report["by_tier"] = _by_tier(load)
    report["replicas"] = _replicas(load)
    report["canaries"] = _canaries(canaries)
    report["server_metrics"] = server_metrics or {"t_s": [], "series": {}}
    report["meets_objective"] = objective.met_by_run(report) if not objective.empty else None
    return report


QUANTILES = (*range(101), 99.5, 99.9)


def _quantiles(ok: list[RequestRecord]) -> dict[str, list[list[float]]]:
    """[[q, seconds], ...] for q in QUANTILES, per latency: the distributions' shape at any run size."""
    values = {
        "ttft": [t for r in ok if (t := r.ttft) is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2e": [t for r in ok if (t := r.e2e) is not None],
    }
    table = {}
    for name, series in values.items():
        ordered = sorted(series)
        table[name] = [[float(q), percentile(ordered, q)] for q in sorted(QUANTILES)] if ordered else []
    return table


def _per_adapter(load: list[RequestRecord], per_second: Any) -> dict[str, Any]:
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in load:
        groups[record.adapter or BASE_LABEL].append(record)
    table = {}
    for adapter, group in sorted(groups.items()):
        ok = [r for r in group if r.ok]
        tokens = sum(r.output_tokens for r in ok)
        table[adapter] = {
            "requests": len(group),
            "completed": len(ok),
            "errors": sum(r.error is not None for r in group),
            "output_tokens": tokens,
            "output_tokens_per_s": per_second(tokens),
            "speed_tokens_per_s": _mean([r.output_tokens / e2e for r in ok if (e2e := r.e2e)]),
            **_latencies(group),
        }
    return table


def _fairness(per_adapter: dict[str, Any]) -> dict[str, Any]:
    throughputs = [row["output_tokens_per_s"] for row in per_adapter.values()]
    p99s = [
        row["ttft"]["p99"]
        for row in per_adapter.values()
        if row["ttft"]["count"] >= MIN_FAIRNESS_REQUESTS and row["ttft"]["p99"] is not None
    ]
    spread = (
        {"min": min(p99s), "max": max(p99s), "ratio": max(p99s) / min(p99s) if min(p99s) > 0 else None}
        if p99s
        else {"min": None, "max": None, "ratio": None}
    )
    speeds = [
        row["speed_tokens_per_s"] for row in per_adapter.values() if row["speed_tokens_per_s"] is not None
    ]
    return {
        "jain_throughput": jain_index(throughputs),
        "jain_speed": jain_index(speeds),
        "ttft_p99": spread,
        "adapters": len(per_adapter),
    }


def _by_tier(load: list[RequestRecord]) -> dict[str, Any]:
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in load:
        if record.adapter:  # the base model has no tier
            groups[record.tier if record.tier in TIERS else "unknown"].append(record)
    table = {}
    for tier in TIERS:
        if tier in groups:
            latencies = _latencies(groups[tier])
            table[tier] = {"requests": len(groups[tier]), "ttft": latencies["ttft"], "e2e": latencies["e2e"]}
    return table


def _error_samples(records: list[RequestRecord]) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    taken: Counter[str] = Counter()
    for record in sorted(records, key=lambda r: r.index):
        if record.error is not None and taken[record.error] < MAX_ERROR_SAMPLES:
            taken[record.error] += 1
            samples.append(
                {
                    "kind": record.error,
                    "index": record.index,
                    "adapter": record.adapter,
                    "detail": record.error_detail,
                }
            )
    return samples


def _replicas(load: list[RequestRecord]) -> dict[str, Any] | None:
    """Requests per replica and adapter affinity, in send order; None when no answer named a replica."""
    answered = sorted((r for r in load if r.replica), key=lambda r: (r.sent_s, r.index))
    if not answered:
        return None
    seen: dict[str, set[str]] = defaultdict(set)  # adapter -> replicas that answered for it so far
    repeats = hits = 0
    for record in answered:
        if record.adapter:  # the base model goes anywhere: no affinity to keep
            held = seen[record.adapter]
            if held:
                repeats += 1
                hits += record.replica in held
            held.add(cast(str, record.replica))
    return {
        "requests": dict(sorted(Counter(cast(str, r.replica) for r in answered).items())),
        "affinity": hits / repeats if repeats else None,
        "affinity_requests": repeats,
    }


def _canaries(canaries: list[RequestRecord]) -> dict[str, Any]:
    mismatches = [
        {"adapter": r.adapter, "index": r.index, "detail": r.error_detail}
        for r in canaries
        if r.error == ERR_CANARY
    ]
    mixed = [r for r in canaries if r.index >= 0]  # recording requests (negative) are not checks
    return {
        "adapters": len({r.adapter for r in mixed}),
        "sent": len(mixed),
        "checked": sum(r.ok or r.error == ERR_CANARY for r in mixed),
        "mismatches": mismatches,
    }
