"""Who runs in the next step: admission into KV slots, decode tokens, prefill chunks, release.

Used slots are always 0..n-1: releasing a slot moves the highest one into the hole, so the
decode batch can usually view the KV cache instead of gathering it. Runs on the engine thread
only; nothing here is thread-safe or knows about the model's forward.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from adapters_store import LoadedAdapter
from server.config import EngineConfig
from server.engine.detokenizer import Detokenizer
from server.engine.request import GenerationRequest, RequestOutput
from server.model.kv_cache import KVCache


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    sink: Callable[[RequestOutput], None]
    generator: torch.Generator | None  # the request's own when seeded; None = the sampler's
    detokenizer: Detokenizer
    slot: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    adapter_future: Future[LoadedAdapter] | None = None  # the adapter's disk -> host load
    adapter_slot: int = -1  # device slot pinned for the adapter while running; -1 = base model
    submitted_at: float = 0.0  # time.monotonic() at submit, for the latency metrics
    first_token_at: float = 0.0  # time.monotonic() when the first token was sampled; 0.0 = none yet

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_cached >= self.prompt_len

    @property
    def next_position(self) -> int:
        return self.num_cached


@dataclass(frozen=True)
class StepPlan:
    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCache) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # holds a slot, in admission order
        self._slot_owner: list[Sequence | None] = [None] * config.max_running

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, ready: Callable[[Sequence], bool]) -> StepPlan:
        """Admit what fits, then plan one step: every prefilled sequence decodes one token and
        prompt chunks fill the rest of the token budget, oldest first.

        `ready(seq)` says whether a waiting sequence may start now (its adapter is in a device
        slot); one that is not ready waits without holding back those behind it.
        """
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_running:
                break
            if not ready(seq):
                continue
            self.waiting.remove(seq)
            seq.slot = len(self.running)
            self._slot_owner[seq.slot] = seq
            self.running.append(seq)
        decodes = sorted((s for s in self.running if s.prefilled), key=lambda s: s.slot)
        budget = self.config.max_batched_tokens - len(decodes)
        prefills = []
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilled:
                chunk = min(budget, seq.prompt_len - seq.num_cached)
                prefills.append((seq, chunk))
                budget -= chunk
        needed = max([s.num_cached + 1 for s in decodes] + [s.num_cached + n for s, n in prefills], default=0)
        self.kv.ensure_capacity(needed)
        return StepPlan(decodes, prefills)

    def release(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its slot (moving the last slot into it)."""
        if seq.slot < 0:
            self.waiting.remove(seq)
            return
        self.running.remove(seq)
        hole, last = seq.slot, len(self.running)  # `last` is the highest used slot index now
        self._slot_owner[hole] = None
        if hole != last:
            mover = self._slot_owner[last]
            assert mover is not None
            self.kv.move(last, hole, mover.num_cached)
            mover.slot = hole
            self._slot_owner[hole], self._slot_owner[last] = mover, None
        seq.slot = -1

    def slots_used(self) -> int:
        return len(self.running)
