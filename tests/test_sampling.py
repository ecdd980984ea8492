"""Sampling controls against their definitions, on hand-made logits."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams
from server.engine.sampling import Sampler


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    return Sampler(torch.Generator()).sample(logits, params, list(generators)).tokens


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.9]])


def test_greedy_takes_the_argmax() -> None:
    assert sample(LOGITS, [SamplingParams(temperature=0.0)], [_gen()]) == [1]


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        assert {sample(LOGITS, [params], [_gen(s)])[0] for s in range(50)} == {1}


def test_top_k_restricts_the_support() -> None:
    seen = {sample(LOGITS, [SamplingParams(temperature=5.0, top_k=2)], [_gen(s)])[0] for s in range(200)}
    assert seen == {1, 4}


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = torch.softmax(LOGITS[0], -1)  # sorted: 1 (.39), 4 (.35), 2 (.14), ...
    p = float(probs[1] + probs[4]) - 0.01  # needs token 4 to reach p, not token 2
    seen = {sample(LOGITS, [SamplingParams(temperature=1.0, top_p=p)], [_gen(s)])[0] for s in range(300)}
    assert seen == {1, 4}


def test_temperature_sampling_follows_the_softmax() -> None:
    generator = _gen(3)
    params = SamplingParams(temperature=2.0)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sample(LOGITS, [params], [generator])[0]] += 1
    expected = torch.softmax(LOGITS[0] / 2.0, -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_rows_are_sampled_with_their_own_params_and_generators() -> None:
    logits = LOGITS.repeat(3, 1)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(temperature=1.0, seed=5),
    ]
    first = sample(logits, params, [_gen(), _gen(5), _gen(5)])
    assert first[0] == 1 and first[1] == first[2]
