"""A bounded soak on loopback: mixed adapters at a steady rate for minutes (`make test-soak`).

A tiny random Llama engine with three PEFT adapters (and two device slots, so adapters are
swapped in and out) is served over gRPC and the OpenAI HTTP shim on 127.0.0.1. A few client
threads send completions at a steady rate, cycling through the base model and the adapters, and
every fifth request is a stream the client drops after its first chunk (a cancellation). The
run lasts `LORAMUX_SOAK_SECONDS` (default 180) and stops by itself; requests are also bounded
in number. It asserts no errors, that the resident memory sampled after a warm-up grows less
than `RSS_TOLERANCE_MIB` by the end, and that the engine is idle with no adapter slot pinned.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.http.app import create_app
from server.http.server import HttpServer
from server.runtime import build_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread, _wait_until

SOAK_SECONDS = float(os.environ.get("LORAMUX_SOAK_SECONDS", "180"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_SECONDS + 300)]
WARMUP_SECONDS = min(10.0, SOAK_SECONDS / 4)
CLIENTS = 3
RATE_PER_CLIENT = 2.0  # requests per second per client thread
MAX_REQUESTS = int(SOAK_SECONDS * RATE_PER_CLIENT * CLIENTS) + CLIENTS
RSS_TOLERANCE_MIB = 64
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp2": dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def stack(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("soak-adapters")
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        _save_adapter(base, root / name, config, seed=seed)
    config = ServerConfig(
        model=str(base),
        device="cpu",
        engine=EngineConfig(max_running=8, max_queue=64, max_model_len=256, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8),
    )
    engine: Engine = build_engine(config)
    engine.start()
    grpc = ServerThread(engine)
    http = HttpServer(create_app(grpc.target), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{grpc._call(http.start())}"
    yield {"url": url, "models": [base.name, *ADAPTERS], "engine": engine}
    grpc._call(http.stop())
    grpc.close()
    engine.shutdown()


def test_soak_mixed_adapters_at_a_steady_rate(stack: dict[str, Any]) -> None:
    engine: Engine = stack["engine"]
    models: list[str] = stack["models"]
    started = time.monotonic()
    deadline = started + SOAK_SECONDS
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    errors: list[str] = []
    issued = [0]
    rss: dict[str, float] = {}

    def one(client: httpx.Client, index: int) -> None:
        model = models[index % len(models)]
        body = {"model": model, "prompt": f"request {index}:", "max_tokens": 8, "ignore_eos": True}
        if index % 5 == 4:  # a stream dropped after its first chunk: the server cancels it
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                if response.status_code != 200:
                    raise AssertionError(f"stream {model}: {response.status_code} {response.read()!r}")
                next(response.iter_lines())
            with lock:
                counts["cancelled"] += 1
            return
        response = client.post("/v1/completions", json={**body, "temperature": 0})
        if response.status_code != 200:
            raise AssertionError(f"{model}: {response.status_code} {response.text}")
        answer = response.json()
        assert answer["model"] == model and answer["usage"]["completion_tokens"] == 8, answer
        with lock:
            counts[model] += 1

    def client_thread(offset: int) -> None:
        period = 1.0 / RATE_PER_CLIENT
        next_at = time.monotonic() + offset * period / CLIENTS
        with httpx.Client(base_url=stack["url"], timeout=60) as client:
            while True:
                now = time.monotonic()
                with lock:
                    if now >= deadline or issued[0] >= MAX_REQUESTS or errors:
                        return
                    index = issued[0]
                    issued[0] += 1
                if next_at > now:
                    time.sleep(next_at - now)
                next_at += period
                try:
                    one(client, index)
                except Exception as error:  # noqa: BLE001 - collected and asserted on below
                    with lock:
                        errors.append(f"request {index}: {error!r}")

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(WARMUP_SECONDS)
    rss["warm"] = _rss_mib()
    for thread in threads:
        thread.join(timeout=SOAK_SECONDS + 120)
    assert not any(thread.is_alive() for thread in threads), "client threads did not stop"
    elapsed = time.monotonic() - started

    assert not errors, errors[:5]
    assert _wait_until(lambda: _idle(engine)), engine.stats()
    rss["end"] = _rss_mib()
    slots = engine.adapters.slots.stats() if engine.adapters else None
    print(
        f"\nsoak: {elapsed:.0f} s, {sum(counts.values())} requests {dict(counts)}, "
        f"RSS {rss['warm']:.0f} -> {rss['end']:.0f} MiB, slots {slots}"
    )
    assert sum(counts.values()) == issued[0]
    assert all(counts[model] > 0 for model in models) and counts["cancelled"] > 0, counts
    assert rss["end"] - rss["warm"] < RSS_TOLERANCE_MIB, rss
    assert slots is not None and slots.pinned == 0, slots
    assert slots.loads > len(ADAPTERS)  # three adapters over two slots: they were swapped


def _idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_slots_used == 0
