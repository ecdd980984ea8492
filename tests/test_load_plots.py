"""The load test's scraping and plots: `/metrics` text -> samples -> series -> report -> PNGs.

Scraping is checked against a real exposition (a `server.metrics.Metrics` with known events and
engine state, rendered by prometheus_client), a vLLM-style text, and a tiny local HTTP server
whose counter equals the number of scrapes it answered, so the series the Scraper keeps can be
checked value by value, failures included. The plots are checked to write valid PNGs from
reports built by report.py out of synthetic records, including reports with parts missing.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client import generate_latest

from bench.loadtest import plots, scrape
from bench.loadtest.records import CANARY, ERR_REFUSED, RequestRecord
from bench.loadtest.report import Objective, build_report
from bench.loadtest.scrape import ScrapeConfig, ScrapeError, Scraper, parse_sample, scrape_once
from server.engine.events import AdapterSnapshot, EngineSnapshot, FinishedRequest
from server.metrics import Metrics

# -- parsing -----------------------------------------------------------------------------------


def _finished(adapter: str, outcome: str, prompt: int, generated: int) -> FinishedRequest:
    return FinishedRequest(
        adapter, outcome, prompt, generated, submitted_at=1.0, first_token_at=1.2, finished_at=2.0
    )


def test_a_loramux_exposition_gives_one_flat_sample() -> None:
    metrics = Metrics()  # process metrics on, as a server has them: they must not leak in
    tiers = AdapterSnapshot(
        tiers={"device": 2, "host": 1, "disk": 5},
        host_loads=4,
        device_loads=6,
        host_evictions=1,
        device_evictions=2,
        num_slots=4,
    )
    metrics.watch(lambda: EngineSnapshot(3, 2, 8, 1000, ("a",), ("b",), tiers, threads=2))
    metrics.step_finished(0.25)
    metrics.step_finished(0.5)
    metrics.request_finished(_finished("a", "stop", prompt=10, generated=5))
    metrics.request_finished(_finished("a", "length", prompt=7, generated=16))
    metrics.request_finished(_finished("base", "stop", prompt=3, generated=2))
    metrics.request_refused("b", "overloaded")
    metrics.request_routed("a", "", 0.01)

    sample = parse_sample(generate_latest(metrics.registry).decode())

    assert sample == {
        "queue_depth": 3,
        "running": 2,
        "kv_usage": 0.25,
        "kv_cache_bytes": 1000,
        "adapters_device": 2,
        "adapters_host": 1,
        "adapters_disk": 5,
        "adapter_slots": 4,
        "adapter_loads_host": 4,
        "adapter_loads_device": 6,
        "adapter_evictions_host": 1,
        "adapter_evictions_device": 2,
        "requests_total": 4,
        "requests_stop": 2,
        "requests_length": 1,
        "requests_overloaded": 1,
        "generation_tokens_total": 5 + 16 + 2,
        "prompt_tokens_total": 10 + 7 + 3,
        "engine_steps_total": 2,
        "engine_step_seconds_total": 0.75,
        "engine_threads": 2,
    }


def test_a_server_without_adapters_or_engine_has_those_series_missing() -> None:
    metrics = Metrics(process_metrics=False)
    no_steps = {"engine_steps_total": 0, "engine_step_seconds_total": 0}  # the step histogram, empty
    assert parse_sample(generate_latest(metrics.registry).decode()) == no_steps  # no engine watched
    metrics.watch(lambda: EngineSnapshot(0, 0, 4, 0, (), (), None))
    sample = parse_sample(generate_latest(metrics.registry).decode())
    assert (
        sample
        == {"queue_depth": 0, "running": 0, "kv_usage": 0, "kv_cache_bytes": 0, "adapter_slots": 0} | no_steps
    )


VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 7.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 1.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 123.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="m"} 4.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 10.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 12.5
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} NaN
"""


def test_a_vllm_exposition_maps_to_the_same_names() -> None:
    sample = parse_sample(VLLM_TEXT)
    assert sample == {
        "running": 5,  # summed over engines
        "queue_depth": 7,
        "kv_usage": pytest.approx(0.4),  # a ratio: averaged over engines; the newer name wins over gpu_cache
        "requests_total": 10,
        "requests_stop": 8,
        "requests_length": 2,
        "generation_tokens_total": 123,
    }


def test_deltas_are_the_counters_grown_between_two_samples() -> None:
    before = {"requests_total": 5, "generation_tokens_total": 100, "running": 4, "adapter_loads_host": 1}
    after = {"requests_total": 12, "generation_tokens_total": 160, "running": 1, "requests_stop": 3}
    # requests_stop had no sample before (a labelled counter appears at its first count): from 0.
    assert scrape.deltas(before, after) == {
        "requests_total": 7,
        "generation_tokens_total": 60,
        "requests_stop": 3,
    }


# -- the Scraper against a local server --------------------------------------------------------


class MetricsServer:
    """A /metrics server in a thread: scrape number n answers `requests_total n`, every
    `fail_every`-th answers 500, and `running` appears from the third scrape on."""

    def __init__(self, fail_every: int = 0) -> None:
        self.hits = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                with outer.lock:
                    outer.hits += 1
                    hit = outer.hits
                if fail_every and hit % fail_every == 0:
                    self.send_error(500)
                    return
                lines = ["# TYPE loramux_requests counter", f'loramux_requests_total{{outcome="stop"}} {hit}']
                if hit >= 3:
                    lines += ["# TYPE loramux_running_requests gauge", f"loramux_running_requests {hit % 2}"]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metrics_server() -> Iterator[MetricsServer]:
    server = MetricsServer(fail_every=4)
    yield server
    server.close()


def _free_port_url() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"


async def _scrape_until(scraper: Scraper, done: Any, deadline_s: float = 30.0) -> None:
    scraper.start()
    deadline = time.monotonic() + deadline_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await scraper.stop()


def test_the_scraper_keeps_aligned_series_and_counts_failures(metrics_server: MetricsServer) -> None:
    start = time.monotonic()
    scraper = Scraper(ScrapeConfig(metrics_server.url, interval_s=0.02), start_s=start)
    asyncio.run(_scrape_until(scraper, lambda: metrics_server.hits >= 10))
    result = scraper.result()
    hits = metrics_server.hits

    # every answer is kept in order, or counted when it was a 500; a scrape in flight at stop is neither
    answered = len(result["t_s"]) + scraper.failures
    assert answered in (hits, hits - 1)
    kept = [h for h in range(1, answered + 1) if h % 4]
    assert result["series"]["requests_total"] == kept
    assert scraper.failures == answered // 4 >= 2
    assert len(result["t_s"]) == len(result["series"]["requests_total"])
    assert result["t_s"] == sorted(result["t_s"]) and 0 <= result["t_s"][0] <= time.monotonic() - start
    assert set(result["series"]) == {"requests_total", "requests_stop", "running"}
    assert all(len(values) == len(result["t_s"]) for values in result["series"].values())
    # `running` first appeared at scrape 3: None before it, the server's value from it on
    expected_running = [None if h < 3 else h % 2 for h in kept]
    assert result["series"]["running"] == expected_running
    assert "500" in (scraper.last_error or "")
    json.dumps(result)  # the report's server_metrics as it is written


def test_a_down_server_is_counted_not_raised() -> None:
    scraper = Scraper(ScrapeConfig(_free_port_url(), interval_s=0.02, timeout_s=2), start_s=time.monotonic())
    asyncio.run(_scrape_until(scraper, lambda: scraper.failures >= 3))
    assert scraper.failures >= 3
    assert scraper.result() == {"t_s": [], "series": {}}
    assert "ConnectError" in (scraper.last_error or "")


def test_scrape_once(metrics_server: MetricsServer) -> None:
    assert asyncio.run(scrape_once(metrics_server.url)) == {"requests_total": 1, "requests_stop": 1}
    with pytest.raises(ScrapeError, match="ConnectError"):
        asyncio.run(scrape_once(_free_port_url(), timeout_s=2))


def test_a_page_that_is_not_metrics_is_a_scrape_error() -> None:
    class Html(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"<html>a web page</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ScrapeError, match="not a Prometheus text exposition"):
            asyncio.run(scrape_once(f"http://127.0.0.1:{server.server_address[1]}/"))
    finally:
        server.shutdown()
        server.server_close()


# -- plots -------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OBJECTIVE = Objective(ttft_p99_s=0.8, tpot_mean_s=0.05)


def _assert_pngs(paths: list[Path], names: list[str]) -> None:
    assert [p.name for p in paths] == names
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC, path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width >= 300 and image.height >= 200, (path, image.size)


def _records(adapters: list[str], seed: int = 0, n: int = 60, tiers: bool = True) -> list[RequestRecord]:
    """Requests over `adapters` with random latencies; one refused, one canary."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        adapter = adapters[i % len(adapters)] if i % 7 else ""  # some for the base model
        planned = i * 0.1
        first = planned + rng.uniform(0.05, 1.0)
        tokens = rng.randint(1, 20)
        times = [first + k * rng.uniform(0.01, 0.06) for k in range(tokens)]
        records.append(
            RequestRecord(
                index=i,
                adapter=adapter,
                kind="load",
                planned_s=planned,
                sent_s=planned + 0.001,
                prompt_tokens=16,
                max_tokens=20,
                first_token_s=first,
                token_times_s=times,
                end_s=times[-1],
                output_tokens=tokens,
                tier=rng.choice(["device", "host", "disk", None]) if tiers and adapter else None,
            )
        )
    records.append(RequestRecord(n, adapters[0], "load", 1.0, 1.0, 16, 20, error=ERR_REFUSED))
    records.append(RequestRecord(n + 1, adapters[0], CANARY, 0.0, 0.0, 4, 8, first_token_s=0.1, end_s=0.2))
    return records


def _server_metrics() -> dict[str, Any]:
    scraper = Scraper(ScrapeConfig("http://unused"), start_s=0.0)
    for step in range(12):
        sample = {
            "queue_depth": step % 4,
            "running": 3,
            "kv_usage": step / 12,
            "adapters_device": 2,
            "adapters_host": 3,
            "adapters_disk": 5,
            "adapter_slots": 2,
            "adapter_loads_host": step,
            "adapter_loads_device": 2 * step,
            "generation_tokens_total": 40 * step,
            "requests_stop": 3 * step,
            "requests_total": 3 * step,
        }
        if step >= 4:
            sample["adapter_evictions_device"] = step - 4
        if step == 6:
            del sample["running"]  # a scrape that lacked it
        scraper.add(0.5 * step, sample)
    return scraper.result()


def _report(adapters: list[str], **kwargs: Any) -> dict[str, Any]:
    metrics = kwargs.pop("server_metrics", None)
    report = build_report(_records(adapters, **kwargs), {"target": "test"}, OBJECTIVE, metrics)
    return json.loads(json.dumps(report))  # as --compare reads it back


def test_plot_report_writes_every_figure(tmp_path: Path) -> None:
    report = _report(["a", "b", "c"], server_metrics=_server_metrics())
    paths = plots.plot_report(report, tmp_path / "run")
    _assert_pngs(paths, ["latency_cdf.png", "per_adapter.png", "ttft_by_tier.png", "server_metrics.png"])


def test_plot_report_leaves_out_what_a_report_lacks(tmp_path: Path) -> None:
    # no tiers, no scraped metrics: the latency and per-adapter figures only
    report = _report(["a"], tiers=False)
    assert report["by_tier"] == {"unknown": report["by_tier"]["unknown"]}  # tierless adapter requests
    _assert_pngs(
        plots.plot_report(report, tmp_path / "partial"),
        ["latency_cdf.png", "per_adapter.png", "ttft_by_tier.png"],
    )
    # a run where nothing was answered: percentiles None, nothing to draw but the requests
    failed = build_report([RequestRecord(0, "a", "load", 0.0, 0.0, 4, 8, error=ERR_REFUSED)], {}, Objective())
    _assert_pngs(plots.plot_report(failed, tmp_path / "failed"), ["per_adapter.png"])
    # an empty run, and a report missing whole sections
    assert plots.plot_report(build_report([], {}, Objective()), tmp_path / "empty") == []
    assert plots.plot_report({"ttft": {"p50": 0.1, "p99": None}}, tmp_path / "bare") == [
        tmp_path / "bare" / "latency_cdf.png"
    ]


def test_the_busiest_adapters_are_drawn_when_there_are_many(tmp_path: Path) -> None:
    per_adapter = {f"adapter-{i:02d}": {"requests": i % 45} for i in range(40)}
    top = plots.top_adapters(per_adapter)
    assert len(top) == plots.MAX_ADAPTER_BARS
    assert top[:3] == ["adapter-39", "adapter-38", "adapter-37"] and "adapter-09" not in top
    report = _report([f"adapter-{i:02d}-with-a-rather-long-name" for i in range(40)], n=400)
    _assert_pngs(
        plots.plot_report(report, tmp_path), ["latency_cdf.png", "per_adapter.png", "ttft_by_tier.png"]
    )


def test_a_cdf_comes_from_quantiles_when_the_report_has_them() -> None:
    report = _report(["a", "b"])
    del report["quantiles"]  # a report without them: the summary's percentiles stand in
    summary = report["ttft"]
    expected = [(summary["p50"], 0.5), (summary["p90"], 0.9), (summary["p99"], 0.99), (summary["max"], 1.0)]
    assert plots.distribution(report, "ttft") == expected
    report["quantiles"] = {"ttft": [[0, 0.1], [50, 0.3], [100, 0.9]]}
    assert plots.distribution(report, "ttft") == [(0.1, 0.0), (0.3, 0.5), (0.9, 1.0)]
    assert plots.distribution({}, "tpot") == []


def test_counter_rates() -> None:
    rates = plots.counter_rates([0.0, 1.0, 2.0, 4.0, 5.0, 6.0], [0, 10, None, 30, 5, 7])
    finite = [r if not math.isnan(r) else None for r in rates]
    assert finite == [None, 10.0, None, None, None, 2.0]  # unknown at the start, at a gap and a reset


def test_mean_step_ms_from_the_step_histograms_sum_and_count() -> None:
    t_s = [0.0, 1.0, 2.0, 3.0]
    seconds = [0.0, 0.5, 0.5, 2.5]  # sum of step seconds
    steps = [0, 10, 10, 20]  # steps counted
    ms = plots.mean_step_ms(t_s, seconds, steps)
    assert math.isnan(ms[0]) and math.isnan(ms[2])  # the first scrape; no step in between
    assert ms[1] == pytest.approx(50.0) and ms[3] == pytest.approx(200.0)


def test_plot_sweep(tmp_path: Path) -> None:
    points = [
        {"rate": rate, "report": _report(["a", "b"], seed=rate), "meets_objective": rate < 4}
        for rate in (1, 2, 4)
    ]
    points.append({"rate": 8, "report": build_report([], {}, OBJECTIVE), "meets_objective": False})
    sweep = {
        "objective": {"ttft_p99_s": 0.8, "tpot_mean_s": 0.05},
        "points": points,
        "best_rate": 2,
        "stopped_early": True,
    }
    _assert_pngs(plots.plot_sweep(sweep, tmp_path / "sweep.png"), ["sweep.png"])
    nothing_met: dict[str, Any] = {
        "objective": {},
        "points": points[:1],
        "best_rate": None,
        "stopped_early": False,
    }
    _assert_pngs(plots.plot_sweep(nothing_met, tmp_path / "one.png"), ["one.png"])
    assert plots.plot_sweep({"objective": {}, "points": [], "best_rate": None}, tmp_path / "none.png") == []


def test_plot_scaling(tmp_path: Path) -> None:
    by_count = {str(count): _report([f"a{i}" for i in range(count)], seed=count) for count in (1, 8, 64)}
    by_count["512"] = build_report([], {}, Objective())  # a run that answered nothing
    _assert_pngs(plots.plot_scaling(by_count, tmp_path / "scaling.png"), ["scaling.png"])
    assert plots.plot_scaling({}, tmp_path / "none.png") == []


def test_plot_compare(tmp_path: Path) -> None:
    a, b = _report(["a", "b"], seed=1), _report(["a", "b"], seed=2)
    _assert_pngs(plots.plot_compare(a, b, ["loramux", "vllm"], tmp_path / "ab.png"), ["ab.png"])
    empty = build_report([], {}, Objective())
    _assert_pngs(plots.plot_compare(a, empty, ["a", "empty"], tmp_path / "a0.png"), ["a0.png"])
    _assert_pngs(plots.plot_compare(empty, empty, ["x", "y"], tmp_path / "00.png"), ["00.png"])
    with pytest.raises(ValueError, match="two labels"):
        plots.plot_compare(a, b, ["only one"], tmp_path / "bad.png")
