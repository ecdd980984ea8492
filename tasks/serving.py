"""A real `loramux serve` over one adapter root, for the demo's measurements: start, wait, talk gRPC, stop.

    with served(Path("adapters"), max_slots=6) as client:   # a tasks.evaluate.GrpcCompletions
        client.complete("hi", "sql", 8)

The server is a subprocess (`python -m server.cli serve`) on a free local port, greedy requests
only go through its gRPC API; `LORAMUX_API_KEY`, if set, is sent as the bearer token. This module
knows the CLI's flags, nothing of the engine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.evaluate import GrpcCompletions

MAX_RANK = 8  # the demo adapters' ranks are 3 (LoRA, ComPEFT) and 4 (MoS)


@contextmanager
def served(
    root: Path, *, max_slots: int, threads: int | None = None, timeout: float = 300.0
) -> Iterator[GrpcCompletions]:
    """`loramux serve --adapter-root root` with `max_slots` device slots; yields a client, stops it after."""
    port = _free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--adapter-root", str(root)]
    command += ["--grpc-port", str(port), "--max-slots", str(max_slots), "--max-rank", str(MAX_RANK)]
    if threads is not None:
        command += ["--threads", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    client = GrpcCompletions(f"127.0.0.1:{port}", os.environ.get("LORAMUX_API_KEY"), timeout=timeout)
    try:
        _wait_until_serving(client, server)
        yield client
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=60)


def _wait_until_serving(
    client: GrpcCompletions, server: subprocess.Popen[bytes], timeout_s: float = 300
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"loramux serve exited with status {server.returncode}")
        try:
            client.complete("hi", "", 1)
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(1.0)
    raise TimeoutError("loramux serve did not start in time")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}
