"""Run the HTTP shim under uvicorn on an event loop the caller owns.

`HttpServer(app, host, port)`: `await start()` binds the port itself (so a taken port is an
OSError here, not uvicorn's `sys.exit`), serves in a task and returns the bound port (port 0
picks a free one); `await stop()` stops accepting, lets running requests finish and closes the
app's gRPC channel. Signal handling is left to the caller (`loramux serve` owns SIGINT/SIGTERM).
`limits` bounds what a connection may hold (`server.http.connections`): header and body
deadlines, and a connection cap lowered to fit the process's open-file limit. uvicorn runs its
h11 implementation, always (httptools, if installed, would bypass those limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from server.config import HttpLimits
from server.http.connections import ConnectionLimits, connection_cap, open_file_limit, protocol_class

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 30.0


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the caller handles signals
        yield


class HttpServer:
    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, limits: HttpLimits | None = None
    ) -> None:
        limits = limits or HttpLimits()
        self.connection_limits = ConnectionLimits(
            header_timeout_s=limits.header_timeout_s,
            body_timeout_s=limits.body_timeout_s,
            max_connections=connection_cap(limits.max_connections, open_file_limit()),
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=protocol_class(self.connection_limits),
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self._server = _Uvicorn(config)
        self._host, self._port = host, port
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        try:
            sock = socket.create_server((self._host, self._port))
        except OSError as exc:
            raise OSError(
                f"could not listen for HTTP on {self._host}:{self._port} (is the port in use or the host "
                f"wrong?): {exc}"
            ) from exc
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="loramux-http")
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if self._task.done():  # startup failed; surface its error
                await self._task
                raise RuntimeError("the HTTP server stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the HTTP server did not start in time")
            await asyncio.sleep(0.01)
        logger.info(
            "HTTP (OpenAI API) listening on %s:%d (at most %d connections)",
            self._host,
            self.port,
            self.connection_limits.max_connections,
        )
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
