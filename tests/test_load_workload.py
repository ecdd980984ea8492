"""The load-test workload planner: popularity, churn, arrivals, lengths, prompts, traces, seeds.

Statistical checks use fixed seeds against independent oracles (the formulas, not the module's own
helpers): a chi-square goodness-of-fit statistic against the p=0.001 critical value for its degrees
of freedom, and means within a few standard errors.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.loadtest.workload import (
    WorkloadConfig,
    expected_frequencies,
    parse_length,
    parse_popularity,
    plan,
)

ADAPTERS = tuple(f"ad{i}" for i in range(8))
CHI2_P001 = {7: 24.322, 9: 27.877}  # chi-square critical values at p=0.001, by degrees of freedom


def closed(popularity: str, n: int, **options: object) -> WorkloadConfig:
    """A cheap closed-loop config (one-token prompts) for popularity checks."""
    base = WorkloadConfig(
        adapters=ADAPTERS,
        token_ids=(5, 50),
        popularity=popularity,
        arrival="closed",
        num_requests=n,
        prompt_tokens="1",
        max_tokens="1",
    )
    return replace(base, **options)  # type: ignore[arg-type]


def chi_square(counts: Counter[str], probabilities: dict[str, float]) -> float:
    total = sum(counts.values())
    return sum((counts[name] - total * p) ** 2 / (total * p) for name, p in probabilities.items())


def zipf(n: int, alpha: float) -> list[float]:
    weights = [k**-alpha for k in range(1, n + 1)]
    return [w / sum(weights) for w in weights]


def gaps(requests: list) -> np.ndarray:
    return np.diff([r.at_s for r in requests])


# --- popularity -----------------------------------------------------------------------------------


def test_uniform_frequencies_fit() -> None:
    counts = Counter(r.adapter for r in plan(closed("uniform", 8000)))
    assert set(counts) == set(ADAPTERS)
    assert expected_frequencies(closed("uniform", 1)) == {name: 1 / 8 for name in ADAPTERS}
    assert chi_square(counts, {name: 1 / 8 for name in ADAPTERS}) < CHI2_P001[7]


def test_zipf_frequencies_fit_the_formula_over_a_seeded_ranking() -> None:
    config = closed("zipf:1.2", 10000, adapters=tuple(f"z{i}" for i in range(10)), seed=3)
    expected = expected_frequencies(config)
    # The model is zipf over some ranking of the list: the probabilities sorted are k^-1.2 / H.
    assert sorted(expected.values(), reverse=True) == pytest.approx(zipf(10, 1.2))
    ranking = sorted(expected, key=expected.__getitem__, reverse=True)
    assert ranking != list(config.adapters)  # seed 3 does shuffle (a fixed list order would be a bias)
    counts = Counter(r.adapter for r in plan(config))
    assert chi_square(counts, expected) < CHI2_P001[9]
    top_share, p_top = counts[ranking[0]] / 10000, zipf(10, 1.2)[0]
    assert abs(top_share - p_top) < 5 * math.sqrt(p_top * (1 - p_top) / 10000)
    # The test has power: the same counts are far from uniform.
    assert chi_square(counts, {name: 0.1 for name in config.adapters}) > 10 * CHI2_P001[9]


def test_distinct_gives_each_adapter_once_per_cycle_in_the_same_order() -> None:
    names = [r.adapter for r in plan(closed("distinct", 8 * 5 + 3))]
    cycle = names[:8]
    assert sorted(cycle) == sorted(ADAPTERS)
    assert names == (cycle * 6)[: 8 * 5 + 3]
    orders = {tuple(r.adapter for r in plan(closed("distinct", 8, seed=seed))) for seed in range(4)}
    assert len(orders) > 1  # the order comes from the seed
    assert expected_frequencies(closed("distinct", 8)) == {name: 1 / 8 for name in ADAPTERS}


def test_identical_uses_the_first_adapter() -> None:
    assert {r.adapter for r in plan(closed("identical", 500))} == {"ad0"}
    assert expected_frequencies(closed("identical", 1)) == {name: float(name == "ad0") for name in ADAPTERS}


def test_churn_moves_the_top_adapter_and_keeps_the_zipf_shape() -> None:
    # churn = 0.0125 of the ranking per 100 requests with 8 adapters: one place every 1000 requests.
    config = closed("zipf:1.0", 8000, churn=0.0125, seed=7)
    requests = plan(config)
    base = sorted(expected_frequencies(config), key=expected_frequencies(config).__getitem__, reverse=True)
    by_rank = zipf(8, 1.0)
    tops = []
    for window in (0, 3, 7):  # shift = window: the rank-r adapter is base[(r - window) % 8]
        counts = Counter(r.adapter for r in requests[window * 1000 : (window + 1) * 1000])
        shifted = {base[(rank - window) % 8]: by_rank[rank] for rank in range(8)}
        assert chi_square(counts, shifted) < CHI2_P001[7]
        tops.append(counts.most_common(1)[0][0])
    assert tops == [base[0], base[5], base[1]]  # a cold adapter turned hot each step
    # Without churn the same seed keeps one top adapter from start to end.
    still = plan(replace(config, churn=0.0))
    assert Counter(r.adapter for r in still[-1000:]).most_common(1)[0][0] == base[0]


def test_identical_with_churn_switches_the_one_adapter() -> None:
    # churn = 1.25 with 8 adapters: one place every 10 requests.
    names = [r.adapter for r in plan(closed("identical", 30, churn=1.25))]
    assert names == ["ad0"] * 10 + ["ad7"] * 10 + ["ad6"] * 10


# --- arrivals -------------------------------------------------------------------------------------


def open_loop(**options: object) -> WorkloadConfig:
    base = WorkloadConfig(
        adapters=ADAPTERS, token_ids=(5, 50), rate=20.0, num_requests=20000, prompt_tokens="1", max_tokens="1"
    )
    return replace(base, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arrival", "burstiness", "cv"),
    [("poisson", 1.0, 1.0), ("gamma", 0.25, 2.0), ("gamma", 4.0, 0.5)],
)
def test_arrivals_have_the_rate_and_burstiness(arrival: str, burstiness: float, cv: float) -> None:
    requests = plan(open_loop(arrival=arrival, burstiness=burstiness, seed=11))
    assert requests[0].at_s == 0.0 and [r.index for r in requests] == list(range(20000))
    between = gaps(requests)
    assert (between >= 0).all()
    # vLLM's convention: mean gap 1/rate, coefficient of variation 1/sqrt(burstiness).
    assert abs(between.mean() - 1 / 20) < 5 * cv / 20 / math.sqrt(len(between))
    assert between.std() / between.mean() == pytest.approx(cv, rel=0.1)


def test_poisson_is_gamma_with_burstiness_one() -> None:
    poisson = [r.at_s for r in plan(open_loop(num_requests=200))]
    assert poisson == [r.at_s for r in plan(open_loop(num_requests=200, arrival="gamma", burstiness=1.0))]


def test_the_plan_stops_at_the_duration_or_the_count_whichever_first() -> None:
    by_time = plan(open_loop(rate=50.0, num_requests=None, duration_s=20.0))
    assert by_time[-1].at_s <= 20.0  # type: ignore[operator]
    assert abs(len(by_time) - 1000) < 5 * math.sqrt(1000)
    assert len(plan(open_loop(rate=50.0, num_requests=100, duration_s=20.0))) == 100
    assert len(plan(open_loop(rate=50.0, num_requests=5000, duration_s=20.0))) == len(by_time)


def test_closed_loop_has_no_times() -> None:
    requests = plan(closed("uniform", 50))
    assert len(requests) == 50 and all(r.at_s is None for r in requests)


# --- lengths and prompts --------------------------------------------------------------------------


def test_lengths_follow_their_specs_and_prompts_have_them() -> None:
    config = open_loop(num_requests=4000, prompt_tokens="uniform:3-6", max_tokens="normal:100,10")
    requests = plan(config)
    prompt_lengths = np.array([len(r.prompt_token_ids) for r in requests])
    assert set(prompt_lengths.tolist()) == {3, 4, 5, 6}
    assert abs(prompt_lengths.mean() - 4.5) < 5 * math.sqrt(1.25 / 4000)
    max_tokens = np.array([r.max_tokens for r in requests])
    assert abs(max_tokens.mean() - 100) < 5 * 10 / math.sqrt(4000)
    assert max_tokens.std() == pytest.approx(10, rel=0.1)
    assert {r.max_tokens for r in plan(replace(config, max_tokens="17"))} == {17}
    clipped = [r.max_tokens for r in plan(replace(config, max_tokens="normal:2,10"))]
    assert min(clipped) == 1 and clipped.count(1) > 1000  # P(N(2,10) < 1.5) is about 0.48
    medians = np.median([r.max_tokens for r in plan(replace(config, max_tokens="lognormal:50,0.5"))])
    assert medians == pytest.approx(50, abs=2)


def test_prompt_ids_are_seeded_from_the_range_and_differ_per_request() -> None:
    requests = plan(open_loop(num_requests=300, prompt_tokens="64", token_ids=(1000, 1010)))
    ids = [i for r in requests for i in r.prompt_token_ids]
    assert set(ids) == set(range(1000, 1010))
    assert all(isinstance(i, int) for i in ids[:10])
    assert len({r.prompt_token_ids for r in requests}) == 300


# --- reproducibility ------------------------------------------------------------------------------


def test_same_seed_same_plan_other_seed_other_plan() -> None:
    config = open_loop(num_requests=200, popularity="zipf:1.0", prompt_tokens="uniform:4-20", seed=5)
    first = plan(config)
    assert plan(config) == first
    other = plan(replace(config, seed=6))
    assert [r.adapter for r in other] != [r.adapter for r in first]
    assert [r.at_s for r in other] != [r.at_s for r in first]
    assert [r.prompt_token_ids for r in other] != [r.prompt_token_ids for r in first]


def test_changing_one_option_keeps_the_other_draws() -> None:
    config = open_loop(num_requests=200, popularity="zipf:1.0", seed=5)
    first = plan(config)
    longer = plan(replace(config, prompt_tokens="uniform:10-30", max_tokens="normal:64,8"))
    assert [(r.adapter, r.at_s) for r in longer] == [(r.adapter, r.at_s) for r in first]


# --- traces ---------------------------------------------------------------------------------------


def write_trace(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def trace_config(path: str, **options: object) -> WorkloadConfig:
    base = WorkloadConfig(
        adapters=ADAPTERS, token_ids=(5, 50), arrival="trace", trace_path=path, max_tokens="7"
    )
    return replace(base, **options)  # type: ignore[arg-type]


def test_trace_replay_reproduces_the_trace(tmp_path: Path) -> None:
    entries = [
        {"timestamp": 1000.5, "adapter": "sql", "prompt_tokens": 12, "output_tokens": 30},
        {"timestamp": 1001.0, "adapter": "", "prompt_tokens": 3, "output_tokens": 1},
        {"timestamp": 1001.0, "adapter": "sql", "prompt_tokens": 5},  # max tokens from the spec
        {"timestamp": 1003.25, "adapter": "shout", "prompt_tokens": 40, "output_tokens": 9},
    ]
    path = write_trace(
        tmp_path, [json.dumps(e) for e in entries[:2]] + [""] + [json.dumps(e) for e in entries[2:]]
    )
    requests = plan(trace_config(path))
    assert [r.at_s for r in requests] == [0.0, 0.5, 0.5, 2.75]
    assert [r.adapter for r in requests] == ["sql", "", "sql", "shout"]
    assert [len(r.prompt_token_ids) for r in requests] == [12, 3, 5, 40]
    assert [r.max_tokens for r in requests] == [30, 1, 7, 9]
    assert expected_frequencies(trace_config(path)) == {"sql": 0.5, "": 0.25, "shout": 0.25}
    assert [r.adapter for r in plan(trace_config(path, num_requests=2))] == ["sql", ""]
    assert len(plan(trace_config(path, duration_s=1.0))) == 3


def test_a_trace_line_without_an_adapter_draws_one(tmp_path: Path) -> None:
    path = write_trace(tmp_path, ['{"timestamp": 0}', '{"timestamp": 1, "adapter": "x"}'])
    requests = plan(trace_config(path, popularity="identical"))
    assert [r.adapter for r in requests] == ["ad0", "x"]
    with pytest.raises(ValueError, match="line 1: names no adapter"):
        plan(trace_config(path, adapters=()))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [
                '{"timestamp": 2, "adapter": "a"}',
                '{"timestamp": 3, "adapter": "a"}',
                '{"timestamp": 1, "adapter": "a"}',
            ],
            "line 3: timestamp 1 is before",
        ),
        (['{"timestamp": 0, "adapter": "a"}', "{not json"], "line 2: not JSON"),
        (['{"adapter": "a"}'], "line 1: needs a numeric timestamp"),
        (['{"timestamp": "soon", "adapter": "a"}'], "line 1: needs a numeric timestamp"),
        (
            ["", '{"timestamp": 0, "adapter": "a", "prompt_tokens": 0}'],
            "line 2: prompt_tokens must be an integer >= 1",
        ),
        (['{"timestamp": 0, "adapter": "a", "output_tokens": 2.5}'], "line 1: output_tokens must be"),
        (['{"timestamp": 0, "adapter": 3}'], "line 1: adapter must be a string"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (["", "  "], "has no requests"),
    ],
)
def test_bad_traces_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(trace_config(write_trace(tmp_path, lines)))


def test_a_missing_trace_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the trace"):
        plan(trace_config(str(tmp_path / "nope.jsonl")))


# --- bad specs and configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zipf", "zipf needs an exponent"),
        ("zipf:x", "zipf needs an exponent"),
        ("zipf:0", "must be > 0"),
        ("zipf:-1", "must be > 0"),
        ("zipf:nan", "zipf needs an exponent"),
        ("uniform:3", "is not one of"),
        ("popular", "is not one of"),
    ],
)
def test_bad_popularity_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_popularity(spec)
    assert repr(spec) in str(error.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "integer >= 1"),
        ("-3", "integer >= 1"),
        ("12.5", "integer >= 1"),
        ("uniform:10-5", "1 <= LO <= HI"),
        ("uniform:0-5", "1 <= LO <= HI"),
        ("uniform:64", "two integers LO-HI"),
        ("normal:128", "two numbers"),
        ("normal:128,x", "a length is N"),
        ("normal:128,-1", "spread >= 0"),
        ("lognormal:0,1", "center > 0"),
        ("poisson:3", "a length is N"),
    ],
)
def test_bad_length_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_length(spec)
    assert repr(spec) in str(error.value)


def test_good_specs_parse() -> None:
    assert parse_popularity("zipf:0.8").alpha == 0.8
    assert parse_length("uniform:64-256").params == (64, 256)
    assert parse_length(" 128 ").params == (128,)
    assert parse_length("lognormal:100,0.7").params == (100.0, 0.7)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": None}, "need a rate > 0"),
        ({"rate": 0.0}, "need a rate > 0"),
        ({"burstiness": 2.0}, "needs arrival='gamma'"),
        ({"arrival": "gamma", "burstiness": 0.0}, "burstiness 0.0: must be > 0"),
        ({"arrival": "closed"}, "takes no rate"),
        (
            {"arrival": "closed", "rate": None, "num_requests": None, "duration_s": 10.0},
            "closed loop needs num_requests",
        ),
        ({"num_requests": None}, "needs num_requests or duration_s"),
        ({"num_requests": 0}, "num_requests 0"),
        ({"duration_s": -1.0}, "duration_s -1.0"),
        ({"arrival": "bursty"}, "arrival 'bursty' is not one of"),
        ({"trace_path": "t.jsonl"}, "trace_path goes with arrival='trace'"),
        ({"arrival": "trace", "rate": None}, "needs one"),
        ({"popularity": "uniform", "churn": 0.5}, "churn applies to zipf and identical"),
        ({"popularity": "zipf:1", "churn": -0.5}, "churn -0.5"),
        ({"adapters": ("a", "b", "a")}, "listed twice"),
        ({"adapters": ()}, "no adapters"),
        ({"token_ids": (10, 10)}, r"token ids \[10, 10\)"),
        ({"seed": -1}, "seed -1"),
        ({"prompt_tokens": "lots"}, "length 'lots'"),
        ({"popularity": "zipf:"}, "zipf needs an exponent"),
    ],
)
def test_bad_configs_are_refused_when_built(options: dict[str, object], message: str) -> None:
    good = dict(adapters=ADAPTERS, token_ids=(5, 50), rate=5.0, num_requests=10)
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**{**good, **options})  # type: ignore[arg-type]
