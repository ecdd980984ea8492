"""A loramux server in a subprocess for a benchmark, and `loramux bench load` runs against it.

`ServerProcess` starts a command that serves the OpenAI API on a port (`loramux serve`,
`loramux ray`), waits until a readiness path answers 200, and stops it (SIGTERM to its process
group, then SIGKILL), so that whatever it started (Ray's processes) goes with it. `run_load` runs
the load harness as a subprocess and returns its JSON report. Nothing here knows which benchmark
uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def loramux_command() -> list[str]:
    """How to run the `loramux` command with this interpreter (no installed script needed)."""
    return [sys.executable, "-m", "server.cli"]


def machine() -> str:
    """This machine in one line, for a study's summary."""
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class ServerProcess:
    """`command` (serving HTTP on `http_port` of 127.0.0.1) in a subprocess until `close()`."""

    def __init__(
        self,
        command: list[str],
        http_port: int,
        log: Path,
        ready_path: str = "/health",
        timeout_s: float = 300.0,
    ) -> None:
        self.url = f"http://127.0.0.1:{http_port}"
        self.log_path = log
        self._log = log.open("w")
        # Its own process group: `close` stops what it started too (Ray's raylet, workers).
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            start_new_session=True,
        )
        try:
            self._wait_ready(ready_path, timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, path: str, timeout_s: float) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s; see {self.log_path}")

    def close(self, timeout_s: float = 90.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):  # anything of its group still running
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()


def run_load(argv: list[str], json_path: Path) -> dict[str, Any]:
    """`loramux bench load ARGV --json JSON_PATH`, echoed; its report."""
    shown = " ".join(a if len(a) < 80 else a[:40] + "..." for a in argv)
    print(f"loramux bench load {shown}", flush=True)
    subprocess.run([*loramux_command(), "bench", "load", *argv, "--json", str(json_path)], check=False)
    return json.loads(json_path.read_text())
