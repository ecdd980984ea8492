"""The gateway contract: `/metrics` read the way the Gateway API Inference Extension's endpoint
picker (llm-d) reads vLLM's, and the residency series a load-state scorer reads.

A tiny engine with one KV slot (a second request waits) and two adapter slots is started from
`loramux serve` flags as `run_server` starts it (vLLM's spellings, a `--lora-modules` adapter, a
served model name). `picker_view` parses the text as the picker's extractor does: the
`vllm:lora_requests_info` series of largest value, its adapter labels split on commas and trimmed,
`max_lora` as an integer; the queue, running and KV-cache gauges by name. The oracle is what the
test itself put in the engine: which request runs, which waits, which adapters it used.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.cli import build_parser, server_config
from server.engine.engine import Engine
from server.engine.request import RequestOutput, SamplingParams
from server.metrics import Metrics
from server.runtime import build_engine
from server.serve_commands import load_modules, serve_as, watch_engine
from tests.conftest import prepare
from tests.test_adapters_engine import _save_adapter
from tests.test_engine import Collected
from tests.test_grpc_service import _wait_until

RANK4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
RANK8: dict[str, Any] = dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"])
RANKS = {"a": RANK4, "b": RANK4, "c": RANK4, "d": RANK8, "e": RANK4, "f": RANK4}
PROMPT = (5, 17, 300, 42, 7, 99)
FIVE = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
SERVED_NAME = "tiny-base"


@dataclass(frozen=True)
class PickerView:
    """What the endpoint picker keeps of one scrape (its `Metrics` of a pod), plus residency."""

    waiting_queue: float
    running_requests: float
    kv_cache_usage: float
    active_models: frozenset[str]
    waiting_models: frozenset[str]
    max_active_models: int
    lora_info_value: float
    loaded: dict[str, tuple[str, str, str]]  # adapter_name -> (level, pinned, rank)
    gpu_loaded: float
    max_gpu: float
    model_names: frozenset[str]


def _split(csv: str) -> frozenset[str]:
    return frozenset(name.strip() for name in csv.split(",") if name.strip())


def picker_view(text: str) -> PickerView:
    samples = {family.name: family.samples for family in text_string_to_metric_families(text)}

    def gauge(name: str) -> float:
        (sample,) = samples[name]  # one series, as the picker expects of these gauges
        return float(sample.value)

    lora = max(samples["vllm:lora_requests_info"], key=lambda sample: sample.value)
    return PickerView(
        waiting_queue=gauge("vllm:num_requests_waiting"),
        running_requests=gauge("vllm:num_requests_running"),
        kv_cache_usage=gauge("vllm:kv_cache_usage_perc"),
        active_models=_split(lora.labels["running_lora_adapters"]),
        waiting_models=_split(lora.labels["waiting_lora_adapters"]),
        max_active_models=int(lora.labels["max_lora"]),
        lora_info_value=float(lora.value),
        loaded={
            s.labels["adapter_name"]: (s.labels["level"], s.labels["pinned"], s.labels["rank"])
            for s in samples["vllm:lora_adapter_loaded"]
            if s.value == 1
        },
        gpu_loaded=gauge("vllm:num_gpu_loaded_lora_adapters"),
        max_gpu=gauge("vllm:max_gpu_lora_adapters"),
        model_names=frozenset(
            s.labels.get("model_name", "") for name in ("vllm:num_requests_running",) for s in samples[name]
        ),
    )


class SlowSink(Collected):
    """Sleeps on every output so that a long request is still running when the test looks."""

    def __call__(self, out: RequestOutput) -> None:
        time.sleep(0.02)
        super().__call__(out)


@dataclass
class Served:
    engine: Engine
    metrics: Metrics

    def view(self) -> PickerView:
        return picker_view(self.metrics.exposition().decode())

    def start(self, rid: str, adapter: str, params: SamplingParams = LONG) -> Collected:
        sink = SlowSink() if params is LONG else Collected()
        sink.handle = self.engine.submit(prepare(self.engine, rid, list(PROMPT), params, adapter), sink)
        return sink

    def run(self, rid: str, adapter: str) -> list[int]:
        return self.start(rid, adapter, FIVE).wait().tokens

    def stop(self, sink: Collected) -> None:
        assert sink.handle is not None
        self.engine.abort(sink.handle)
        sink.wait()


@pytest.fixture(scope="module")
def served(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("gateway-adapters")
    for seed, (name, config) in enumerate(RANKS.items()):
        _save_adapter(base, root / name, config, seed=seed)
    modules = tmp_path_factory.mktemp("gateway-modules")
    shutil.copytree(root / "a", modules / "a-copy")  # served as "m": the same weights as "a"
    flags = ["serve", str(base), "--device", "cpu", "--adapter-root", str(root)]
    flags += ["--max-num-seqs", "1", "--max-queue", "8", "--max-model-len", "256"]
    flags += ["--max-num-batched-tokens", "64", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]
    flags += ["--lora-modules", f"m={modules / 'a-copy'}", "--served-model-name", SERVED_NAME]
    config = server_config(build_parser().parse_args(flags))
    metrics = Metrics(process_metrics=False)
    engine = build_engine(config, metrics)  # what run_server does, in its order
    serve_as(engine, config.served_model_name)
    load_modules(engine, config.adapters.modules)
    watch_engine(metrics, engine)
    engine.start()
    yield Served(engine, metrics)
    engine.shutdown()


def test_running_and_waiting_adapters_are_what_their_names_say(served: Served) -> None:
    idle = served.view()
    assert (idle.active_models, idle.waiting_models) == (frozenset(), frozenset())
    assert (idle.running_requests, idle.waiting_queue, idle.kv_cache_usage) == (0, 0, 0)
    assert idle.max_active_models == 2
    time.sleep(0.05)
    assert served.view().lora_info_value == idle.lora_info_value  # nothing changed: neither did the time

    on_a = served.start("run-a", "a")
    assert _wait_until(lambda: len(on_a.outputs) > 0, timeout=60)
    on_b = served.start("wait-b", "b")  # one KV slot: it waits
    assert _wait_until(lambda: served.view().waiting_models == {"b"}, timeout=30)
    busy = served.view()
    assert busy.active_models == {"a"} and busy.waiting_models == {"b"}
    assert (busy.running_requests, busy.waiting_queue, busy.kv_cache_usage) == (1, 1, 1.0)
    assert busy.lora_info_value > idle.lora_info_value
    assert abs(busy.lora_info_value - time.time()) < 60
    time.sleep(0.05)
    assert served.view().lora_info_value == busy.lora_info_value

    served.stop(on_a)  # b runs now; nothing waits
    assert _wait_until(lambda: served.view().active_models == {"b"}, timeout=30)
    b_only = served.view()
    assert b_only.waiting_models == frozenset()
    assert (b_only.running_requests, b_only.waiting_queue) == (1, 0)
    assert b_only.lora_info_value > busy.lora_info_value

    served.stop(on_b)
    assert _wait_until(lambda: not served.view().active_models, timeout=30)
    done = served.view()
    assert done.waiting_models == frozenset()
    assert (done.running_requests, done.waiting_queue, done.kv_cache_usage) == (0, 0, 0)
    assert done.lora_info_value > b_only.lora_info_value


def test_both_sets_list_an_adapter_that_runs_and_waits(served: Served) -> None:
    first = served.start("first-c", "c")
    assert _wait_until(lambda: len(first.outputs) > 0, timeout=60)
    second = served.start("second-c", "c")
    assert _wait_until(lambda: served.view().waiting_models == {"c"}, timeout=30)
    view = served.view()
    assert view.active_models == {"c"} and (view.running_requests, view.waiting_queue) == (1, 1)
    served.stop(second)
    served.stop(first)
    assert _wait_until(lambda: served.view().running_requests == 0, timeout=30)


def test_residency_follows_the_tiers(served: Served) -> None:
    manager = served.engine.adapters
    assert manager is not None
    start = served.view()
    assert start.max_gpu == 2
    assert "f" not in start.loaded and "e" not in start.loaded  # never used: on disk only, no series

    served.run("res-d", "d")
    served.run("res-e", "e")
    view = served.view()
    assert view.loaded["d"] == ("gpu", "false", "8") and view.loaded["e"] == ("gpu", "false", "4")
    assert view.gpu_loaded == 2 == sum(level == "gpu" for level, _, _ in view.loaded.values())

    served.run("res-f", "f")  # two slots: the least recently used of d and e leaves its slot
    view = served.view()
    assert view.loaded["f"] == ("gpu", "false", "4") and view.loaded["e"][0] == "gpu"
    assert view.loaded["d"] == ("cpu", "false", "8")  # still in the host tier
    assert view.gpu_loaded == 2

    long_e = served.start("pinned-e", "e")
    assert _wait_until(lambda: len(long_e.outputs) > 0, timeout=60)
    assert served.view().loaded["e"] == ("gpu", "true", "4")
    served.stop(long_e)
    assert _wait_until(lambda: served.view().loaded["e"] == ("gpu", "false", "4"), timeout=30)

    manager.store.host.evict("d")  # on disk only again: its series goes
    assert "d" not in served.view().loaded


def test_lora_modules_are_loaded_at_start_under_their_name(served: Served) -> None:
    """`--lora-modules m=DIR` serves DIR's weights as "m" from the start, before any request."""
    manager = served.engine.adapters
    assert manager is not None
    assert "m" in manager.store.registered_names()
    # advertised before any request on it: in the host tier, never in a slot (only this test uses it)
    assert served.view().loaded["m"] == ("cpu", "false", "4")
    assert served.run("module-m", "m") == served.run("root-a", "a") != served.run("base", "")
    assert manager.is_listed("a-copy")  # its directory's parent became a root (documented)


def test_the_served_model_name_labels_the_vllm_gauges(served: Served) -> None:
    assert served.engine.info.model_name == SERVED_NAME
    assert served.view().model_names == {SERVED_NAME}


def test_a_scrape_shows_no_adapter_that_is_only_on_disk(tmp_path: Path) -> None:
    """Residency costs what the memory tiers hold: an engine without adapters shows no LoRA series,
    and `Metrics.watch` without a residency reader shows the residency family empty."""
    from server.engine.events import AdapterSnapshot, EngineSnapshot

    tiers = AdapterSnapshot(tiers={"device": 1, "host": 0, "disk": 9_999}, num_slots=4)
    metrics = Metrics(process_metrics=False)
    metrics.watch(lambda: EngineSnapshot(0, 0, 4, 0, (), (), tiers))
    view = picker_view(metrics.exposition().decode())
    assert view.loaded == {} and view.gpu_loaded == 1 and view.max_gpu == 4
    assert view.model_names == {""}

    bare = Metrics(process_metrics=False)
    bare.watch(lambda: EngineSnapshot(0, 0, 4, 0, (), (), None))
    names = {family.name for family in text_string_to_metric_families(bare.exposition().decode())}
    assert "vllm:num_requests_waiting" in names
    assert not any(name.startswith("vllm:") and "lora" in name for name in names)
