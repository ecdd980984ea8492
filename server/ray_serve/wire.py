"""What the ingress hands a replica, and what the replica answers; plain picklable values.

A replica answers one `Forwarded` request with a stream of items: either one `Answer` (a whole
JSON answer, sent only once it is complete, so a replica that dies half-way never leaves a client
with half a body under a 200), or a `StreamStart` followed by the body's bytes as the replica's
HTTP app produces them (server-sent events). Nothing here imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

# The header every answer of a replica carries: which replica served it (Ray's replica id).
REPLICA_HEADER = "x-loramux-replica"
Headers = tuple[tuple[bytes, bytes], ...]  # ASGI raw headers, lower-case names


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request of the OpenAI API, as the ingress received it."""

    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class Answer:
    """A whole answer: status, headers (with Content-Length) and body."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class StreamStart:
    """The status and headers of a streamed answer; its body follows as bytes items."""

    status: int
    headers: Headers


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case), or None."""
    return next((value for key, value in headers if key == name), None)
