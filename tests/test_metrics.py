"""Prometheus metrics: every metric the operator is promised appears, and moves when it should.

A tiny engine with three PEFT adapters and two device slots runs base and adapter requests,
a cancelled one and refused ones; counters must grow by exactly what was done, histograms count
one observation per request, gauges show a request while it runs, and `vllm:lora_requests_info`
lists running and waiting adapters as vLLM does. `/metrics` over the HTTP shim serves the same text.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters_store import AdapterNotFound
from server.config import AdapterConfig, EngineConfig, HttpLimits, ServerConfig
from server.engine.engine import Engine
from server.engine.events import EngineSnapshot, FinishedRequest
from server.engine.request import InvalidRequest, RequestOutput, SamplingParams
from server.http.app import create_app
from server.http.server import HttpServer
from server.metrics import OTHER_ADAPTERS, UNKNOWN_ADAPTER, Metrics
from server.runtime import build_engine
from tests.conftest import prepare
from tests.test_adapters_engine import _save_adapter
from tests.test_engine import Collected
from tests.test_grpc_service import ServerThread, _wait_until

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
PROMPT = (5, 17, 300, 42, 7, 99)
FIVE = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
METRICS: dict[Engine, Metrics] = {}  # the metrics each test engine reports to


class SlowSink(Collected):
    """Sleeps on every output so that a long request is still running when the test looks."""

    def __call__(self, out: RequestOutput) -> None:
        time.sleep(0.02)
        super().__call__(out)


@pytest.fixture(scope="module")
def engine(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("metrics-adapters")
    for seed, name in enumerate(("a1", "a2", "a3")):
        _save_adapter(base, root / name, QV4, seed=seed)
    config = ServerConfig(
        model=str(base),
        device="cpu",
        engine=EngineConfig(max_running=1, max_queue=8, max_model_len=256, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8),
    )
    metrics = Metrics()
    engine_ = build_engine(config, metrics)
    metrics.watch(engine_.snapshot)
    METRICS[engine_] = metrics
    engine_.start()
    yield engine_
    engine_.shutdown()


def scrape_text(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(engine: Engine) -> Samples:
    return scrape_text(METRICS[engine].exposition().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def lora_info(samples: Samples) -> dict[str, str]:
    (labels,) = [dict(key) for name, key in samples if name == "vllm:lora_requests_info"]
    return labels


def start(engine: Engine, rid: str, adapter: str, params: SamplingParams, sink: Collected) -> Collected:
    sink.handle = engine.submit(prepare(engine, rid, list(PROMPT), params, adapter), sink)
    return sink


def run(engine: Engine, rid: str, adapter: str = "", params: SamplingParams = FIVE) -> Collected:
    return start(engine, rid, adapter, params, Collected()).wait()


def refuse(engine: Engine, prompt: tuple[int, ...], adapter: str = "") -> None:
    """Prepare a request as the gRPC service does: a refusal is counted, then raised."""
    try:
        prepare(engine, "refused", list(prompt), FIVE, adapter)
    except Exception as exc:
        engine.record_refused((adapter,) if adapter else (), exc)
        raise


def test_requests_tokens_and_latencies_move(engine: Engine) -> None:
    base = engine.info.model_name
    before = scrape(engine)
    run(engine, "base-1")
    run(engine, "base-2")
    run(engine, "a1-1", adapter="a1")
    with pytest.raises(InvalidRequest):
        refuse(engine, ())
    with pytest.raises(AdapterNotFound):
        refuse(engine, PROMPT, adapter="no_such_adapter")
    after = scrape(engine)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("loramux_requests_total", adapter=base, outcome="length") == 2
    assert delta("loramux_requests_total", adapter="a1", outcome="length") == 1
    assert delta("loramux_requests_total", adapter=base, outcome="invalid") == 1
    assert delta("loramux_requests_total", adapter=UNKNOWN_ADAPTER, outcome="invalid") == 1
    assert not any(dict(key).get("adapter") == "no_such_adapter" for _, key in after)
    assert delta("loramux_prompt_tokens_total", adapter=base) == 2 * len(PROMPT)
    assert delta("loramux_generation_tokens_total", adapter=base) == 10
    assert delta("loramux_generation_tokens_total", adapter="a1") == 5
    for histogram in (
        "loramux_time_to_first_token_seconds",
        "loramux_time_per_output_token_seconds",
        "loramux_e2e_request_latency_seconds",
    ):
        assert delta(histogram + "_count", adapter=base) == 2
        assert delta(histogram + "_count", adapter="a1") == 1
        assert delta(histogram + "_sum", adapter=base) > 0
        assert delta(histogram + "_bucket", adapter=base, le="+Inf") == 2
    ttft = value(after, "loramux_time_to_first_token_seconds_sum", adapter="a1")
    e2e = value(after, "loramux_e2e_request_latency_seconds_sum", adapter="a1")
    assert 0 < ttft < e2e


def test_engine_steps_are_timed_and_the_thread_count_shown(engine: Engine) -> None:
    before = scrape(engine)
    run(engine, "steps-1")  # 5 tokens: one prefill step, then a decode step per further token
    after = scrape(engine)
    steps = value(after, "loramux_engine_step_seconds_count") - value(
        before, "loramux_engine_step_seconds_count"
    )
    seconds = value(after, "loramux_engine_step_seconds_sum") - value(
        before, "loramux_engine_step_seconds_sum"
    )
    assert steps >= 5 and seconds > 0
    assert value(after, "loramux_engine_step_seconds_bucket", le="+Inf") == value(
        after, "loramux_engine_step_seconds_count"
    )
    assert engine.governor is None or engine.governor.current >= 1
    assert value(after, "loramux_engine_threads") == engine.snapshot().threads >= 1


def test_gauges_and_the_vllm_lora_gauge_follow_running_and_waiting_requests(engine: Engine) -> None:
    before = scrape(engine)
    assert value(before, "loramux_running_requests") == 0
    assert value(before, "loramux_queue_depth") == 0
    assert value(before, "loramux_kv_cache_usage_ratio") == 0
    assert lora_info(before)["running_lora_adapters"] == ""

    running, waiting = SlowSink(), SlowSink()
    start(engine, "long-a2", "a2", LONG, running)
    assert _wait_until(lambda: len(running.outputs) > 0)
    start(engine, "queued-a3", "a3", LONG, waiting)  # max_running=1
    assert _wait_until(lambda: lora_info(scrape(engine))["waiting_lora_adapters"] == "a3")
    during = scrape(engine)
    assert value(during, "loramux_running_requests") == 1
    assert value(during, "loramux_queue_depth") == 1
    assert value(during, "loramux_kv_cache_usage_ratio") == 1.0  # one KV slot, and it is taken
    assert value(during, "loramux_kv_cache_bytes") > 0
    info = lora_info(during)
    assert info == {"running_lora_adapters": "a2", "waiting_lora_adapters": "a3", "max_lora": "2"}
    assert abs(value(during, "vllm:lora_requests_info", **info) - time.time()) < 60

    for sink in (running, waiting):
        assert sink.handle is not None
        engine.abort(sink.handle)
    running.wait(), waiting.wait()
    assert _wait_until(lambda: lora_info(scrape(engine))["running_lora_adapters"] == "")
    after = scrape(engine)
    assert value(after, "loramux_running_requests") == 0
    assert value(after, "loramux_queue_depth") == 0
    for adapter in ("a2", "a3"):
        cancelled = value(after, "loramux_requests_total", adapter=adapter, outcome="cancelled")
        assert cancelled - value(before, "loramux_requests_total", adapter=adapter, outcome="cancelled") == 1
    # the queued request never ran: an end-to-end latency, but no first token
    assert value(after, "loramux_e2e_request_latency_seconds_count", adapter="a3") == 1
    assert value(after, "loramux_time_to_first_token_seconds_count", adapter="a3") == 0
    assert value(after, "loramux_time_to_first_token_seconds_count", adapter="a2") == 1


def test_adapter_tiers_loads_and_evictions(engine: Engine) -> None:
    manager = engine.adapters
    assert manager is not None
    before = scrape(engine)
    tiers = {tier: value(before, "loramux_adapters", tier=tier) for tier in ("device", "host", "disk")}
    assert sum(tiers.values()) == 3
    assert value(before, "loramux_adapter_slots") == 2
    for name in ("a1", "a2", "a3"):  # two device slots, three adapters: at least one eviction
        run(engine, f"tiers-{name}", adapter=name)
    manager.store.host.evict("a1")
    after = scrape(engine)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "loramux_adapters", tier="device") == 2
    assert value(after, "loramux_adapters", tier="host") + value(after, "loramux_adapters", tier="disk") == 1
    host_loads, device_loads = manager.host_loads(), manager.stats()[1].loads
    assert value(after, "loramux_adapter_loads_total", tier="host") == host_loads >= 3
    assert value(after, "loramux_adapter_loads_total", tier="device") == device_loads >= 3
    assert delta("loramux_adapter_loads_total", tier="device") >= 1
    assert delta("loramux_adapter_evictions_total", tier="device") >= 1
    assert delta("loramux_adapter_evictions_total", tier="host") == 1
    assert value(after, "loramux_adapter_load_seconds_count", tier="host") == host_loads
    assert value(after, "loramux_adapter_load_seconds_count", tier="device") == device_loads
    assert value(after, "loramux_adapter_load_seconds_sum", tier="device") > 0


def test_every_engine_has_its_own_registry() -> None:
    metrics = Metrics()
    metrics.request_refused("x", "invalid")
    assert value(
        scrape_text(metrics.exposition().decode()), "loramux_requests_total", adapter="x", outcome="invalid"
    )
    assert (
        value(
            scrape_text(Metrics().exposition().decode()),
            "loramux_requests_total",
            adapter="x",
            outcome="invalid",
        )
        == 0
    )


def _finished(adapter: str, tier: str = "device") -> FinishedRequest:
    return FinishedRequest(adapter, "stop", 4, 3, 10.0, 10.05, 10.2, tier)


def _adapter_labels(metrics: Metrics) -> set[str]:
    samples = scrape_text(metrics.exposition().decode())
    return {
        dict(key)["adapter"] for name, key in samples if name == "loramux_time_to_first_token_seconds_count"
    }


def test_adapter_labels_past_the_limit_are_counted_as_other() -> None:
    metrics = Metrics(process_metrics=False, max_adapter_labels=2)
    idle = EngineSnapshot(0, 0, 4, 0, (), (), None)
    metrics.watch(lambda: idle, model_name="the-base")
    for adapter in ("a", "b", "c", "a+b", "the-base", "a", "d"):
        metrics.request_finished(_finished(adapter, "" if adapter == "the-base" else "device"))
    metrics.request_refused(UNKNOWN_ADAPTER, "invalid")
    metrics.request_refused("auto", "invalid")
    metrics.request_refused("e", "overloaded")
    metrics.request_routed("f", "", 0.001)
    assert _adapter_labels(metrics) == {"a", "b", "the-base", OTHER_ADAPTERS}
    samples = scrape_text(metrics.exposition().decode())
    assert value(samples, "loramux_requests_total", adapter="a", outcome="stop") == 2
    assert value(samples, "loramux_requests_total", adapter=OTHER_ADAPTERS, outcome="stop") == 3  # c, a+b, d
    assert value(samples, "loramux_generation_tokens_total", adapter=OTHER_ADAPTERS) == 9
    assert value(samples, "loramux_requests_total", adapter=UNKNOWN_ADAPTER, outcome="invalid") == 1
    assert value(samples, "loramux_requests_total", adapter="auto", outcome="invalid") == 1
    assert value(samples, "loramux_requests_total", adapter=OTHER_ADAPTERS, outcome="overloaded") == 1
    assert value(samples, "loramux_router_decisions_total", adapter=OTHER_ADAPTERS) == 1
    mixed = Metrics(process_metrics=False, max_adapter_labels=8)  # mixtures: at most 2 labels
    for adapter in ("b+a", "a+b", "c+a", "d+a", "e", "a+c"):
        mixed.request_finished(_finished(adapter))
    assert _adapter_labels(mixed) == {"a+b", "a+c", "e", OTHER_ADAPTERS}
    none = Metrics(process_metrics=False, max_adapter_labels=0)
    none.request_finished(_finished("a"))
    assert _adapter_labels(none) == {OTHER_ADAPTERS}
    with pytest.raises(ValueError, match="max_adapter_labels"):
        Metrics(max_adapter_labels=-1)


def test_cli_metrics_max_adapters_reaches_the_config() -> None:
    from server.cli import build_parser, server_config

    parser = build_parser()
    assert server_config(parser.parse_args(["serve"])).metrics_max_adapters == 256
    args = parser.parse_args(["serve", "--metrics-max-adapters", "3"])
    assert server_config(args).metrics_max_adapters == 3


def test_metrics_endpoint_of_the_http_shim(engine: Engine) -> None:
    """As `loramux serve` runs them: gRPC and the shim in one process, the shim serving the engine's registry."""
    grpc_server = ServerThread(engine)
    http = HttpServer(
        create_app(grpc_server.target, metrics_registry=METRICS[engine].registry), "127.0.0.1", 0
    )
    url = f"http://127.0.0.1:{grpc_server._call(http.start())}"
    base = engine.info.model_name
    try:
        before = scrape_text(httpx.get(url + "/metrics").text)
        completion = dict(model="a1", prompt="Hello", max_tokens=3, temperature=0, ignore_eos=True)
        assert httpx.post(url + "/v1/completions", json=completion, timeout=60).status_code == 200
        bad = dict(model=base, prompt="Hello", max_tokens=3, temperature=-1)
        assert httpx.post(url + "/v1/completions", json=bad, timeout=60).status_code == 400
        answer = httpx.get(url + "/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        after = scrape_text(answer.text)
        for labels, grown in (
            (dict(adapter="a1", outcome="length"), 1),
            (dict(adapter=base, outcome="invalid"), 1),
        ):
            assert (
                value(after, "loramux_requests_total", **labels)
                - value(before, "loramux_requests_total", **labels)
                == grown
            )
        names = {family.name for family in text_string_to_metric_families(answer.text)}
        assert {
            "loramux_requests",
            "loramux_time_to_first_token_seconds",
            "loramux_time_per_output_token_seconds",
            "loramux_e2e_request_latency_seconds",
            "loramux_prompt_tokens",
            "loramux_generation_tokens",
            "loramux_queue_depth",
            "loramux_running_requests",
            "loramux_kv_cache_usage_ratio",
            "loramux_kv_cache_bytes",
            "loramux_adapters",
            "loramux_adapter_slots",
            "loramux_adapter_loads",
            "loramux_adapter_evictions",
            "loramux_adapter_load_seconds",
            "vllm:lora_requests_info",
            "process_resident_memory_bytes",
        } <= names
    finally:
        grpc_server._call(http.stop())
        grpc_server.close()


def test_bodies_the_shim_refuses_are_counted_by_their_model(engine: Engine) -> None:
    """`loramux serve` hands the shim `count_refused_body`: schema refusals count as `invalid`, and
    bodies over the size limit (413: never read, so their model is unknown) as `<unknown>`."""
    from functools import partial

    from server.serve_commands import count_refused_body

    grpc_server = ServerThread(engine)
    app = create_app(
        grpc_server.target,
        metrics_registry=METRICS[engine].registry,
        limits=HttpLimits(max_body_mb=1 / 64),  # 16 KiB
        on_refused=partial(count_refused_body, engine),
    )
    http = HttpServer(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{grpc_server._call(http.start())}"
    base = engine.info.model_name
    try:
        before = scrape_text(httpx.get(url + "/metrics").text)
        bodies = [
            dict(model=base, prompt="Hello", n=0),
            dict(model="a1", prompt="Hello", max_tokens=-1),
            dict(model="auto", prompt="Hello", n=0),
            dict(model="no-such-adapter", prompt="Hello", n=0),
            dict(prompt="Hello"),  # no model at all
        ]
        for body in bodies:
            assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 400
        chat = dict(model="a1", messages=[{"role": "user", "content": "hi"}], n=0)
        assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 400
        large = dict(model="a1", prompt="x" * 20_000)
        assert httpx.post(url + "/v1/completions", json=large, timeout=60).status_code == 413  # declared
        chunks = (part.encode() for part in ('{"model": "a1", "prompt": "', "x" * 20_000, '"}'))
        answer = httpx.post(url + "/v1/completions", content=chunks, timeout=60)  # chunked: counted as read
        assert answer.status_code == 413
        assert httpx.post(url + "/v1/models", content=b"x" * 20_000, timeout=60).status_code in (405, 413)
        after = scrape_text(httpx.get(url + "/metrics").text)
        for adapter, grown in ((base, 1), ("a1", 2), ("auto", 1), (UNKNOWN_ADAPTER, 4)):
            labels = dict(adapter=adapter, outcome="invalid")
            grew = value(after, "loramux_requests_total", **labels) - value(
                before, "loramux_requests_total", **labels
            )
            assert grew == grown, adapter
    finally:
        grpc_server._call(http.stop())
        grpc_server.close()


def test_metrics_of_the_shim_alone_are_its_process_metrics() -> None:
    """`loramux http` runs in another process than the engine: it shows only its own process."""
    grpc_server_less = HttpServer(create_app("127.0.0.1:1"), "127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    port = call(grpc_server_less.start())
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert answer.status_code == 200
        names = {family.name for family in text_string_to_metric_families(answer.text)}
        assert "process_resident_memory_bytes" in names
    finally:
        call(grpc_server_less.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_metrics_are_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in ("loramux_requests_total", "loramux_adapter_load_seconds", "vllm:lora_requests_info"):
        assert name in readme


def test_bench_metrics_counts_the_series_a_cap_saves() -> None:
    from bench.metrics_bench import scrape_cost

    capped, uncapped = scrape_cost(20, 5, 1), scrape_cost(20, None, 1)
    per_label = (int(uncapped["lines"]) - int(capped["lines"])) / 14  # 20 labels vs 5 + <other>
    assert per_label > 50 and int(capped["bytes"]) < int(uncapped["bytes"])
