"""The model runner: a step plan in, one token per sampled sequence out.

It lays the plan's tokens out as one flat batch (decode tokens first, then prompt chunks),
tags every row with its adapters' (device slot, weight) pairs, runs the model's forward over the
KV cache and samples the next tokens. A row that cannot be sampled fails alone (see
`StepResult.errors`); a forward that raises fails the whole step, and the caller decides what
that means for the sequences. It does not admit, stop or release anything.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from server.engine.sampling import Sampler
from server.engine.scheduler import StepPlan, StepResult
from server.engine.structured import GrammarMasks
from server.model.batch import DecodeSeq, StepBatch
from server.model.kv_cache import KVCache
from server.model.llama import LlamaModel

log = logging.getLogger(__name__)

TokenPairs = tuple[tuple[int, float], ...]  # a token's (device slot, weight) pairs; () = base model


class AdapterMetadata(Protocol):
    def step_metadata(self, token_pairs: list[TokenPairs], device: torch.device) -> Any:
        """The step's adapter metadata for the model (None when no token has an adapter)."""


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv: KVCache, sampler: Sampler, adapters: AdapterMetadata | None = None
    ) -> None:
        self.model = model
        self.kv = kv
        self.sampler = sampler
        self.adapters = adapters
        self.device = model.embed_tokens.device
        self.grammar = GrammarMasks()  # structured output's token masks (rows that ask for it only)

    def run(self, plan: StepPlan) -> StepResult:
        if plan.empty:
            return StepResult([], {})
        sampled = plan.sampled
        masks = self.grammar.begin(sampled)  # the constrained rows' masks fill beside the forward
        try:
            logits = self.model(self._build_batch(plan), self.kv)  # [len(plan.sampled), vocab]
        except Exception as exc:
            log.exception("the forward of an engine step failed; failing the requests it ran")
            if masks is not None:
                masks.wait()
            return StepResult([], {}, failure=f"engine step failed: {exc!r}")
        if masks is not None:  # (3) the grammar's token mask
            masks.apply(logits)
        result = self.sampler.sample(
            logits, [s.request.sampling for s in sampled], [s.generator for s in sampled]
        )
        errors = result.errors
        if masks is not None:  # (5) the matchers move past the sampled tokens
            errors = masks.advance(result.tokens, errors)
        return StepResult(result.tokens, errors)

    def _build_batch(self, plan: StepPlan) -> StepBatch:
        decodes = [DecodeSeq(s.kv_slot, s.num_cached, s.output_ids[-1]) for s in plan.decodes]
        prefills = [
            (
                s.kv_slot,
                s.num_cached,
                list(s.request.prompt_token_ids[s.num_cached : s.num_cached + n]),
                s.num_cached + n >= s.prompt_len,
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
        return StepBatch.build(decodes, prefills, self.device, adapter_step)
