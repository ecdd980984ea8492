"""Log-probabilities of sampled and prompt tokens, batched over the rows that ask for them.

Values are the log-softmax of the model's raw next-token logits, before temperature, penalties,
logit bias or grammar masks touch them (vLLM's default): what the model thinks, not what the
sampler drew from. Each entry also carries the token's rank (1 = the most likely; ties count
against it, as vLLM counts) and the N most likely tokens of its position.

- `Logprobs.begin(logits, params)` runs right after the forward, before anything changes the
  logits, and keeps the log-softmax of the rows whose request asks (`SamplingParams.logprobs`);
  `Logprobs.finish(pending, tokens)` then gives each of those rows its sampled token's entry.
- `Logprobs.score_prompt(logits, targets, counts)` scores prompt tokens (echo) from the extra rows
  the forward returned for them: row i's logits score token `targets[i]`.

Rows that ask for nothing cost nothing: a step where no row asks does no work here. Token texts
come from `TokenTexts`, which must be used by one thread (the engine's). This module knows
neither the scheduler nor the wire formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.request import SamplingParams, TokenLogprob, TopLogprob


class TokenTexts:
    """Token id -> the token alone as text, as vLLM shows it (`convert_tokens_to_string` of the one
    token: a piece of a multi-byte character reads U+FFFD). Cached; not thread-safe."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            token = self._tokenizer.convert_ids_to_tokens(token_id)
            text = "" if token is None else self._tokenizer.convert_tokens_to_string([token])
            self._cache[token_id] = text
        return text


def _ranks(
    logprobs: torch.Tensor,  # [m, vocab]
    values: torch.Tensor,  # [m, 1] the chosen tokens' log-probs
    chosen: torch.Tensor,  # [m, 1] the chosen tokens
    head: tuple[torch.Tensor, torch.Tensor],  # ([m, k] top values, [m, k] their ids), most likely first
) -> torch.Tensor:  # [m]
    """Each chosen token's rank: the number of tokens at least as likely (itself included).

    A token found in the head before a strictly smaller value has its rank there; the others
    (outside the head, or tied with what follows) count over the whole row."""
    top_values, top_ids = head
    k = top_ids.shape[-1]
    hit = top_ids == chosen  # [m, k]
    position = hit.int().argmax(-1)  # [m] first match (0 when none)
    after = top_values.gather(-1, (position + 1).clamp(max=k - 1).unsqueeze(-1)).squeeze(-1)
    exact = hit.any(-1) & (position < k - 1) & (after < values.squeeze(-1))
    ranks = position + 1
    rest = (~exact).nonzero().flatten()
    if len(rest):
        ranks[rest] = (logprobs.index_select(0, rest) >= values.index_select(0, rest)).sum(-1)
    return ranks


def _no_text(token_id: int) -> str:
    return ""


@dataclass(frozen=True)
class PendingLogprobs:
    """What `begin` kept of one step's asking rows, until their tokens are sampled."""

    rows: list[int]  # indices into the step's sampled rows
    counts: list[int]  # alternatives each row asks for
    logprobs: torch.Tensor  # [m, vocab] log-softmax of those rows' raw logits
    top_values: torch.Tensor  # [m, k] k = max(counts) + 1, most likely first
    top_ids: torch.Tensor  # [m, k]


class Logprobs:
    """Computes log-prob entries for one engine thread (holds its token-text cache)."""

    def __init__(self, texts: TokenTexts | None = None) -> None:
        self.text = texts if texts is not None else _no_text

    def begin(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> PendingLogprobs | None:
        """logits: [N, vocab] raw, one row per sampled sequence; None when no row asks."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return None
        counts = [params[i].logprobs or 0 for i in rows]
        picked = logits if len(rows) == logits.shape[0] else logits.index_select(0, torch.tensor(rows))
        logprobs = torch.log_softmax(picked, -1)  # [m, vocab]
        # One more than asked: a token found in the head with a smaller value after it has its rank there.
        top_values, top_ids = logprobs.topk(min(max(counts) + 1, logprobs.shape[-1]))
        return PendingLogprobs(rows, counts, logprobs, top_values, top_ids)

    def finish(self, pending: PendingLogprobs | None, tokens: Sequence[int]) -> dict[int, TokenLogprob]:
        """Each asking row's entry for its sampled token (tokens: one per sampled row, -1 = failed)."""
        if pending is None:
            return {}
        chosen = torch.tensor([max(tokens[r], 0) for r in pending.rows]).unsqueeze(-1)  # [m, 1]
        values = pending.logprobs.gather(-1, chosen)  # [m, 1]
        ranks = _ranks(pending.logprobs, values, chosen, (pending.top_values, pending.top_ids))
        entries = self._entries(
            chosen.squeeze(-1).tolist(),
            values.squeeze(-1).tolist(),
            ranks.tolist(),
            (pending.top_ids.tolist(), pending.top_values.tolist(), pending.counts),
        )
        return {row: entry for row, entry in zip(pending.rows, entries, strict=True) if tokens[row] >= 0}

    def score_prompt(
        self, logits: torch.Tensor, targets: Sequence[int], counts: Sequence[int]
    ) -> list[TokenLogprob]:
        """logits: [M, vocab] raw, row i scoring prompt token targets[i] with counts[i] alternatives."""
        if not targets:
            return []
        logprobs = torch.log_softmax(logits, -1)  # [M, vocab]
        chosen = torch.tensor(list(targets)).unsqueeze(-1)
        values = logprobs.gather(-1, chosen)
        top_values, top_ids = logprobs.topk(min(max(counts) + 1, logprobs.shape[-1]))
        ranks = _ranks(logprobs, values, chosen, (top_values, top_ids))
        return self._entries(
            list(targets),
            values.squeeze(-1).tolist(),
            ranks.tolist(),
            (top_ids.tolist(), top_values.tolist(), list(counts)),
        )

    def first_prompt_token(self, token_id: int) -> TokenLogprob:
        """The prompt's first token: nothing before it, so no log-prob."""
        return TokenLogprob(token_id, self.text(token_id), None, 0)

    def _entries(
        self,
        token_ids: list[int],
        values: list[float],
        ranks: list[int],
        top: tuple[list[list[int]], list[list[float]], list[int]],
    ) -> list[TokenLogprob]:
        text = self.text
        top_ids, top_values, counts = top
        return [
            TokenLogprob(
                token_id,
                text(token_id),
                value,
                rank,
                tuple(TopLogprob(t, text(t), v) for t, v in zip(ids[:count], vals[:count], strict=True)),
            )
            for token_id, value, rank, ids, vals, count in zip(
                token_ids, values, ranks, top_ids, top_values, counts, strict=True
            )
        ]
