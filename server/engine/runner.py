"""The model runner: a step plan in, one token per sampled sequence out.

It lays the plan's tokens out as one flat batch (decode tokens first, then prompt chunks),
tags every row with its adapters' (device slot, weight) pairs, runs the model's forward over the
KV cache and samples the next tokens. Rows whose request asks for log-probabilities get them from
the raw logits before anything else reads them, and an echo request's prompt chunk gets the
logits of its prompt positions too, to score its prompt (server.engine.logprobs). A row that cannot be sampled fails alone (see
`StepResult.errors`); a forward that raises fails the whole step, and the caller decides what
that means for the sequences. It does not admit, stop or release anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch

from server.engine.logits_processors import LogitsProcessor
from server.engine.logprobs import Logprobs
from server.engine.request import TokenLogprob
from server.engine.sampling import Sampler
from server.engine.scheduler import StepPlan, StepResult
from server.engine.sequence import Sequence
from server.engine.structured import GrammarMasks
from server.model.batch import DecodeSeq, StepBatch
from server.model.kv_cache import KVCache
from server.model.llama import LlamaModel

log = logging.getLogger(__name__)
T = TypeVar("T")

TokenPairs = tuple[tuple[int, float], ...]  # a token's (device slot, weight) pairs; () = base model


class AdapterMetadata(Protocol):
    def step_metadata(self, token_pairs: list[TokenPairs], device: torch.device) -> Any:
        """The step's adapter metadata for the model (None when no token has an adapter)."""


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv: KVCache,
        sampler: Sampler,
        adapters: AdapterMetadata | None = None,
        logprobs: Logprobs | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,  # None: one that knows no EOS ids
    ) -> None:
        self.model = model
        self.kv = kv
        self.sampler = sampler
        self.adapters = adapters
        self.logprobs = logprobs if logprobs is not None else Logprobs()
        self.logits_processor = logits_processor or LogitsProcessor(frozenset())
        self.device = model.embed_tokens.device
        self.grammar = GrammarMasks()  # structured output's token masks (rows that ask for it only)

    def run(self, plan: StepPlan) -> StepResult:
        if plan.empty:
            return StepResult([], {})
        sampled = plan.sampled
        params = [s.request.sampling for s in sampled]
        scored = [_scored_prompt_tokens(s, n) for s, n in plan.prefills]  # per chunk; () = none
        masks = self.grammar.begin(sampled)  # the constrained rows' masks fill beside the forward
        try:
            what = "engine step"
            logits = self.model(self._build_batch(plan, scored), self.kv)  # [sampled + scored rows, vocab]
            what = "prompt log-probs"
            prompt_logprobs = self._score_prompts(plan, scored, logits[len(sampled) :])
        except Exception as exc:
            log.exception("%s failed; failing the requests the step ran", what)
            if masks is not None:
                masks.wait()  # the worker is done with the step's buffer before the next step reuses it
            return StepResult([], {}, failure=f"{what} failed: {exc!r}")
        logits = logits[: len(sampled)]
        # (1) log-probs from the raw logits, before anything changes them
        pending, logprob_error = self._logprobs(lambda: self.logprobs.begin(logits, params))
        # (2) logit_bias, min_tokens and penalties, in place; rows that use none are not touched
        unprocessed = self.logits_processor.apply(logits, sampled)  # {row: why}, those fail alone
        if masks is not None:  # (3) the grammar's token mask
            masks.apply(logits)
        result = self.sampler.sample(logits, params, [s.generator for s in sampled])
        tokens, errors = result.tokens, result.errors
        if unprocessed:
            tokens = [-1 if row in unprocessed else t for row, t in enumerate(tokens)]
            errors = errors | unprocessed
        if masks is not None:  # (5) the matchers move past the sampled tokens
            errors = masks.advance(tokens, errors)
        logprobs, finish_error = self._logprobs(lambda: self.logprobs.finish(pending, tokens))
        if logprob_error or finish_error:  # the rows that asked fail alone
            errors = dict(errors)
            for row, p in enumerate(params):
                if p.logprobs is not None:
                    errors[row] = f"log-probs failed: {logprob_error or finish_error}"
        return StepResult(tokens, errors, logprobs=logprobs or {}, prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _logprobs(compute: Callable[[], T]) -> tuple[T | None, str | None]:
        try:
            return compute(), None
        except Exception as exc:
            log.exception("log-probs of an engine step failed; failing the requests that asked")
            return None, repr(exc)

    def _score_prompts(
        self, plan: StepPlan, scored: list[tuple[int, ...]], logits: torch.Tensor
    ) -> dict[int, list[TokenLogprob]]:
        """Each echo chunk's prompt entries (index into plan.prefills -> entries) from the scored
        rows' logits [sum of len(scored), vocab], in chunk order."""
        chunks = [
            (index, seq, tokens)
            for index, ((seq, _), tokens) in enumerate(zip(plan.prefills, scored, strict=True))
            if seq.request.sampling.prompt_logprobs is not None
        ]
        if not chunks:
            return {}
        targets = [t for _, _, tokens in chunks for t in tokens]
        counts = [seq.request.sampling.prompt_logprobs or 0 for _, seq, tokens in chunks for _ in tokens]
        entries = iter(self.logprobs.score_prompt(logits, targets, counts))
        by_chunk: dict[int, list[TokenLogprob]] = {}
        for index, seq, tokens in chunks:
            first = (
                [] if seq.num_cached else [self.logprobs.first_prompt_token(seq.request.prompt_token_ids[0])]
            )
            by_chunk[index] = first + [next(entries) for _ in tokens]
        return by_chunk

    def _build_batch(self, plan: StepPlan, scored: list[tuple[int, ...]]) -> StepBatch:
        decodes = [DecodeSeq(s.kv_slot, s.num_cached, s.output_ids[-1]) for s in plan.decodes]
        prefills = [
            (
                s.kv_slot,
                s.num_cached,
                list(s.request.prompt_token_ids[s.num_cached : s.num_cached + n]),
                s.num_cached + n >= s.prompt_len and s.generates,
            )
            for s, n in plan.prefills
        ]
        adapter_step = None
        if self.adapters is not None:
            # Rows are decode tokens, then each prefill chunk: the adapter slots of every row.
            pairs: list[TokenPairs] = [s.adapter_slots for s in plan.decodes]
            for s, n in plan.prefills:
                pairs.extend([s.adapter_slots] * n)
            if any(pairs):  # base-only steps skip the adapter term entirely
                adapter_step = self.adapters.step_metadata(pairs, self.device)
        prompt_scores = [len(tokens) for tokens in scored] if any(scored) else None
        return StepBatch.build(decodes, prefills, self.device, adapter_step, prompt_scores)


def _scored_prompt_tokens(seq: Sequence, chunk: int) -> tuple[int, ...]:
    """The prompt tokens an echo request's chunk scores: position p's logits score token p + 1, so
    a chunk over positions [start, start + chunk) scores tokens start + 1 .. start + chunk, never past
    the prompt's last token (the last position's logits pick the first generated token)."""
    if seq.request.sampling.prompt_logprobs is None:
        return ()
    start, prompt = seq.num_cached, seq.request.prompt_token_ids
    return prompt[start + 1 : min(start + chunk, len(prompt) - 1) + 1]
