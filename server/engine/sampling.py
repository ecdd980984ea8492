"""Next-token sampling for one step (interim: row by row; a batched sampler replaces it).

A seeded request owns a torch.Generator, so it samples the same tokens whatever it is batched
with; unseeded requests draw from the sampler's generator. A row that cannot be sampled
(non-finite logits, an error while sampling it) fails alone: `Sampled.errors` names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams


@dataclass(frozen=True)
class Sampled:
    tokens: list[int]  # one per row; -1 for a row that failed
    errors: dict[int, str]  # row -> what went wrong


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for unseeded rows

    def sample(
        self,
        logits: torch.Tensor,  # [N, vocab] fp32
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> Sampled:
        tokens = logits.max(dim=-1).indices.tolist()
        errors: dict[int, str] = {}
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()
        for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
            if not finite[row] and not bool(torch.isfinite(logits[row]).all()):
                errors[row] = "the model produced non-finite logits (NaN or inf) for this request"
                tokens[row] = -1
            elif not p.greedy:
                try:
                    tokens[row] = _sample_row(logits[row], p, gen or self.generator)
                except Exception as exc:
                    errors[row] = f"sampling failed: {exc!r}"
                    tokens[row] = -1
        return Sampled(tokens, errors)


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        values, indices = torch.topk(logits, p.top_k)
    else:
        values, indices = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    if p.top_p < 1.0:
        cumulative = torch.cumsum(probs, dim=-1)
        keep = (cumulative - probs) < p.top_p
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])
