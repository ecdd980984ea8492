"""What the harness plans and what it records: plain dataclasses shared by every part.

Times are seconds since the run's start (`time.monotonic()` minus the start). Latencies are
measured from the *planned* send time, so a send that went out late (the client could not keep
up) shows as latency, never hidden (no coordinated omission); the lateness itself is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LOAD = "load"  # a request of the workload
CANARY = "canary"  # a greedy request whose answer is checked against the one recorded before the load

# Error kinds (RequestRecord.error); a server may add its own detail in `error_detail`.
ERR_REFUSED = "refused"  # 429 / RESOURCE_EXHAUSTED: the server said it is overloaded
ERR_CLIENT = "bad_request"  # other 4xx / INVALID_ARGUMENT, NOT_FOUND, ...
ERR_SERVER = "server_error"  # 5xx / INTERNAL, UNAVAILABLE, ...
ERR_CONNECTION = "connection"  # could not connect, connection reset mid-answer
ERR_TIMEOUT = "timeout"  # no answer within the request timeout
ERR_INCOMPLETE = "incomplete"  # the answer ended without a finish (stream cut, finish_reason error)
ERR_OTHER = "other"  # anything else the client met (a bad event, the base model's id not listed, ...)
ERR_CANARY = "canary_mismatch"  # a canary's tokens differ from its adapter's recorded answer


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the workload, decided before the run starts (all from the seed)."""

    index: int
    adapter: str  # "" = the base model
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    at_s: float | None = None  # planned send time; None in a closed loop (sent when a client is free)
    kind: str = LOAD
    prompt_text: str | None = None  # a canary's prompt (sent as text); load prompts are token ids


@dataclass
class RequestRecord:
    """What happened to one request."""

    index: int
    adapter: str
    kind: str
    planned_s: float  # when it should have been sent (closed loop: when it was sent)
    sent_s: float  # when it was sent (>= planned_s; the difference is the client's lateness)
    prompt_tokens: int  # as sent (or as the server counted, when it says)
    max_tokens: int
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one entry per output token
    end_s: float | None = None
    output_tokens: int = 0
    error: str | None = None  # one of the ERR_* kinds, None when it succeeded
    error_detail: str = ""
    tier: str | None = None  # the adapter's tier when the request arrived (device | host | disk), if told
    served_by: str | None = None  # the adapter the server says served it
    replica: str | None = None  # the replica that answered (`x-loramux-replica`), behind Ray Serve
    token_ids: list[int] = field(default_factory=list)  # kept for canaries only
    text: str = ""  # kept for canaries only

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.planned_s

    @property
    def e2e(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.planned_s

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output tokens (tokens that arrived in one chunk give 0.0 gaps)."""
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def lateness(self) -> float:
        return self.sent_s - self.planned_s


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """count, mean, min, p50, p90, p99, max of `values` (linear-interpolated percentiles; None when empty)."""
    if not values:
        return {"count": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": math.fsum(ordered) / len(ordered),
        "min": ordered[0],
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile of sorted `ordered` (numpy's default 'linear' method)."""
    assert ordered, "percentile of nothing"
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
