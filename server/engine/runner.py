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

from server.engine.logits_processors import LogitsProcessor
from server.engine.sampling import Sampler
from server.engine.scheduler import StepPlan, StepResult
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
        self,
        model: LlamaModel,
        kv: KVCache,
        sampler: Sampler,
        adapters: AdapterMetadata | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,  # None: one that knows no EOS ids
    ) -> None:
        self.model = model
        self.kv = kv
        self.sampler = sampler
        self.adapters = adapters
        self.logits_processor = logits_processor or LogitsProcessor(frozenset())
        self.device = model.embed_tokens.device

    def run(self, plan: StepPlan) -> StepResult:
        if plan.empty:
            return StepResult([], {})
        try:
            logits = self.model(self._build_batch(plan), self.kv)  # [len(plan.sampled), vocab]
        except Exception as exc:
            log.exception("the forward of an engine step failed; failing the requests it ran")
            return StepResult([], {}, failure=f"engine step failed: {exc!r}")
        sampled = plan.sampled
        # logit_bias, min_tokens and penalties, in place; rows that use none are not touched
        unprocessed = self.logits_processor.apply(logits, sampled)  # {row: why}, those fail alone
        result = self.sampler.sample(
            logits, [s.request.sampling for s in sampled], [s.generator for s in sampled]
        )
        tokens = [-1 if row in unprocessed else t for row, t in enumerate(result.tokens)]
        return StepResult(tokens, result.errors | unprocessed)

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
