"""One access log line per finished generation, on the logger `loramux.access`.

    request_id=cmpl-4f0c…-0 api=http method=stream adapter=sql prompt_tokens=12 completion_tokens=8 latency_ms=412.5 outcome=stop

Keys, always in this order: request_id, api (`http` when the OpenAI shim made the call, which it
says in the call's `loramux-api` metadata; else `grpc`), method (unary | stream), adapter (the
adapter label of the metrics: the adapter, a mixture's names joined by '+', or the base model's
name; "-" before it is known), prompt_tokens, completion_tokens, latency_ms (from the call's
arrival to its end) and outcome: the finish reason (stop | length | cancelled), or for a call
that ended otherwise the gRPC status it ended with, lower case (invalid_argument, not_found,
deadline_exceeded, ...), `cancelled` when the client left. Values with spaces, quotes or '=' are
JSON-quoted. It never logs a prompt, generated text, an error message (which may quote the
prompt) or a credential. Formatting is skipped when the logger is not enabled for INFO.

It knows the shape of a line and where its facts come from, not how requests are served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from adapters_store.lifecycle_log import value
from server.engine.request import RequestOutput

log = logging.getLogger("loramux.access")
API_METADATA_KEY = "loramux-api"  # the OpenAI shim sends "http"
KEYS = (
    "request_id",
    "api",
    "method",
    "adapter",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "outcome",
)


@dataclass
class AccessRecord:
    """What one generation call has shown so far; filled in as the call runs."""

    api: str
    method: str
    request_id: str = "-"
    adapter: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = "unknown"
    started: float = field(default_factory=time.perf_counter)

    def saw(self, output: RequestOutput) -> None:
        """An engine output of the call arrived."""
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = output.completion_tokens
        if output.finished and output.finish_reason is not None:
            self.outcome = str(output.finish_reason)

    def line(self) -> str:
        latency_ms = (time.perf_counter() - self.started) * 1000.0
        values: dict[str, Any] = {
            "request_id": self.request_id,
            "api": self.api,
            "method": self.method,
            "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": f"{latency_ms:.1f}",
            "outcome": self.outcome,
        }
        return " ".join(f"{key}={value(values[key])}" for key in KEYS)


def api_of(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """`http` for a call the OpenAI shim made, else `grpc`."""
    for key, given in metadata or ():
        if key == API_METADATA_KEY:
            return "http" if given in ("http", b"http") else "grpc"
    return "grpc"


@contextmanager
def access_logged(api: str, method: str) -> Iterator[AccessRecord]:
    """A record for one generation call, logged when the call ends, however it ends."""
    from server.grpc_errors import status_for

    record = AccessRecord(api=api, method=method)
    try:
        yield record
    except (asyncio.CancelledError, GeneratorExit):
        record.outcome = "cancelled"  # the client left (or its deadline passed on its side)
        raise
    except Exception as exc:
        code, _message = status_for(exc, "")
        record.outcome = code.name.lower()
        raise
    finally:
        if log.isEnabledFor(logging.INFO):
            log.info(record.line())
