"""The rate sweep: the highest offered rate at which the server meets a service-level objective.

Each point is a whole run (the same workload, its arrival times drawn for that rate) and its
report; a point meets the objective when every request was answered, p99 TTFT and mean TPOT are
within their bounds and the run did not saturate (report.Objective.met_by_run).

- Given rates: they are run in increasing order.
- No rates: doubling from `start_rate` until a point fails, then `refine_steps` bisections between
  the last rate that met the objective and the first that did not.
Either way the sweep stops early once the server is over-saturated (the run saturated, or it
answered less than `SATURATED_SHARE` of the offered rate over the run less its last request's
unqueued time): a higher rate can only do worse and
would take the longest to run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from bench.loadtest.report import Objective

# Answered fewer requests per second than this share of the offered rate: over-saturated.
SATURATED_SHARE = 0.8
MAX_DOUBLINGS = 12


def over_saturated(report: dict[str, Any], rate: float) -> bool:
    if report.get("saturated"):
        return True
    # The last answer comes at least one unqueued request's time (the fastest e2e) after the last
    # send: leave that tail out, or a short run at a rate the server keeps up with looks behind.
    tail = report["e2e"].get("min") or 0.0
    window = report["duration_s"] - tail
    if window <= 0 or report["requests"] == 0:
        return False
    return report["completed"] / window < SATURATED_SHARE * rate


async def sweep(
    run_at: Callable[[float], Awaitable[dict[str, Any]]],
    objective: Objective,
    rates: list[float] | None = None,
    start_rate: float = 1.0,
    refine_steps: int = 3,
) -> dict[str, Any]:
    """`run_at(rate)` runs the workload at one rate and returns its report."""
    if objective.empty:
        raise ValueError("a rate sweep needs an objective (--objective ttft_p99=S,tpot_mean=S)")
    points: list[dict[str, Any]] = []
    stopped_early = False

    async def point(rate: float) -> dict[str, Any]:
        report = await run_at(rate)
        meets = objective.met_by_run(report)
        entry = {
            "rate": rate,
            "meets_objective": meets,
            "over_saturated": over_saturated(report, rate),
            "report": report,
        }
        points.append(entry)
        return entry

    if rates:
        for rate in sorted(rates):
            entry = await point(rate)
            if not entry["meets_objective"] and entry["over_saturated"]:
                stopped_early = rate != max(rates)
                break
    else:
        low, high = 0.0, None  # the highest rate that met the objective, the lowest that did not
        rate = start_rate
        for _ in range(MAX_DOUBLINGS):
            if not (await point(rate))["meets_objective"]:
                high = rate
                break
            low, rate = rate, rate * 2
        if high is not None:
            for _ in range(refine_steps):
                middle = (low + high) / 2
                if (await point(middle))["meets_objective"]:
                    low = middle
                else:
                    high = middle
            stopped_early = True
    passing = [p["rate"] for p in points if p["meets_objective"]]
    points.sort(key=lambda p: p["rate"])
    return {
        "objective": asdict(objective),
        "points": points,
        "best_rate": max(passing) if passing else None,
        "stopped_early": stopped_early,
    }
