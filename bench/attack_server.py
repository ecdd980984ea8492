"""A real `loramux serve` subprocess for the attack probe, and the few calls every attack makes.

`ServerProcess` starts the server on 127.0.0.1 (free ports), waits until gRPC health and `/health`
answer, captures its stdout+stderr to a log file, and reads its resident memory and open file
descriptors from /proc. `Probe` is a client of it: gRPC Generate / health / GetInfo / ListAdapters,
plain HTTP calls, and `alive()` — the "does it still serve" check every attack records (gRPC
health, `/health` and a normal greedy completion on a known adapter, compared token for token
with the answer it gave before any attack). This module knows nothing about the attacks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
SERVICE = "loramux.v1.Inference"
GOOD_PROMPT = "The quick brown fox"
GOOD_TOKENS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    model: Path
    adapter_root: Path
    log_path: Path
    api_key: str = "probe-key"
    admin_token: str = "probe-admin"
    flags: tuple[str, ...] = ("--max-rank", "16", "--host-cache-mb", "64", "--max-slots", "4")
    process: subprocess.Popen[bytes] | None = None
    grpc_port: int = 0
    http_port: int = 0
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 180.0) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        command = [
            sys.executable, "-m", "server.cli", "serve", "--model", str(self.model),
            "--adapter-root", str(self.adapter_root), "--host", "127.0.0.1",
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--enable-admin",
            "--device", "cpu", "--threads", "1", *self.flags,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAMUX_API_KEY": self.api_key,
               "LORAMUX_ADMIN_TOKEN": self.admin_token}  # fmt: skip
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        probe = Probe(self)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
                if probe.grpc_health(2.0) and probe.http_health(2.0):
                    return
                time.sleep(0.3)
        finally:
            probe.close()
        raise RuntimeError(f"server not ready after {timeout_s} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)

    def restart(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(15)
        self.start()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size


@dataclass
class Reply:
    """One answer: a gRPC code name or an HTTP status, its content type, message and time."""

    status: str
    seconds: float
    message: str = ""
    content_type: str = ""
    token_ids: tuple[int, ...] = ()
    body: Any = None

    def short(self) -> str:
        kind = f" {self.content_type.split(';')[0]}" if self.content_type else ""
        return f"{self.status}{kind}"


@dataclass
class Alive:
    grpc_health: bool
    http_health: bool
    completion: bool  # a normal completion answered with the tokens it gave before the attacks
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.grpc_health and self.http_health and self.completion

    def cell(self) -> str:
        marks = [
            ("gRPC-health", self.grpc_health),
            ("/health", self.http_health),
            ("completion", self.completion),
        ]
        if self.ok:
            return "yes"
        return (
            "NO: "
            + ", ".join(name for name, ok in marks if not ok)
            + (f" ({self.detail})" if self.detail else "")
        )


@dataclass
class Probe:
    server: ServerProcess
    good_adapter: str = "good"
    baseline: tuple[int, ...] = ()
    _channel: Any = field(default=None, repr=False)
    _http: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._channel = grpc.insecure_channel(
            self.server.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self._http = httpx.Client(base_url=self.server.url, timeout=30)

    def close(self) -> None:
        self._channel.close()
        self._http.close()

    @property
    def stub(self) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self._channel)

    def metadata(self, token: str | None = "key") -> tuple[tuple[str, str], ...]:
        secret = {"key": self.server.api_key, "admin": self.server.admin_token}.get(token or "")
        return (("authorization", f"Bearer {secret}"),) if secret else ()

    def headers(self, token: str | None = "key") -> dict[str, str]:
        return {key: value for key, value in self.metadata(token)}

    # -- gRPC ---------------------------------------------------------------------------------

    def call(self, method: str, request: Any, timeout: float = 30.0, token: str | None = "key") -> Reply:
        started = time.monotonic()
        try:
            answer = getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata(token))
        except grpc.RpcError as exc:
            return Reply(exc.code().name, time.monotonic() - started, exc.details() or "")
        tokens = tuple(getattr(answer, "token_ids", ()))
        return Reply("OK", time.monotonic() - started, token_ids=tokens, body=answer)

    def generate(self, adapter: str = "", timeout: float = 30.0, **fields: Any) -> Reply:
        fields = {
            "prompt": GOOD_PROMPT,
            "max_tokens": GOOD_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            **fields,
        }
        return self.call("Generate", pb.GenerateRequest(adapter=adapter, **fields), timeout)

    def grpc_health(self, timeout: float = 5.0) -> bool:
        try:
            answer = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout
            )
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    # -- HTTP ---------------------------------------------------------------------------------

    def http(
        self, method: str, path: str, timeout: float = 30.0, token: str | None = "key", **kwargs: Any
    ) -> Reply:
        headers = {**self.headers(token), **kwargs.pop("headers", {})}
        started = time.monotonic()
        try:
            answer = self._http.request(method, path, headers=headers, timeout=timeout, **kwargs)
        except httpx.HTTPError as exc:
            return Reply(f"no answer ({type(exc).__name__})", time.monotonic() - started, str(exc)[:200])
        seconds = time.monotonic() - started
        content_type = answer.headers.get("content-type", "")
        try:
            body = answer.json()
        except ValueError:
            body = None
        message = (
            body["error"].get("message", "")
            if isinstance(body, dict) and isinstance(body.get("error"), dict)
            else answer.text[:2000]
        )
        return Reply(str(answer.status_code), seconds, str(message), content_type, body=body)

    def complete(self, model: str, timeout: float = 30.0, **fields: Any) -> Reply:
        body = {
            "model": model,
            "prompt": GOOD_PROMPT,
            "max_tokens": GOOD_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            **fields,
        }
        return self.http("POST", "/v1/completions", timeout, json=body)

    def http_health(self, timeout: float = 5.0) -> bool:
        try:
            return bool(self._http.get("/health", timeout=timeout).status_code == 200)
        except httpx.HTTPError:
            return False

    # -- still serving? -----------------------------------------------------------------------

    def remember_baseline(self) -> tuple[int, ...]:
        reply = self.generate(self.good_adapter)
        if reply.status != "OK":
            raise RuntimeError(f"the good adapter does not serve: {reply.status} {reply.message}")
        self.baseline = reply.token_ids
        return self.baseline

    def alive(self, timeout: float = 10.0) -> Alive:
        grpc_ok = self.grpc_health(timeout)
        http_ok = self.http_health(timeout)
        reply = self.generate(self.good_adapter, timeout=timeout)
        same = reply.status == "OK" and reply.token_ids == self.baseline
        detail = "" if same else (f"{reply.status}" if reply.status != "OK" else "different tokens")
        return Alive(grpc_ok, http_ok, same, detail)
