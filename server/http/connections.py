"""What one HTTP connection may hold: deadlines for a request's headers and body, a connection cap.

uvicorn times out only idle keep-alive connections: a client that sends half a request (or
nothing) holds its file descriptor forever, and enough of them exhaust the process's open-file
limit, gRPC and health checks included. `protocol_class(limits)` is uvicorn's h11 protocol with

  - a header deadline: from the connection's opening (or, on a kept-alive connection, from the
    next request's first byte) until its headers are complete, `header_timeout_s`;
  - a body deadline: from the headers until the body is complete, `body_timeout_s`;
    either one missed is answered 408 (unless a response has started) and the connection closed;
  - a cap of `max_connections`: a connection over it first evicts the one that has waited longest
    for its headers (408), so half-sent requests cannot lock out real clients; if none is waiting,
    the new connection is answered 503 and closed at once.

`raise_open_file_limit` lifts the soft RLIMIT_NOFILE to the hard limit; `connection_cap` keeps
RESERVED_FDS descriptors of that limit away from HTTP, for gRPC, its health checks and the model.
This module knows HTTP/1.1 framing (h11) and uvicorn's protocol; it knows nothing about routes.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

logger = logging.getLogger(__name__)

# Descriptors HTTP never takes: gRPC's listener and clients, health checks, model and log files.
RESERVED_FDS = 256
_HEADERS, _BODY = "headers", "body"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def open_file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 2**20


def connection_cap(requested: int, open_files: int) -> int:
    """The HTTP connection cap: `requested`, lowered to leave RESERVED_FDS of `open_files`."""
    return max(1, min(requested, open_files - RESERVED_FDS))


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol under `limits` (pass it as `uvicorn.Config(http=...)`); the class
    keeps the book of one server's connections, so make one per server."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits, "book": ConnectionBook()})


class ConnectionBook:
    """One server's connections: how many are open (not closing), and those waiting for their
    headers, oldest first. Kept as they change, so that a burst of thousands of connections costs
    O(1) each at the cap, not a scan of every open one."""

    def __init__(self) -> None:
        self.open = 0
        self.waiting: dict[LimitedH11Protocol, None] = {}  # insertion order: oldest first


class LimitedH11Protocol(H11Protocol):
    """H11Protocol with header/body deadlines and a connection cap (see the module docstring)."""

    limits: ClassVar[ConnectionLimits]
    book: ClassVar[ConnectionBook]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None  # what the connection is waiting for: headers, body or nothing
        self._deadline: Any = None  # asyncio.TimerHandle
        self._fresh = True  # no request has begun yet
        self._counted = False  # in book.open

    # -- the asyncio.Protocol interface ---------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._counted = True
        self.book.open += 1
        if self.book.open > self.limits.max_connections and not self._evict_slowest():
            self._refuse(503, "the server has too many open HTTP connections; retry later")
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        self._uncount()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.book.open -= 1

    # -- deadlines ------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Start, keep or stop the deadline for what the connection now waits for."""
        if self.transport.is_closing():
            self._enter(None)
            return
        state = self.conn.their_state
        if state is not h11.IDLE:
            self._fresh = False
        if state is h11.SEND_BODY:
            self._enter(_BODY)
        elif state is h11.IDLE and (self._fresh or self.conn.trailing_data[0]):
            self._enter(_HEADERS)
        else:  # a whole request is in (the app's turn), or an idle kept-alive connection (uvicorn's)
            self._enter(None)

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # the deadline runs from the start of the phase, not from the latest bytes
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._phase == _HEADERS:
            self.book.waiting.pop(self, None)
        self._phase = phase
        if phase is not None:
            timeout = self.limits.header_timeout_s if phase == _HEADERS else self.limits.body_timeout_s
            self._deadline = self.loop.call_later(timeout, self._missed, phase, timeout)
        if phase == _HEADERS:
            self.book.waiting[self] = None

    def _missed(self, phase: str, timeout: float) -> None:
        self._deadline = None
        self._enter(None)
        logger.info("closed an HTTP connection: the request's %s took over %g s", phase, timeout)
        self._refuse(408, f"the request's {phase} did not arrive within {timeout:g} s; send it faster")

    # -- the cap --------------------------------------------------------------------------------

    def _evict_slowest(self) -> bool:
        """Close the connection waiting longest for its headers, if any; True if one was closed."""
        slowest = next((connection for connection in self.book.waiting if connection is not self), None)
        if slowest is None:
            return False
        logger.info("closed the slowest of %d HTTP connections at the cap", self.limits.max_connections)
        slowest._enter(None)
        slowest._refuse(408, "the server needed this connection; the request's headers were too slow")
        return True

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with OpenAI's error JSON unless a response has begun; close either way."""
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_raw_response(status, message))
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's writes go nowhere
        self._uncount()  # closing: no longer holds a place under the cap
        self.transport.close()


def _raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response, written past h11 (the connection closes after it)."""
    error_type = "service_unavailable_error" if status == 503 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": None}})
    head = (
        f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body.encode("ascii")
