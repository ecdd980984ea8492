"""`loramux bench load` against live servers on 127.0.0.1.

A tiny random Llama with three PEFT adapters is served over gRPC and through the OpenAI shim
(with the engine's /metrics), as `loramux serve` runs them; a fake OpenAI server whose speed the
test sets stands in where the test needs a known capacity or a server that fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import load_bench
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.http.app import create_app
from server.http.server import HttpServer
from server.metrics import Metrics
from server.runtime import build_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SMALL = ["--prompt-tokens", "8", "--max-tokens", "4", "--no-progress", "--token-ids", "100-5000"]


class LoopThread:
    """An event loop in a daemon thread, for servers the test starts."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _engine(base: Path, root: Path, metrics: Metrics | None = None) -> Engine:
    config = ServerConfig(
        model=str(base),
        device="cpu",
        engine=EngineConfig(max_running=4, max_queue=64, max_model_len=128, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8),
    )
    engine = build_engine(config, metrics)
    if metrics is not None:
        metrics.watch(engine.snapshot)
    engine.start()
    return engine


class Served:
    """An engine over `root`, its gRPC server and the OpenAI shim with the engine's metrics."""

    def __init__(self, base: Path, root: Path) -> None:
        self.metrics = Metrics()
        self.engine = _engine(base, root, self.metrics)
        self.grpc = ServerThread(self.engine)
        self.http = HttpServer(
            create_app(self.grpc.target, metrics_registry=self.metrics.registry), "127.0.0.1", 0
        )
        self.url = f"http://127.0.0.1:{self.grpc._call(self.http.start())}"

    def close(self) -> None:
        self.grpc._call(self.http.stop())
        self.grpc.close()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def model_dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("load-adapters")
    for seed, name in enumerate(("a1", "a2", "a3")):
        _save_adapter(base, root / name, QV4, seed=seed + 1)
    return {"base": base, "root": root}


@pytest.fixture(scope="module")
def served(model_dirs: dict[str, Path]) -> Iterator[Served]:
    running = Served(model_dirs["base"], model_dirs["root"])
    yield running
    running.close()


def run_load(argv: list[str], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    parser = argparse.ArgumentParser()
    load_bench.add_arguments(parser)
    out = tmp_path / "report.json"
    code = load_bench.main(parser.parse_args([*argv, "--json", str(out)]))
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_report_counts_what_the_server_counted(served: Served, tmp_path: Path) -> None:
    code, report = run_load(
        [
            "--target",
            served.url,
            "--adapters",
            "a1,a2,a3,@base",
            "--rate",
            "20",
            "--num-requests",
            "16",
            "--canary-adapters",
            "0",
            "--seed",
            "3",
            *SMALL,
        ],
        tmp_path,
    )
    assert code == 0, report.get("errors")
    assert report["requests"] == report["completed"] == 16 and report["errors"] == {}
    assert report["output_tokens"] == 16 * 4  # ignore_eos: every answer runs to max tokens
    counted = report["server_counted"]
    assert counted["requests_total"] == 16
    assert counted["generation_tokens_total"] == report["output_tokens"]
    assert counted["prompt_tokens_total"] == report["prompt_tokens"] == 16 * 8
    assert sum(row["requests"] for row in report["per_adapter"].values()) == 16
    for name in ("ttft", "tpot", "e2e"):
        stats = report[name]
        assert stats["count"] == 16 and 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    # OpenAI streams have no token ids: a chunk whose text the detokenizer held back is not seen.
    assert 16 * 2 <= report["itl"]["count"] <= 16 * 3
    assert report["lateness"]["count"] == 16 and report["lateness"]["p50"] >= 0
    series = report["server_metrics"]["series"]
    assert report["server_metrics"]["t_s"] and "running" in series  # scraped while it ran


def test_grpc_target_tags_tiers_and_checks_canaries(served: Served, tmp_path: Path) -> None:
    code, report = run_load(
        [
            "--target",
            served.grpc.target,
            "--metrics-url",
            served.url + "/metrics",
            "--adapters",
            "a1,a2,a3",
            "--popularity",
            "uniform",
            "--concurrency",
            "3",
            "--num-requests",
            "18",
            "--canary-adapters",
            "3",
            "--canary-every",
            "4",
            *SMALL,
        ],
        tmp_path,
    )
    assert code == 0, report["errors"]
    assert report["completed"] == 18
    canaries = report["canaries"]
    assert (
        canaries["recorded"] == ["a1", "a2", "a3"] and canaries["sent"] >= 3 and canaries["mismatches"] == []
    )
    tiers = report["by_tier"]
    assert "unknown" not in tiers  # the server says each request's tier
    assert sum(row["requests"] for row in tiers.values()) == 18
    # Three adapters through two device slots in uniform traffic: some arrivals find theirs off the device.
    assert tiers.get("device", {}).get("requests", 0) > 0
    assert tiers.get("host", {}).get("requests", 0) + tiers.get("disk", {}).get("requests", 0) > 0
    # The recorded canaries ran before the "before" scrape: the run counts the load and its canaries.
    assert report["server_counted"]["requests_total"] == 18 + canaries["sent"]


def test_unknown_adapter_is_counted_as_errors_not_fast_requests(served: Served, tmp_path: Path) -> None:
    code, report = run_load(
        [
            "--target",
            served.url,
            "--adapters",
            "a1,nope",
            "--popularity",
            "distinct",
            "--rate",
            "50",
            "--num-requests",
            "6",
            "--canary-adapters",
            "0",
            *SMALL,
        ],
        tmp_path,
    )
    assert code == 1
    assert report["errors"] == {"bad_request": 3}
    assert report["per_adapter"]["nope"]["completed"] == 0 and report["per_adapter"]["a1"]["completed"] == 3
    assert report["ttft"]["count"] == 3  # failed requests add no latencies


def test_unreachable_server_is_connection_errors(tmp_path: Path) -> None:
    code, report = run_load(
        [
            "--target",
            "http://127.0.0.1:9",
            "--adapters",
            "a",
            "--rate",
            "50",
            "--num-requests",
            "3",
            "--canary-adapters",
            "0",
            "--no-metrics",
            *SMALL,
        ],
        tmp_path,
    )
    assert code == 1 and report["errors"] == {"connection": 3} and report["completed"] == 0


def test_canaries_catch_a_server_with_two_adapters_swapped(
    served: Served, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    saved = tmp_path / "canaries.json"
    common = ["--adapters", "a1,a2", "--rate", "20", "--num-requests", "8", "--canary-every", "2", *SMALL]
    code, report = run_load(["--target", served.grpc.target, "--canary-save", str(saved), *common], tmp_path)
    assert code == 0 and report["canaries"]["mismatches"] == []
    swapped_root = tmp_path / "swapped"
    shutil.copytree(model_dirs["root"] / "a1", swapped_root / "a2")
    shutil.copytree(model_dirs["root"] / "a2", swapped_root / "a1")
    swapped = Served(model_dirs["base"], swapped_root)
    try:
        code, report = run_load(
            ["--target", swapped.grpc.target, "--canary-load", str(saved), *common], tmp_path
        )
    finally:
        swapped.close()
    assert code == 1
    mismatched = {m["adapter"] for m in report["canaries"]["mismatches"]}
    assert mismatched == {"a1", "a2"}
    assert report["errors"]["canary_mismatch"] == len(report["canaries"]["mismatches"])
    assert report["completed"] == report["requests"]  # the load itself was answered


# -- a fake OpenAI server whose speed the test controls -----------------------------------------


def fake_openai(
    capacity: int, token_interval_s: float, fail_status: int | None = None, replica_header: bool = False
) -> FastAPI:
    """Serves `capacity` requests at a time, one token every `token_interval_s`; the others wait.
    Its capacity is capacity / (max_tokens * token_interval_s) requests per second. With
    `replica_header`, answers name a replica per model ("replica-MODEL"), as loramux on Ray does."""
    app = FastAPI()
    slots: list[asyncio.Semaphore] = []

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": [{"id": "base", "parent": None}, {"id": "a", "parent": "base"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await request.json()
        if fail_status is not None:
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=fail_status)
        if not slots:
            slots.append(asyncio.Semaphore(capacity))

        async def events() -> Any:
            async with slots[0]:
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(token_interval_s)
                    last = i == body["max_tokens"] - 1
                    chunk = {
                        "model": body["model"],
                        "choices": [{"index": 0, "text": "x", "finish_reason": "length" if last else None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        headers = {"x-loramux-replica": f"replica-{body['model']}"} if replica_header else None
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


@pytest.fixture()
def fake_server() -> Iterator[Any]:
    loop = LoopThread()
    servers: list[HttpServer] = []

    def start(app: FastAPI) -> str:
        server = HttpServer(app, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{loop.call(server.start())}"

    yield start
    for server in servers:
        loop.call(server.stop())
    loop.close()


@pytest.mark.parametrize(("status", "kind"), [(500, "server_error"), (429, "refused"), (404, "bad_request")])
def test_failing_server_shows_errors_by_kind(
    fake_server: Any, tmp_path: Path, status: int, kind: str
) -> None:
    url = fake_server(fake_openai(capacity=2, token_interval_s=0.01, fail_status=status))
    code, report = run_load(
        [
            "--target",
            url,
            "--rate",
            "50",
            "--num-requests",
            "5",
            "--canary-adapters",
            "0",
            "--no-metrics",
            *SMALL,
        ],
        tmp_path,
    )
    assert code == 1 and report["errors"] == {kind: 5} and report["completed"] == 0


def test_sweep_finds_the_knee_of_a_server_with_known_capacity(fake_server: Any, tmp_path: Path) -> None:
    # 2 at a time, 4 tokens at 25 ms: 0.1 s each, 20 requests/s. Near-regular arrivals (high burstiness
    # parameter) wait for nothing below that rate and pile up above it.
    url = fake_server(fake_openai(capacity=2, token_interval_s=0.025))
    code, result = run_load(
        [
            "--target",
            url,
            "--adapters",
            "a",
            "--burstiness",
            "1000",
            "--num-requests",
            "30",
            "--canary-adapters",
            "0",
            "--no-metrics",
            "--objective",
            "ttft_p99=0.3",
            "--sweep",
            "5,10,15,30,60",
            *SMALL,
        ],
        tmp_path,
    )
    assert code == 0
    rates = [point["rate"] for point in result["points"]]
    assert (
        10 <= result["best_rate"] <= 15
    )  # the highest rate below the knee (one step of slack for a busy machine)
    over = [point for point in result["points"] if point["rate"] == 30]
    assert over and not over[0]["meets_objective"] and over[0]["over_saturated"]
    assert 60 not in rates and result["stopped_early"]  # nothing run past an over-saturated point


def test_replicas_named_by_the_answers_are_counted_with_their_affinity(
    fake_server: Any, tmp_path: Path
) -> None:
    url = fake_server(fake_openai(capacity=4, token_interval_s=0.005, replica_header=True))
    argv = ["--target", url, "--adapters", "a", "--rate", "50", "--num-requests", "6"]
    code, report = run_load([*argv, "--canary-adapters", "0", "--no-metrics", *SMALL], tmp_path)
    assert code == 0 and report["completed"] == 6
    assert report["replicas"] == {"requests": {"replica-a": 6}, "affinity": 1.0, "affinity_requests": 5}
