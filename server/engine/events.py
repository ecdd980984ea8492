"""What the engine tells observers, and the snapshot of its state they may read.

The engine reports each finished or refused request and each adapter load through an
`EngineEvents` it is handed (metrics subscribe where the server is assembled), and offers a
`EngineSnapshot` built from in-memory state only: reading one never touches the filesystem
and costs the same with 8 or 10,000 adapters on disk. The engine never imports metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

UNKNOWN_ADAPTER = "<unknown>"  # the label of a refused request naming an adapter nobody can serve


@dataclass(frozen=True)
class FinishedRequest:
    """One request that left the engine. Times are time.monotonic() seconds; first_token_at 0.0 = none."""

    adapter: str  # the adapter label: the adapter(s), or the base model's name
    outcome: str  # stop | length | cancelled | error
    prompt_tokens: int  # prompt tokens prefilled
    generated_tokens: int
    submitted_at: float
    first_token_at: float
    finished_at: float
    adapter_tier: str = ""  # where its adapters were when it arrived: device | host | disk; "" = base


class EngineEvents(Protocol):
    """Called on the engine's threads; implementations must be quick and must not raise."""

    def request_finished(self, request: FinishedRequest) -> None: ...

    def request_refused(self, adapter: str, outcome: str) -> None:
        """outcome: invalid | overloaded | unavailable | error."""

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        """tier: host (disk -> host: read + validate + device-ready form) | device (the slot copy)."""

    def step_finished(self, seconds: float) -> None:
        """One engine step (plan, forward, sample, deliver) took `seconds` of wall time."""


class NoEvents:
    """The observer of an engine nobody watches."""

    def request_finished(self, request: FinishedRequest) -> None:
        pass

    def request_refused(self, adapter: str, outcome: str) -> None:
        pass

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        pass

    def step_finished(self, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class AdapterSnapshot:
    """The adapter tiers: counts by the highest tier each adapter is in, loads and evictions so far."""

    tiers: dict[str, int] = field(default_factory=dict)  # device | host | disk -> adapters
    host_loads: int = 0
    device_loads: int = 0
    host_evictions: int = 0
    device_evictions: int = 0
    num_slots: int = 0


@dataclass(frozen=True)
class EngineSnapshot:
    num_waiting: int  # submitted, not yet running
    num_running: int  # holding a KV slot
    kv_slots: int
    kv_bytes: int
    running_adapters: tuple[str, ...]  # sorted names of adapters that running requests use
    waiting_adapters: tuple[str, ...]
    adapters: AdapterSnapshot | None  # None: the server serves no adapters
    threads: int = 0  # the engine's intra-op threads now (fewer while the CPUs are contended); 0 = unknown
