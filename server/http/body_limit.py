"""ASGI middleware: refuse a request body over a size limit with 413, before it is parsed.

A declared Content-Length over the limit is answered at once, without reading the body; a
chunked (or lying) body is counted as it streams in and refused as soon as it passes the limit.
Either way the connection closes after the 413, so the rest of the body is never read. The
413 is OpenAI's error JSON (`server.http.errors`).

It knows nothing about routes or what the body holds; `refused(path)` is told of each body it
refuses (the app counts those of its generation routes).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import error_response

_CLOSE = {"Connection": "close"}


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refused = refused

    def _message(self) -> str:
        return (
            f"the request body is larger than this server's limit of {self.max_bytes} bytes "
            f"({self.max_bytes / 2**20:g} MiB, --http-max-body-mb); send less"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            self._tell(scope)
            await error_response(413, self._message(), headers=_CLOSE)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # the app's error handler answers it
                    self._tell(scope)
                    raise HTTPException(413, self._message(), headers=_CLOSE)
            return message

        await self.app(scope, counted, send)

    def _tell(self, scope: Scope) -> None:
        if self.refused is not None:
            self.refused(scope["path"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before we run
    return None
