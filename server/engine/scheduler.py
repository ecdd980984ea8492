"""Who runs in the next step, and what a step's tokens do to each sequence.

The scheduler owns every sequence's status. `add` (any thread) queues a sequence or refuses it
when the queue is full; the rest runs on the engine thread: `schedule` admits waiting sequences
into KV slots and their adapters into device slots, then plans one step (a decode token for
every prefilled sequence, prompt chunks in the rest of the token budget); `postprocess` appends
the sampled tokens, applies stop and length rules and releases what finished. An admission
error (an adapter that failed to load or to reach its slot, a KV cache that cannot grow) fails
that sequence alone; a step's row error fails that row's sequence alone.

Used KV slots are always 0..n-1: releasing one moves the highest into the hole, so the decode
batch can usually view the KV cache instead of gathering it. Every method returns the outputs to
deliver (`Delivery`); the scheduler never calls a sink. It knows neither the model's forward nor
how tokens are sampled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from server.config import EngineConfig
from server.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    FinishReason,
    RequestOutput,
    TokenLogprob,
)
from server.engine.sequence import Sequence, Status
from server.model.kv_cache import KVCache


@dataclass(frozen=True)
class Delivery:
    """An output for a sequence's sink; `finished` ones also go to the engine's events."""

    seq: Sequence
    output: RequestOutput


@dataclass(frozen=True)
class StepPlan:
    decodes: list[Sequence]  # one token each, in KV-slot order
    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)
    sampled: list[Sequence]  # those that get a next token: decodes, then prompts this step completes
    # (a prompt that is only scored, max_tokens 0, gets none: it finishes once read)
    failed: list[Delivery]  # sequences that could not be admitted or planned

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass(frozen=True)
class StepResult:
    """What the runner made of a plan: one token per `plan.sampled` sequence (-1 where a row failed),
    or the error of a forward that raised (then every sequence the step ran fails)."""

    tokens: list[int]
    errors: dict[int, str]  # index into plan.sampled -> why that row failed
    failure: str | None = None
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # index into plan.sampled -> entry
    # index into plan.prefills -> entries of the prompt tokens that chunk scored (echo)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)


class AdapterSlots(Protocol):
    """What admission needs from the adapter tiers (server.engine.adapters.AdapterManager)."""

    @property
    def num_slots(self) -> int: ...

    def acquire(self, seq: Sequence) -> tuple[tuple[int, float], ...] | None: ...

    def release(self, slots: Seq[tuple[int, float]]) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCache,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        adapters: AdapterSlots | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.adapters = adapters
        self._lock = threading.Lock()  # guards `waiting` and `_closed` against add() from other threads
        self.waiting: deque[Sequence] = deque()  # appended by add(), removed on the engine thread only
        self.running: list[Sequence] = []  # hold a KV slot, in admission order; engine thread only
        self._slot_owner: list[Sequence | None] = [None] * config.max_running
        self._closed = False

    # -- any thread ------------------------------------------------------------------------------

    def add(self, seq: Sequence, on_accept: Callable[[], None] | None = None) -> None:
        """Queue `seq`; raises EngineOverloaded when `max_queue` sequences wait, EngineUnavailable once
        closed. `on_accept` runs (under the queue lock) just before it is queued."""
        with self._lock:
            if self._closed:
                raise EngineUnavailable("the engine is not running")
            if len(self.waiting) >= self.config.max_queue:
                raise EngineOverloaded(
                    f"the queue is full ({self.config.max_queue} requests waiting); retry later"
                )
            if on_accept is not None:
                on_accept()
            self.waiting.append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def waiting_sequences(self) -> list[Sequence]:
        with self._lock:
            return list(self.waiting)

    # -- engine thread ---------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def can_step(self) -> bool:
        """False only while nothing runs and every waiting sequence waits for its adapters' loads."""
        return bool(self.running) or any(seq.loads_done for seq in self.waiting_sequences())

    def schedule(self) -> StepPlan:
        """Admit what fits, then plan one step: every prefilled sequence decodes one token and
        prompt chunks fill the rest of the token budget, oldest first."""
        failed = self._admit()
        failed += self._grow_kv()
        decodes = sorted((s for s in self.running if s.prefilled), key=lambda s: s.kv_slot)
        budget = self.config.max_batched_tokens - len(decodes)
        prefills = []
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilled:
                chunk = min(budget, seq.prompt_len - seq.num_cached)
                prefills.append((seq, chunk))
                budget -= chunk
        completed = [
            seq for seq, chunk in prefills if seq.num_cached + chunk >= seq.prompt_len and seq.generates
        ]
        return StepPlan(decodes, prefills, decodes + completed, failed)

    def postprocess(self, plan: StepPlan, result: StepResult) -> list[Delivery]:
        """Advance the planned sequences, append their tokens and release the finished ones."""
        deliveries = list(plan.failed)
        if result.failure is not None:
            return deliveries + self.fail_running(result.failure)
        for index, (seq, chunk) in enumerate(plan.prefills):
            seq.num_cached += chunk
            seq.new_prompt_logprobs += result.prompt_logprobs.get(index, ())
        for seq in plan.decodes:
            seq.num_cached += 1
        # A prompt only scored (max_tokens 0) is done once read; released only now that every
        # sequence's num_cached counts this step (a release may move another's KV slot).
        for seq, _ in plan.prefills:
            if seq.prefilled and not seq.generates and seq.status is Status.RUNNING:
                deliveries.append(self.finish(seq, FinishReason.LENGTH))
        for row, (seq, token) in enumerate(zip(plan.sampled, result.tokens, strict=True)):
            if seq.status is not Status.RUNNING:
                continue
            if row in result.logprobs:
                seq.new_logprobs.append(result.logprobs[row])
            error = result.errors.get(row)
            if error is None:
                try:
                    deliveries.append(self._append(seq, token))
                    continue
                except Exception as exc:  # e.g. detokenizing: this request alone fails
                    error = f"could not process token {token}: {exc!r}"
            deliveries.append(self.finish(seq, FinishReason.ERROR, error=error))
        return deliveries

    def abort(self, seq: Sequence) -> list[Delivery]:
        """Cancel `seq` if it has not finished (an abort that comes late changes nothing)."""
        if seq.status is Status.FINISHED:
            return []
        return [self.finish(seq, FinishReason.CANCELLED)]

    def fail_running(self, error: str) -> list[Delivery]:
        """A step's forward failed: every sequence it ran fails."""
        return [self.finish(seq, FinishReason.ERROR, error=error) for seq in list(self.running)]

    def close(self, reason: FinishReason, error: str | None = None) -> list[Delivery]:
        """Refuse new sequences and finish every one still here (engine shutdown)."""
        with self._lock:
            self._closed = True
            waiting = list(self.waiting)
        live = list(self.running) + waiting
        return [self.finish(seq, reason, error=error) for seq in live]

    def finish(
        self, seq: Sequence, reason: FinishReason, tokens: tuple[int, ...] = (), error: str | None = None
    ) -> Delivery:
        """Release `seq` (its KV slot, its adapter slots) and make its final output."""
        if seq.status is Status.WAITING:
            with self._lock:
                self.waiting.remove(seq)
        elif seq.status is Status.RUNNING:
            self._release_kv_slot(seq)
        if seq.adapter_slots:
            assert self.adapters is not None
            self.adapters.release(seq.adapter_slots)
            seq.adapter_slots = ()
        seq.adapter_loads = ()
        seq.status = Status.FINISHED
        return Delivery(seq, self._output(seq, seq.detokenizer.take(final=True), tokens, reason, error))

    # -- admission -------------------------------------------------------------------------------

    def _admit(self) -> list[Delivery]:
        failed: list[Delivery] = []
        for seq in self.waiting_sequences():
            if len(self.running) >= self.config.max_running:
                break
            if not seq.loads_done:
                continue  # one that is not ready waits without holding back those behind it
            try:
                slots = self._acquire_adapters(seq)
            except Exception as exc:  # this request's adapters cannot be served: it alone fails
                failed.append(self.finish(seq, FinishReason.ERROR, error=_adapter_error(seq, exc)))
                continue
            if slots is None:
                continue  # every device slot is pinned by running requests: wait for one
            with self._lock:
                self.waiting.remove(seq)
            seq.adapter_slots = slots
            seq.adapter_loads = ()  # the device-ready forms are in their slots now
            seq.kv_slot = len(self.running)
            self._slot_owner[seq.kv_slot] = seq
            seq.status = Status.RUNNING
            self.running.append(seq)
        return failed

    def _acquire_adapters(self, seq: Sequence) -> tuple[tuple[int, float], ...] | None:
        if not seq.adapter_loads:
            return ()
        for load in seq.adapter_loads:
            load.result()  # raises the load's error (a cancelled load raises CancelledError)
        assert self.adapters is not None
        if len(seq.adapter_loads) > self.adapters.num_slots:
            raise ValueError(
                f"it needs {len(seq.adapter_loads)} adapters at once but the server has "
                f"{self.adapters.num_slots} device slots (--max-slots)"
            )
        return self.adapters.acquire(seq)

    def _grow_kv(self) -> list[Delivery]:
        """Make the KV cache long enough for this step; a sequence it cannot grow for fails alone."""
        needed = max((s.num_cached + self._chunk_bound(s) for s in self.running), default=0)
        if needed <= self.kv.capacity:
            return []
        try:
            self.kv.ensure_capacity(needed)
            return []
        except Exception as exc:  # e.g. out of memory: fail those that need more than there is
            error = f"the KV cache could not grow to {needed} positions: {exc!r}"
            capacity = self.kv.capacity
            too_long = [s for s in self.running if s.num_cached + self._chunk_bound(s) > capacity]
            return [self.finish(seq, FinishReason.ERROR, error=error) for seq in too_long]

    def _chunk_bound(self, seq: Sequence) -> int:
        """The most positions `seq` can add in one step: its whole prompt rest, or one decode token."""
        if seq.prefilled:
            return 1
        return min(self.config.max_batched_tokens, seq.prompt_len - seq.num_cached)

    def _release_kv_slot(self, seq: Sequence) -> None:
        self.running.remove(seq)
        hole, last = seq.kv_slot, len(self.running)  # `last` is the highest used slot index now
        self._slot_owner[hole] = None
        if hole != last:
            mover = self._slot_owner[last]
            assert mover is not None
            self.kv.move(last, hole, mover.num_cached)
            mover.kv_slot = hole
            self._slot_owner[hole], self._slot_owner[last] = mover, None
        seq.kv_slot = -1

    # -- tokens ----------------------------------------------------------------------------------

    def _append(self, seq: Sequence, token: int) -> Delivery:
        params = seq.request.sampling
        seq.output_ids.append(token)
        if len(seq.output_ids) == 1:
            seq.first_token_at = time.monotonic()
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        if not is_eos:  # stop strings count from min_tokens on (vLLM's rule)
            seq.detokenizer.add(token, check_stop=len(seq.output_ids) >= params.min_tokens)
        reason = None
        if is_eos or token in params.stop_token_ids or seq.detokenizer.stopped:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= params.max_tokens or seq.num_cached + 1 >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            return self.finish(seq, reason, (token,))
        return Delivery(seq, self._output(seq, seq.detokenizer.take(final=False), (token,)))

    @staticmethod
    def _output(
        seq: Sequence,
        text: str,
        tokens: tuple[int, ...],
        reason: FinishReason | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request.request_id,
            text=text,
            token_ids=tokens,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output_ids),
            error=error,
            adapter_tier=seq.adapter_tier,
            logprobs=_taken(seq.new_logprobs),
            prompt_logprobs=_taken(seq.new_prompt_logprobs),
        )


def _taken(entries: list[TokenLogprob]) -> tuple[TokenLogprob, ...]:
    """The entries not delivered yet, for an output: `entries` is emptied."""
    taken = tuple(entries)
    entries.clear()
    return taken


def _adapter_error(seq: Sequence, exc: BaseException) -> str:
    label = seq.request.adapters.label
    return f"adapter {label!r} could not be served: {exc}"
