"""`loramux bench cpu-share`: one request's latency on a quiet machine against beside a busy neighbour.

For each setting (`default`, the server as shipped, whose engine drops to one thread while the
CPUs are contended; `fixed`, the same thread count given explicitly, so no governor: the server
before it; `passive`, OpenMP threads that sleep as soon as they wait; `threads1`, one intra-op
thread), a real `loramux serve` subprocess is started and one gRPC `Generate` is timed: a short
chat prompt, greedy, exactly --new-tokens tokens (EOS ignored),
the default SmolLM2 unless --model. Quiet and busy runs alternate, --repeats of each, and the
median of each is kept; busy means a neighbour process spinning pure Python on every CPU this
process may use, started just before the request and stopped after it (with a hard time bound).
Also reported: the server's CPU seconds per request (a server whose threads spin uses about
--threads CPU-seconds per second even when they have nothing to do) and the load average.
A macro-benchmark: the server, the client and the neighbour are separate processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.cpus import usable_cpus

PROMPT = "Explain in a few sentences why the sky is blue."


@dataclass(frozen=True)
class Setting:
    """How a server is started: extra `serve` flags and environment (on top of the CLI's defaults)."""

    flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


SETTINGS = {
    # libgomp's own waits (spin a while, then sleep) and the engine's thread governor, which drops
    # to one thread while the CPUs are contended (server/engine/threads.py)
    "default": Setting(),
    # the same thread count given explicitly: no governor, as every server ran before it
    "fixed": Setting(flags=("--threads", str(usable_cpus()))),
    # threads that sleep at once when they wait (slower on a quiet machine)
    "passive": Setting(env={"OMP_WAIT_POLICY": "PASSIVE"}),
    "threads1": Setting(flags=("--threads", "1")),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", default="default,fixed,passive", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=2, help="quiet and busy runs per setting (median kept)"
    )
    parser.add_argument("--model", default=None, help="local checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--busy-limit", type=float, default=600.0, help="the neighbour stops after this many seconds at most"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per setting, then a summary")


# ---- the busy neighbour -----------------------------------------------------------------------


def _spin(deadline: float) -> None:
    while time.time() < deadline:
        pass


@contextmanager
def busy_neighbour(cpus: int, limit_s: float) -> Any:
    """`cpus` processes spinning pure Python while the block runs (each stops by itself after limit_s)."""
    context = multiprocessing.get_context("spawn")
    deadline = time.time() + limit_s
    spinners = [context.Process(target=_spin, args=(deadline,), daemon=True) for _ in range(cpus)]
    for spinner in spinners:
        spinner.start()
    time.sleep(0.5)  # let them reach the loop
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.terminate()
        for spinner in spinners:
            spinner.join(5)


# ---- the server -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(setting: Setting, model: str | None, log: Path) -> Any:
    """A `loramux serve` subprocess (gRPC only); yields (target, pid) once it answers GetInfo."""
    port = _free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--grpc-port", str(port), "--http-port", "0"]
    command += ["--log-level", "info", *setting.flags] + (["--model", model] if model else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}  # as a new user's
    env.update(setting.env)
    with log.open("w") as log_file:
        server = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            target = f"127.0.0.1:{port}"
            _wait_ready(target, server, timeout_s=600.0)
            yield target, server.pid
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_ready(target: str, server: subprocess.Popen[bytes], timeout_s: float) -> None:
    import grpc

    from loramux.v1 import inference_pb2 as pb
    from loramux.v1 import inference_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"loramux serve exited with status {server.returncode} (see its log)")
            try:
                stub.GetInfo(pb.GetInfoRequest(), timeout=2.0)
                return
            except grpc.RpcError:
                time.sleep(0.5)
    raise RuntimeError(f"loramux serve did not answer within {timeout_s:.0f} s")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_request(target: str, pid: int, new_tokens: int) -> tuple[float, float, int]:
    """(seconds, server CPU seconds, tokens) of one greedy chat request of exactly new_tokens tokens."""
    import grpc

    from loramux.v1 import inference_pb2 as pb
    from loramux.v1 import inference_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    request.messages.add(role="user", content=PROMPT)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        cpu = _cpu_seconds(pid)
        start = time.perf_counter()
        response = stub.Generate(request, timeout=900.0)
        seconds = time.perf_counter() - start
        return seconds, _cpu_seconds(pid) - cpu, response.completion_tokens


# ---- the measurement ----------------------------------------------------------------------------


def measure(name: str, args: argparse.Namespace, cpus: int) -> dict[str, Any]:
    setting = SETTINGS[name]
    log = Path(f"/tmp/loramux-cpu-share-{name}.log")
    quiet: list[tuple[float, float, int]] = []
    busy: list[tuple[float, float, int]] = []
    with running_server(setting, args.model, log) as (target, pid):
        timed_request(target, pid, args.new_tokens)  # warm-up
        for _ in range(args.repeats):  # alternate, so slow drifts of the machine hit both alike
            quiet.append(timed_request(target, pid, args.new_tokens))
            with busy_neighbour(cpus, args.busy_limit):
                busy.append(timed_request(target, pid, args.new_tokens))
    quiet_s = statistics.median(r[0] for r in quiet)
    busy_s = statistics.median(r[0] for r in busy)
    return {
        "setting": name,
        "flags": " ".join(setting.flags),
        "env": setting.env,
        "tokens": quiet[0][2],
        "quiet_s": round(quiet_s, 2),
        "busy_s": round(busy_s, 2),
        "ratio": round(busy_s / quiet_s, 2),
        "quiet_runs_s": [round(r[0], 2) for r in quiet],
        "busy_runs_s": [round(r[0], 2) for r in busy],
        "quiet_server_cpu_s": round(statistics.median(r[1] for r in quiet), 2),
        "busy_server_cpu_s": round(statistics.median(r[1] for r in busy), 2),
        "engine_threads": _engine_threads(log),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def _engine_threads(log: Path) -> int | None:
    """The intra-op thread count the engine thread logged at its start."""
    for line in log.read_text().splitlines():
        if "engine thread:" in line:
            return int(line.split("engine thread:")[1].split()[0])
    return None


def main(args: argparse.Namespace) -> int:
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or args.new_tokens < 1 or args.repeats < 1:
        raise SystemExit(
            f"bench cpu-share: --settings from {', '.join(SETTINGS)} (got {', '.join(unknown) or 'ok'}); "
            "--new-tokens and --repeats >= 1"
        )
    cpus = usable_cpus()
    load_before = round(os.getloadavg()[0], 2)
    rows = [measure(name, args, cpus) for name in names]
    summary = {
        "summary": True,
        "neighbour_processes": cpus,
        "load_1m_before": load_before,
        "load_1m_after": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }
    for row in [*rows, summary]:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0
