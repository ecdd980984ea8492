"""Sampling controls against their definitions, on hand-made logits.

Distributions are checked by total-variation distance over thousands of draws with fixed seeds,
so the tests are deterministic; the bounds sit several standard errors above the expected noise.
"""

from __future__ import annotations

from typing import cast

import torch

from server.engine.request import SamplingParams
from server.engine.sampling import Sampled, Sampler, TopPSearch

LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.9]])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample_one(logits: torch.Tensor, params: SamplingParams, seed: int = 0) -> int:
    """One draw for a one-row batch, seeded."""
    out = Sampler(_gen(99)).sample(logits, [params], [_gen(seed)])
    assert not out.errors
    return out.tokens[0]


def _expected(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The definition: softmax(logits / T), restricted to top_k, then to the top_p nucleus, renormalised."""
    probs = torch.softmax(logits / params.temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if params.top_k:
        keep[order[: params.top_k]] = True
    else:
        keep[:] = True
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    mass_before = 0.0
    for token in order.tolist():  # the smallest prefix whose mass reaches top_p
        if mass_before >= params.top_p:
            probs[token] = 0.0
        mass_before += float(probs[token])
    return probs / probs.sum()


def _empirical(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """Token frequencies of `draws` rows sampled in batches of 500 (unseeded: the sampler's generator)."""
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws // 500):
        out = sampler.sample(logits.expand(500, -1).contiguous(), [params] * 500, [None] * 500)
        assert not out.errors
        counts += torch.bincount(torch.tensor(out.tokens), minlength=logits.shape[-1])
    return counts / counts.sum()


def _total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


# ---- definitions ---------------------------------------------------------------------------------


def test_greedy_takes_the_argmax() -> None:
    assert _sample_one(LOGITS, SamplingParams(temperature=0.0)) == 1


def test_tiny_temperatures_are_greedy_not_overflows() -> None:
    for temperature in (1e-40, 1e-6):
        assert SamplingParams(temperature=temperature).greedy
        assert {_sample_one(LOGITS, SamplingParams(temperature=temperature), s) for s in range(20)} == {1}
    assert not SamplingParams(temperature=1e-5).greedy  # the smallest sampled temperature still works
    assert {_sample_one(LOGITS * 1e30, SamplingParams(temperature=1e-5), s) for s in range(20)} == {1}


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        assert {_sample_one(LOGITS, params, s) for s in range(50)} == {1}


def test_top_k_restricts_the_support() -> None:
    seen = {_sample_one(LOGITS, SamplingParams(temperature=5.0, top_k=2), s) for s in range(200)}
    assert seen == {1, 4}


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = torch.softmax(LOGITS[0], -1)  # sorted: 1 (.39), 4 (.35), 2 (.14), ...
    p = float(probs[1] + probs[4]) - 0.01  # needs token 4 to reach p, not token 2
    seen = {_sample_one(LOGITS, SamplingParams(temperature=1.0, top_p=p), s) for s in range(300)}
    assert seen == {1, 4}


def test_sampled_distribution_matches_the_definition() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 1.7, 3.0, 0.0, -0.5, 1.0])
    cases = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=2.0, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.5, top_k=5, top_p=0.75),
    ]
    sampler = Sampler(_gen(7))
    for params in cases:
        expected = _expected(logits, params)
        observed = _empirical(sampler, logits.unsqueeze(0), params, draws=20_000)
        assert observed[expected == 0].sum() == 0, params  # never outside top_k / the nucleus
        assert _total_variation(observed, expected) < 0.02, params  # expected noise ~0.006


def test_top_p_past_the_searched_head_falls_back_to_the_exact_nucleus() -> None:
    # Nearly flat: one block of 2 tokens holds ~1/4 of the mass, far short of top_p = 0.7.
    logits = torch.tensor([[0.3, 0.0, 0.2, 0.1, 0.25, 0.05, 0.15, 0.12]])
    params = SamplingParams(temperature=1.0, top_p=0.7)
    expected = _expected(logits[0], params)
    assert int((expected > 0).sum()) > 2  # the nucleus really is wider than the head searched
    narrow = TopPSearch(block_size=2, blocks=1, candidates=2, fallback_candidates=3)
    observed = _empirical(Sampler(_gen(11), narrow), logits, params, draws=20_000)
    assert observed[expected == 0].sum() == 0
    assert _total_variation(observed, expected) < 0.02


def test_the_top_p_search_does_not_change_the_tokens() -> None:
    logits = torch.randn(64, 70, generator=_gen(1)) * 3  # 70: the last block is padded
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * 64
    tokens = [
        Sampler(_gen(0), search).sample(logits, params, [_gen(s) for s in range(64)]).tokens
        for search in (
            TopPSearch(block_size=128, blocks=1, candidates=128, fallback_candidates=128),  # the whole row
            TopPSearch(
                block_size=4, blocks=3, candidates=5, fallback_candidates=20
            ),  # some rows fall back, some not
            TopPSearch(
                block_size=1, blocks=2, candidates=1, fallback_candidates=1
            ),  # nearly every row falls back
        )
    ]
    assert tokens[0] == tokens[1] == tokens[2]


# ---- batching and seeds --------------------------------------------------------------------------


def test_seeded_rows_get_the_same_tokens_alone_or_batched_in_any_order() -> None:
    vocab = 50
    logits = torch.randn(5, vocab, generator=_gen(2))
    params = [
        SamplingParams(temperature=0.9, top_p=0.8, seed=1),  # the seeded row under test
        SamplingParams(temperature=0.9, top_p=0.8),  # same params, unseeded
        SamplingParams(temperature=1.2, top_k=7, seed=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5),
    ]

    def run_steps(order: list[int]) -> list[int]:
        """Row 0's tokens over 20 steps, batched with the rows in `order`."""
        sampler = Sampler(_gen(123))
        generators = {i: _gen(params[i].seed) if params[i].seed is not None else None for i in order}
        tokens = []
        for _ in range(20):
            out = sampler.sample(logits[order], [params[i] for i in order], [generators[i] for i in order])
            tokens.append(out.tokens[order.index(0)])
        return tokens

    alone = run_steps([0])
    assert len(set(alone)) > 1  # really sampled
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4], [1, 0]):
        assert run_steps(order) == alone, order


def test_grouped_rows_match_one_by_one() -> None:
    logits = torch.randn(6, 40, generator=_gen(4)) * 2
    params = [
        SamplingParams(temperature=0.8, seed=10),
        SamplingParams(temperature=0.8, top_k=5, seed=11),
        SamplingParams(temperature=0.8, seed=12),
        SamplingParams(temperature=0.0, seed=13),
        SamplingParams(temperature=0.8, top_k=5, seed=14),
        SamplingParams(temperature=1.1, top_k=9, top_p=0.7, seed=15),
    ]
    batched = Sampler(_gen(0)).sample(logits, params, [_gen(p.seed or 0) for p in params])
    one_by_one = [_sample_one(logits[i : i + 1], p, p.seed or 0) for i, p in enumerate(params)]
    assert batched == Sampled(one_by_one, {})


def test_unseeded_rows_draw_from_the_samplers_generator() -> None:
    logits = torch.zeros(8, 1000)  # uniform over 1000 tokens
    params = [SamplingParams(temperature=1.0)] * 8
    first = Sampler(_gen(5)).sample(logits, params, [None] * 8).tokens
    assert first == Sampler(_gen(5)).sample(logits, params, [None] * 8).tokens
    assert first != Sampler(_gen(6)).sample(logits, params, [None] * 8).tokens


# ---- rows that cannot be sampled -----------------------------------------------------------------


def test_non_finite_rows_fail_alone_with_a_message() -> None:
    logits = LOGITS.repeat(6, 1)
    logits[1] = float("nan")
    logits[2, 3] = float("inf")
    logits[4, 0] = float("nan")
    logits[5, [0, 2]] = float("-inf")  # -inf masks a token; that is fine
    params = [
        SamplingParams(temperature=1.0, seed=0),
        SamplingParams(temperature=1.0, seed=0),
        SamplingParams(temperature=1.0, seed=0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0),  # greedy rows are checked too
        SamplingParams(temperature=2.0, seed=0),
    ]
    out = Sampler(_gen(0)).sample(logits, params, [_gen() if p.seed is not None else None for p in params])
    assert sorted(out.errors) == [1, 2, 4]
    assert "NaN" in out.errors[1] and "+inf" in out.errors[2] and "NaN" in out.errors[4]
    assert [out.tokens[i] for i in (1, 2, 4)] == [-1, -1, -1]
    assert out.tokens[3] == 1 and 0 <= out.tokens[0] < 5 and out.tokens[5] in {1, 3, 4}


def test_a_row_with_no_finite_logit_fails() -> None:
    logits = torch.full((2, 5), float("-inf"))
    logits[0, 2] = 0.0
    params = [SamplingParams(temperature=1.0)] * 2
    out = Sampler(_gen(0)).sample(logits, params, [None, None])
    assert out.tokens[0] == 2 and list(out.errors) == [1] and "-inf" in out.errors[1]


def test_a_failing_group_fails_only_its_rows() -> None:
    logits = LOGITS.repeat(3, 1)
    params = [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.5, seed=2),
        SamplingParams(temperature=0.0),
    ]
    broken = cast(torch.Generator, object())  # rand() with it raises inside row 1's group
    out = Sampler(_gen(0)).sample(logits, params, [_gen(1), broken, None])
    assert list(out.errors) == [1] and out.errors[1].startswith("sampling failed")
    assert out.tokens[1] == -1 and out.tokens[2] == 1 and 0 <= out.tokens[0] < 5
