"""The load report's arithmetic, against numpy and the formulas computed here."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadtest.canary import Expected, check, mix_in, pick_adapters
from bench.loadtest.records import (
    CANARY,
    ERR_CANARY,
    ERR_REFUSED,
    LOAD,
    PlannedRequest,
    RequestRecord,
    summarize,
)
from bench.loadtest.report import Objective, build_report, jain_index
from bench.loadtest.sweep import sweep


def _record(
    index: int, adapter: str, planned: float, first: float, end: float, tokens: int, **kw: object
) -> RequestRecord:
    step = (end - first) / max(tokens - 1, 1)
    return RequestRecord(
        index=index,
        adapter=adapter,
        kind=str(kw.pop("kind", LOAD)),
        planned_s=planned,
        sent_s=planned + 0.001,
        prompt_tokens=10,
        max_tokens=tokens,
        first_token_s=first,
        end_s=end,
        output_tokens=tokens,
        token_times_s=[first + i * step for i in range(tokens)],
        **kw,  # type: ignore[arg-type]
    )


def test_summaries_match_numpy() -> None:
    values = list(np.random.default_rng(0).exponential(1.0, 501))
    stats = summarize(values)
    for q in (50, 90, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(values, q))
    assert stats["mean"] == pytest.approx(np.mean(values)) and stats["max"] == max(values)
    assert summarize([])["p50"] is None


def test_jain_index() -> None:
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    x = [1.0, 2.0, 4.0]
    assert jain_index(x) == pytest.approx(sum(x) ** 2 / (3 * sum(v * v for v in x)))


def test_report_latencies_goodput_tiers_and_errors() -> None:
    records = [
        _record(0, "a", 0.0, 0.5, 1.5, 11, tier="disk"),  # ttft 0.5, tpot 0.1
        _record(1, "a", 1.0, 1.1, 1.6, 6, tier="device"),  # ttft 0.1, tpot 0.1
        _record(2, "b", 2.0, 4.0, 4.2, 3, tier="host"),  # ttft 2.0: misses the objective
        RequestRecord(
            3, "b", LOAD, 3.0, 3.0, 10, 8, end_s=3.1, error=ERR_REFUSED, error_detail="HTTP 429: full"
        ),
        _record(4, "", 3.5, 3.6, 3.9, 4),  # base model: no tier
    ]
    report = build_report(records, {}, Objective(ttft_p99_s=1.0, tpot_mean_s=0.2))
    assert report["requests"] == 5 and report["completed"] == 4 and report["errors"] == {"refused": 1}
    assert report["error_samples"] == [
        {"kind": "refused", "index": 3, "adapter": "b", "detail": "HTTP 429: full"}
    ]
    assert report["ttft"]["count"] == 4 and report["ttft"]["mean"] == pytest.approx(
        (0.5 + 0.1 + 2.0 + 0.1) / 4
    )
    assert report["tpot"]["mean"] == pytest.approx(0.1)
    assert report["output_tokens"] == 11 + 6 + 3 + 4 and report["prompt_tokens"] == 40
    assert report["duration_s"] == pytest.approx(4.2)
    assert report["throughput"]["output_tokens_per_s"] == pytest.approx(24 / 4.2)
    # goodput: the requests that met both bounds themselves (0, 1 and 4), over the run's length
    assert (
        report["goodput"]["requests_per_s"] == pytest.approx(3 / 4.2) and report["goodput"]["fraction"] == 0.6
    )
    assert report["meets_objective"] is False  # one refusal, and p99 TTFT 2.0 > 1.0
    assert {tier: row["requests"] for tier, row in report["by_tier"].items()} == {
        "device": 1,
        "host": 1,
        "disk": 1,
        "unknown": 1,
    }
    assert report["per_adapter"]["<base>"]["requests"] == 1 and report["per_adapter"]["b"]["errors"] == 1
    assert report["itl"]["count"] == 10 + 5 + 2 + 3
    quantiles = dict(map(tuple, report["quantiles"]["ttft"]))
    assert quantiles[50.0] == pytest.approx(np.percentile([0.5, 0.1, 2.0, 0.1], 50))


def test_error_samples_keep_a_few_of_each_kind() -> None:
    records = [
        RequestRecord(
            i, "a", LOAD, float(i), float(i), 10, 8, end_s=i + 0.1, error=kind, error_detail=f"#{i}"
        )
        for i, kind in enumerate([ERR_REFUSED] * 7 + ["server_error"])
    ]
    samples = build_report(records, {}, Objective())["error_samples"]
    assert [s["detail"] for s in samples if s["kind"] == ERR_REFUSED] == ["#0", "#1", "#2", "#3", "#4"]
    assert [s["detail"] for s in samples if s["kind"] == "server_error"] == ["#7"]


def test_objective_parsing() -> None:
    assert Objective.parse("ttft_p99=2,tpot_mean=0.05") == Objective(2.0, 0.05)
    assert Objective.parse("").empty
    for bad in ("ttft=2", "ttft_p99=x", "ttft_p99=-1", "tpot_mean"):
        with pytest.raises(ValueError, match="objective part"):
            Objective.parse(bad)


def test_canaries_mix_in_beside_their_adapter_and_mismatches_are_errors() -> None:
    plan = [PlannedRequest(i, "ab"[i % 2], (1, 2), 4, at_s=i * 0.5) for i in range(8)]
    expected = {"a": Expected("a", (5, 6, 7), ""), "b": Expected("b", (8, 9), "")}
    mixed = mix_in(plan, expected, every=3, max_tokens=3)
    assert [p.index for p in mixed] == list(range(len(mixed)))
    canaries = [(i, p) for i, p in enumerate(mixed) if p.kind == CANARY]
    assert len(canaries) == 2
    for i, planned in canaries:  # same adapter and send time as the load request just before it
        assert planned.adapter == mixed[i - 1].adapter and planned.at_s == mixed[i - 1].at_s
    good = _record(10, "a", 0, 0.1, 0.3, 3, kind=CANARY, token_ids=[5, 6, 7])
    bad = _record(11, "b", 0, 0.1, 0.3, 2, kind=CANARY, token_ids=[8, 4])
    assert check([good, bad], expected) == 1
    assert good.error is None and bad.error == ERR_CANARY and "token 1" in bad.error_detail
    assert pick_adapters([PlannedRequest(i, f"x{i % 5}", (), 1) for i in range(50)], 3) == ["x0", "x2", "x4"]


async def _fake_run(rate: float) -> dict[str, object]:
    """A server that holds p99 TTFT at 0.1 s up to 7 req/s, then falls behind."""
    ttft = 0.1 if rate <= 7 else 5.0
    answered = rate if rate <= 7 else 7.0
    return {
        "requests": 10,
        "completed": 10,
        "duration_s": 10 / answered,
        "saturated": False,
        "ttft": {"p99": ttft},
        "tpot": {"mean": 0.01},
        "e2e": {"min": 0.0},
        "throughput": {"requests_per_s": answered},
    }


def test_auto_sweep_doubles_then_bisects() -> None:
    import asyncio

    result = asyncio.run(sweep(_fake_run, Objective(ttft_p99_s=1.0), None, start_rate=1.0, refine_steps=3))
    rates = [p["rate"] for p in result["points"]]
    assert rates == sorted(rates) and {1.0, 2.0, 4.0, 8.0} <= set(rates)
    assert 6.0 <= result["best_rate"] <= 7.0  # 4 -> 8 bisected three times: 6, 7, 7.5
    assert 16.0 not in rates


def test_replica_affinity_counts_repeat_requests_on_a_replica_that_answered_before() -> None:
    # a: r1, r1 (hit), r2 (miss); b: r2, r2 (hit); the base model is never counted; a request
    # without a replica (a plain server) is left out.
    plan = [("a", "r1"), ("b", "r2"), ("a", "r1"), ("", "r1"), ("a", "r2"), ("b", "r2"), ("", "r2")]
    records = [_record(i, ad, float(i), i + 0.2, i + 1.0, 5, replica=rep) for i, (ad, rep) in enumerate(plan)]
    records.append(_record(len(plan), "a", 9.0, 9.2, 10.0, 5))
    replicas = build_report(records, {}, Objective())["replicas"]
    assert replicas["requests"] == {"r1": 3, "r2": 4}
    assert replicas["affinity_requests"] == 3 and replicas["affinity"] == pytest.approx(2 / 3)
    # answers that name no replica: no section
    plain = [_record(0, "a", 0.0, 0.2, 1.0, 5)]
    assert build_report(plain, {}, Objective())["replicas"] is None
