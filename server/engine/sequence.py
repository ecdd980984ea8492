"""One request inside the engine: its status, its KV and adapter slots, and what it has generated.

A `Sequence` is the handle `Engine.submit` returns. Its `status` is the one source of truth of
where it is (waiting -> running -> finished, or waiting -> finished); only the scheduler changes
it, on the engine thread. Nothing here is keyed by the client's request id.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.detokenizer import Detokenizer
from server.engine.request import PreparedRequest, RequestHandle, RequestOutput, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"  # submitted; no KV slot yet
    RUNNING = "running"  # holds a KV slot (and its adapters' device slots)
    FINISHED = "finished"  # released; its final output was delivered


@dataclass(eq=False)
class Sequence(RequestHandle):
    request: PreparedRequest
    sink: Callable[[RequestOutput], None]
    detokenizer: Detokenizer
    generator: torch.Generator | None  # the request's own when seeded; None = the engine's
    submitted_at: float  # time.monotonic() at submit, for the latency metrics
    status: Status = Status.WAITING
    kv_slot: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    # The device-ready forms of its adapters, made on the loader thread (one per adapter of the
    # choice); set at submit, dropped once the adapters are in device slots.
    adapter_loads: tuple[Future[Any], ...] = ()
    adapter_slots: tuple[tuple[int, float], ...] = ()  # (device slot, weight) pinned while running
    first_token_at: float = 0.0  # time.monotonic() of the first sampled token; 0.0 = none yet
    # Where its adapters were when it arrived (AdapterManager.tier): device | host | disk; "" = base.
    adapter_tier: str = ""
    # Log-prob entries made but not delivered yet (of sampled tokens; of prompt tokens, echo).
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Its constraint's matcher (server.engine.structured), made on the first step that samples it.
    grammar_matcher: Any = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_cached >= self.prompt_len

    @property
    def generates(self) -> bool:
        """False for a request that only scores its prompt (max_tokens 0 with prompt_logprobs)."""
        return self.request.sampling.max_tokens > 0

    @property
    def loads_done(self) -> bool:
        return all(load.done() for load in self.adapter_loads)
