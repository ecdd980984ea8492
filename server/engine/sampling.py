"""Next-token sampling for one step: greedy rows with one max(), the rest in batched groups.

Rows that share (temperature, top_k, top_p, min_p) are sampled together by inverse CDF: each row draws
exactly one uniform per step, from its request's own generator when the request is seeded (so
its tokens do not depend on what it is batched with) or from the sampler's generator when not;
greedy and top_k=1 rows draw nothing.
min_p (vLLM's) drops, after the temperature, the tokens less likely than min_p times the most
likely one, before top_k and top_p look at the row; greedy rows never see it (it keeps the argmax).
No full-vocabulary sort: top_k takes `torch.topk`; top_p looks for its nucleus in the head of the
row that a block search finds (TopPSearch) and sorts a whole row only when the nucleus reaches
past that head, so it stays exact.

A row whose logits hold NaN or +inf, or whose group fails for any reason, fails alone: its
request gets an error and its neighbours get their tokens. This module knows nothing about
requests beyond their SamplingParams, nor about the model, the scheduler or streaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams


@dataclass(frozen=True)
class TopPSearch:
    """Where top_p looks for its nucleus before sorting a whole row.

    The vocabulary is cut into blocks of `block_size` tokens; the `blocks` blocks with the highest
    maxima are gathered and their top `candidates` tokens taken. That is the exact head of the
    row's sorted order down to the best token left outside those blocks; a row whose nucleus does
    not end inside that head takes its top `fallback_candidates` tokens instead, and is sorted in
    full only if the nucleus reaches past those too. On SmolLM2 logits at T=0.7, top_p=0.9 the nucleus
    is ~5 tokens at the median and 54 at the 99th percentile (see bench/RESULTS.md, "Sampling").
    """

    block_size: int = 64
    blocks: int = 32
    candidates: int = 256
    fallback_candidates: int = 4096  # the top tokens of a row the search missed, before a full sort

    def __post_init__(self) -> None:
        if min(self.block_size, self.blocks, self.candidates, self.fallback_candidates) < 1:
            raise ValueError(f"every TopPSearch size must be >= 1, got {self}")


@dataclass(frozen=True)
class Sampled:
    """One step's next tokens: `tokens[i]` for row i, or -1 with `errors[i]` saying why not."""

    tokens: list[int]
    errors: dict[int, str]


@dataclass(frozen=True)
class _GroupKey:
    """What decides how a row is sampled; rows with equal keys are sampled in one batch."""

    temperature: float
    top_k: int  # 0 = the whole vocabulary
    top_p: float  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off


class Sampler:
    """Samples next tokens; holds the generator of unseeded requests (the engine's only RNG).

    Not thread-safe: the engine thread alone calls `sample`."""

    def __init__(self, generator: torch.Generator, top_p_search: TopPSearch | None = None):
        self.generator = generator
        self.top_p_search = top_p_search or TopPSearch()
        # Reused for the [rows, vocab] weights of every step: a fresh 6 MB buffer per step costs
        # more in page faults than the exp it holds. So a Sampler serves one thread at a time.
        self._scratch = torch.empty(0)

    def sample(
        self,
        logits: torch.Tensor,  # [N, vocab] fp32
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],  # a seeded row's own generator; None = unseeded
    ) -> Sampled:
        """One token per row. Never raises for a bad row: that row gets -1 and an entry in `errors`."""
        num_rows, vocab_size = logits.shape
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(
                f"{num_rows} logit rows but {len(params)} params and {len(generators)} generators"
            )
        # 1) rows that cannot be sampled at all
        errors = _non_finite_rows(logits)
        # 2) greedy rows (and top_k = 1) from one max over all rows: cheaper than picking them out
        best = logits.max(dim=-1)  # max() is ~2.5x faster than argmax() on CPU
        tokens: list[int] = best.indices.tolist()
        # 3) every other row in a batch with the rows that share its params
        for key, rows in _groups(params, errors, vocab_size).items():
            try:
                uniforms = self._uniforms([generators[r] for r in rows])
                chosen = self._sample_group(logits, best.values, rows, key, uniforms)
            except Exception as exc:  # fail this group's requests, not the step
                for r in rows:
                    errors[r] = f"sampling failed: {exc!r}"
                continue
            for r, token in zip(rows, chosen.tolist(), strict=True):
                tokens[r] = token
        for r in errors:
            tokens[r] = -1
        return Sampled(tokens, errors)

    def _uniforms(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One uniform in [0, 1) per row: seeded rows from their own generator, the rest from ours."""
        uniforms = torch.empty(len(generators), dtype=torch.float64)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            uniforms[unseeded] = torch.rand(len(unseeded), generator=self.generator, dtype=torch.float64)
        for i, g in enumerate(generators):
            if g is not None:
                uniforms[i] = torch.rand((), generator=g, dtype=torch.float64)
        return uniforms

    def _sample_group(
        self,
        logits: torch.Tensor,  # [N, vocab]
        row_max: torch.Tensor,  # [N]
        rows: list[int],
        key: _GroupKey,
        uniforms: torch.Tensor,  # [n] float64
    ) -> torch.Tensor:  # [n] token ids
        scaled = self._shifted(logits, row_max, rows).div_(key.temperature)  # [n, width], <= 0
        # min_p keeps p / p_max = exp(scaled) >= min_p: a prefix of the sorted row, as top_k's is, so
        # it is applied where it is cheapest: on the top_k values, or on the weights in one fused pass.
        if key.top_k:
            values, candidates = scaled.topk(key.top_k)  # sorted, so top_p can cut a prefix
            if key.min_p > 0.0:
                values.masked_fill_(values < math.log(key.min_p), float("-inf"))
            positions = _inverse_cdf(torch.softmax(values, -1), uniforms, key.top_p)
            return candidates.gather(-1, positions).squeeze(-1)
        weights = scaled.exp_()  # unnormalised probabilities: 1 at the row max, 0 in the padding
        if key.min_p > 0.0:  # threshold_ keeps w > the float32 just below min_p, i.e. w >= min_p
            torch.threshold_(weights, _just_below(key.min_p), 0.0)
        if key.top_p >= 1.0:  # vocabulary order: no sort at all
            return _inverse_cdf(weights, uniforms, 1.0).squeeze(-1)
        return self._sample_top_p(weights, uniforms, key.top_p)

    def _shifted(self, logits: torch.Tensor, row_max: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits[rows] - their max, padded with -inf to whole top-p blocks: [n, width].

        Shifting before dividing by the temperature keeps a tiny temperature from overflowing."""
        vocab_size = logits.shape[-1]
        block = self.top_p_search.block_size
        width = -(-vocab_size // block) * block
        if self._scratch.numel() < len(rows) * width:
            self._scratch = torch.empty(len(rows) * width)
        shifted = self._scratch[: len(rows) * width].view(len(rows), width)
        shifted[:, vocab_size:] = float("-inf")
        if len(rows) == logits.shape[0]:  # the whole batch (rows are in order): no gather
            torch.sub(logits, row_max.unsqueeze(-1), out=shifted[:, :vocab_size])
        else:
            index = torch.tensor(rows)
            picked = logits.index_select(0, index).sub_(row_max.index_select(0, index).unsqueeze(-1))
            shifted[:, :vocab_size] = picked
        return shifted

    def _sample_top_p(
        self,
        weights: torch.Tensor,  # [n, width] unnormalised probabilities, width a multiple of the block
        uniforms: torch.Tensor,  # [n]
        top_p: float,
    ) -> torch.Tensor:  # [n]
        """Nucleus sampling from the head of each row (see TopPSearch); a full sort only for rows
        whose nucleus reaches past it."""
        search = self.top_p_search
        n, width = weights.shape
        num_blocks = width // search.block_size
        total = weights.sum(-1, keepdim=True)  # [n, 1]
        # 1) the blocks with the highest maxima, and the best weight left outside them
        block_max = weights.view(n, num_blocks, search.block_size).amax(-1)  # [n, num_blocks]
        picked = min(search.blocks, num_blocks)
        best_blocks, blocks = block_max.topk(min(picked + 1, num_blocks))
        outside = best_blocks[:, picked:].amax(-1, keepdim=True) if picked < num_blocks else total.mul(-1)
        # 2) their top tokens, sorted: the head of the row's sorted order down to `outside`
        offsets = torch.arange(search.block_size)
        token_ids = (blocks[:, :picked].unsqueeze(-1) * search.block_size + offsets).flatten(1)
        head = weights.gather(-1, token_ids)  # [n, picked * block_size]
        head, order = head.topk(min(search.candidates, head.shape[-1]))  # sorted
        head_ids = token_ids.gather(-1, order)
        head_probs = head / total
        # 3) exact where the nucleus ends inside the head on a token better than any outside it
        cdf = head_probs.cumsum(-1)
        end = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], top_p)).clamp_(max=cdf.shape[-1] - 1)
        exact = (cdf.gather(-1, end) >= top_p) & (head.gather(-1, end) > outside)
        exact |= outside < 0  # every block gathered
        tokens = head_ids.gather(-1, _inverse_cdf(head_probs, uniforms, top_p)).squeeze(-1)
        short = (~exact.squeeze(-1)).nonzero().flatten()
        if len(short):
            probs = weights.index_select(0, short).div_(total.index_select(0, short))
            tokens[short] = _nucleus_draw(
                probs, uniforms.index_select(0, short), top_p, search.fallback_candidates
            )
        return tokens


def _nucleus_draw(
    probs: torch.Tensor,  # [m, width], normalised
    uniforms: torch.Tensor,  # [m]
    top_p: float,
    k: int,
) -> torch.Tensor:  # [m] token ids
    """Nucleus draw from each row's top k tokens; rows whose top k fall short of top_p are sorted in full."""
    width = probs.shape[-1]
    head, head_ids = probs.topk(min(k, width))  # sorted; k >= width is a full sort
    short = (head.sum(-1) < top_p).nonzero().flatten() if k < width else head_ids[:0, 0]
    tokens = head_ids.gather(-1, _inverse_cdf(head, uniforms, top_p)).squeeze(-1)
    if len(short):
        tokens[short] = _nucleus_draw(
            probs.index_select(0, short), uniforms.index_select(0, short), top_p, width
        )
    return tokens


def _inverse_cdf(
    probs: torch.Tensor,  # [n, m]; sorted descending when top_p < 1
    uniforms: torch.Tensor,  # [n] in [0, 1)
    top_p: float,
) -> torch.Tensor:  # [n, 1] positions in 0..m-1
    """Position of one draw per row from `probs` cut to the smallest prefix of mass >= top_p.

    Exact for unnormalised rows too: the draw is scaled by the kept mass. Overwrites `probs`
    with its cumulative sum.
    """
    cdf = probs.cumsum_(-1)  # in place: a fresh [n, vocab] buffer per step costs page faults
    last = cdf.shape[-1] - 1
    if top_p < 1.0:  # keep token i while the mass before it is < top_p: up to the first cdf >= top_p
        end = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], top_p)).clamp_(max=last)
    else:
        end = torch.full_like(cdf[:, :1], last, dtype=torch.long)
    target = cdf.gather(-1, end).double() * uniforms.unsqueeze(-1)
    # right=True: the first position whose cdf exceeds the draw, so zero-probability tokens never win
    return torch.searchsorted(cdf, target.float(), right=True).clamp_(max=end)


def _just_below(value: float) -> float:
    """The largest float32 below `value` (a strict > against it is >= value in float32)."""
    return float(torch.nextafter(torch.tensor(value), torch.tensor(0.0)))


def _groups(
    params: Sequence[SamplingParams], failed: dict[int, str], vocab_size: int
) -> dict[_GroupKey, list[int]]:
    """Non-greedy rows by how they are sampled (top_k >= vocab is no restriction; top_k 1 is greedy)."""
    groups: dict[_GroupKey, list[int]] = {}
    for row, p in enumerate(params):
        top_k = p.top_k if p.top_k < vocab_size else 0
        if p.greedy or top_k == 1 or row in failed:
            continue
        groups.setdefault(_GroupKey(p.temperature, top_k, p.top_p, p.min_p), []).append(row)
    return groups


def _non_finite_rows(logits: torch.Tensor) -> dict[int, str]:
    """Rows with NaN or +inf logits, or no finite logit at all (-inf is a legitimate mask)."""
    sums = logits.sum(-1)  # one sum per row decides; NaN or +-inf anywhere makes it non-finite
    errors: dict[int, str] = {}
    for row in (~torch.isfinite(sums)).nonzero().flatten().tolist():
        values = logits[row]
        if bool(values.isnan().any()):
            problem = "NaN"
        elif bool(values.isposinf().any()):
            problem = "+inf"
        elif bool(values.isneginf().all()):
            problem = "only -inf"
        else:
            continue  # finite values whose sum overflowed, or some -inf among finite ones
        errors[row] = f"the model's next-token logits hold {problem} for this request; it cannot be sampled"
    return errors
