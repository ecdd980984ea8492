"""The router behind every API: adapter "auto" over gRPC, model "auto" over HTTP, Route,
RegisterExamples, weighted mixtures over HTTP, and the router's metrics.

One tiny random Llama engine serves two adapters, `alpha` and `beta`; the router learns each from
a different synthetic task's prompts (tasks.synthetic) and must send the other held-out prompts of
a task to its adapter. One gRPC server has the router (its metrics watched), a second one on the
same engine has none (as `--no-router`), a third one has an admin token; two HTTP shims (admin off
and on) sit in front of the first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import openai
import pytest

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import cli
from server.auth import AuthConfig, bearer_metadata
from server.config import AdapterConfig, EngineConfig, RouterConfig, ServerConfig
from server.engine.engine import Engine
from server.http.app import create_app
from server.http.server import HttpServer
from server.metrics import Metrics
from server.router.router import Router
from server.runtime import build_engine, build_router
from tasks.synthetic import synthetic_tasks
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread, _wait_until

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
ADAPTERS = ("alpha", "beta")
ADMIN_TOKEN = "router-admin"
TASKS = synthetic_tasks(4)
EXAMPLES = {name: task.prompts(40, seed=0) for name, task in zip(ADAPTERS, TASKS, strict=False)}
HELD_OUT = {name: task.prompts(10, seed=1) for name, task in zip(ADAPTERS, TASKS, strict=False)}


@pytest.fixture(scope="module")
def dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("router-adapters")
    for seed, name in enumerate(ADAPTERS):
        _save_adapter(base, root / name, QV4, seed=seed + 40)
    _save_adapter(base, root / "spare" / "gamma", QV4, seed=43)  # below the top: served once loaded
    _save_adapter(base, root / "spare" / "delta", QV4, seed=44)  # with its own examples.jsonl
    rows = "".join(json.dumps({"prompt": p}) + "\n" for p in TASKS[3].prompts(40, seed=0))
    (root / "spare" / "delta" / "examples.jsonl").write_text(rows)
    return {"base": base, "root": root, "state": tmp_path_factory.mktemp("router-state")}


class Stack:
    """The engine, its router and metrics, three gRPC servers and two HTTP shims (see above)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.metrics = Metrics(process_metrics=False)
        config = ServerConfig(
            model=str(dirs["base"]),
            device="cpu",
            engine=EngineConfig(max_running=4, max_queue=16, max_model_len=256, max_batched_tokens=64),
            adapters=AdapterConfig(roots=(str(dirs["root"]),), max_slots=2, max_rank=8),
            # No threshold and no domain test: a random model's features separate the tasks, but
            # its calibration says little; these tests are about the APIs, not the router's quality.
            router=RouterConfig(
                threshold=0.0,
                domain_factor=1e6,
                steps=100,
                state_path=str(dirs["state"] / "router.safetensors"),
            ),
        )
        self.engine: Engine = build_engine(config, self.metrics)
        router = build_router(self.engine, config)
        assert router is not None
        self.router: Router = router
        self.metrics.watch(self.engine.snapshot)
        self.metrics.watch_router(router.routable_counts)
        self.engine.start()
        self.grpc = ServerThread(self.engine, router=router, router_events=self.metrics)
        self.plain = ServerThread(self.engine)  # no router, as --no-router
        self.guarded = ServerThread(self.engine, router=router, auth=AuthConfig(admin_token=ADMIN_TOKEN))
        self.http = HttpServer(create_app(self.grpc.target), "127.0.0.1", 0)
        self.admin_http = HttpServer(create_app(self.grpc.target, enable_admin=True), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.grpc._call(self.http.start())}"
        self.admin_url = f"http://127.0.0.1:{self.grpc._call(self.admin_http.start())}"
        self.channel = grpc.insecure_channel(self.grpc.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.grpc._call(self.http.stop())
        self.grpc._call(self.admin_http.stop())
        for server in (self.grpc, self.plain, self.guarded):
            server.close()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def stack(dirs: dict[str, Path]) -> Iterator[Stack]:
    running = Stack(dirs)
    try:
        for name in ADAPTERS:  # the router learns both adapters over the wire
            learned = running.stub.RegisterExamples(
                pb.RegisterExamplesRequest(adapter=name, prompts=EXAMPLES[name]), timeout=120
            )
            assert (learned.adapter, learned.examples, learned.steps) == (name, 40, 100)
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def held_out(stack: Stack) -> dict[str, str]:
    """Per adapter, the first held-out prompt of its task that Route ranks it first for."""
    picked = {}
    for name in ADAPTERS:
        for prompt in HELD_OUT[name]:
            if _route(stack.stub, prompt).candidates[0].adapter == name:
                picked[name] = prompt
                break
    return picked


def _chat(prompt: str) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user", content=prompt)]


def _route(stub: pb_grpc.InferenceStub, prompt: str, top_k: int = 0) -> pb.RouteResponse:
    return stub.Route(pb.RouteRequest(messages=_chat(prompt), top_k=top_k), timeout=30)


def _greedy(prompt: str, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=_chat(prompt), max_tokens=8, temperature=0.0, ignore_eos=True, **fields
    )


def _refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- gRPC ----------------------------------------------------------------------------------


def test_route_ranks_each_adapter_first_for_its_own_held_out_prompts(stack: Stack) -> None:
    for name in ADAPTERS:
        firsts = [_route(stack.stub, prompt).candidates[0].adapter for prompt in HELD_OUT[name]]
        assert firsts.count(name) >= 8, firsts  # the router learned the tasks apart
    answer = _route(stack.stub, HELD_OUT["alpha"][0])
    assert sorted(c.adapter for c in answer.candidates) == sorted(ADAPTERS)
    assert all(c.by == "examples" and c.weight == 0.0 for c in answer.candidates)
    assert sum(c.score for c in answer.candidates) == pytest.approx(1.0, abs=1e-5)
    assert not answer.fallback_to_base and answer.reason == "" and answer.route_seconds > 0
    assert len(_route(stack.stub, HELD_OUT["alpha"][0], top_k=1).candidates) == 1
    # past the 128 KV positions an engine cache starts with
    long = _route(stack.stub, HELD_OUT["alpha"][0] + " and more" * 45)
    assert long.candidates and long.route_seconds > 0


def test_auto_serves_the_routed_adapter_and_says_so(stack: Stack, held_out: dict[str, str]) -> None:
    prompt = held_out["alpha"]
    auto = stack.stub.Generate(_greedy(prompt, adapter="auto"), timeout=60)
    assert auto.adapter == "alpha"
    served = auto.routing.candidates
    assert [(c.adapter, c.weight) for c in served] == [("alpha", 1.0)]  # the server's default top_k: 1
    assert not auto.routing.fallback_to_base
    direct = stack.stub.Generate(_greedy(prompt, adapter="alpha"), timeout=60)
    assert list(auto.token_ids) == list(direct.token_ids) and not direct.HasField("routing")
    chunks = list(stack.stub.GenerateStream(_greedy(prompt, adapter="auto"), timeout=60))
    assert chunks[0].HasField("routing") and chunks[0].routing.candidates[0].adapter == "alpha"
    assert not any(chunk.HasField("routing") for chunk in chunks[1:])
    assert {chunk.adapter for chunk in chunks} == {"alpha"}
    assert [t for chunk in chunks for t in chunk.token_ids] == list(direct.token_ids)


def test_route_top_k_serves_the_mixture_it_reports(stack: Stack) -> None:
    # the prompt the second adapter has the largest share of: a mixture when it has 1% or more
    prompts = [f"{a} {b}" for a, b in zip(HELD_OUT["beta"], HELD_OUT["alpha"], strict=True)]
    routes = {p: _route(stack.stub, p).candidates[:2] for p in prompts}
    prompt = max(prompts, key=lambda p: routes[p][1].score / (routes[p][0].score + routes[p][1].score))
    first, second = routes[prompt]
    expected = [first.adapter] + (
        [second.adapter] if second.score >= 0.01 * (first.score + second.score) else []
    )
    auto = stack.stub.Generate(_greedy(prompt, adapter="auto", route_top_k=2), timeout=60)
    assert [c.adapter for c in auto.routing.candidates] == [first.adapter, second.adapter]
    served = [(c.adapter, c.weight) for c in auto.routing.candidates if c.weight > 0]  # 0: not served
    assert [name for name, _ in served] == expected and auto.adapter == "+".join(expected)
    assert sum(weight for _, weight in served) == pytest.approx(1.0, abs=1e-6)
    mixture = [pb.WeightedAdapter(name=name, weight=weight) for name, weight in served]
    named = stack.stub.Generate(_greedy(prompt, adapters=mixture), timeout=60)
    assert named.adapter == auto.adapter and list(named.token_ids) == list(auto.token_ids)


def test_route_top_k_is_checked(stack: Stack) -> None:
    for fields, words in (
        (dict(adapter="alpha", route_top_k=2), "route_top_k applies to adapter 'auto' only"),
        (dict(adapter="auto", route_top_k=0), "route_top_k must be between 1 and 8, got 0"),
        (dict(adapter="auto", route_top_k=9), "route_top_k must be between 1 and 8, got 9"),
    ):
        error = _refused(lambda fields=fields: stack.stub.Generate(_greedy("Hi", **fields), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()


def test_register_examples_refusals(stack: Stack) -> None:
    unknown = pb.RegisterExamplesRequest(adapter="nope", prompts=["hello there"])
    assert (
        _refused(lambda: stack.stub.RegisterExamples(unknown, timeout=30)).code() == grpc.StatusCode.NOT_FOUND
    )
    empty = _refused(
        lambda: stack.stub.RegisterExamples(pb.RegisterExamplesRequest(adapter="alpha"), timeout=30)
    )
    assert (
        empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "at least one example prompt" in empty.details()
    )
    blank = pb.RegisterExamplesRequest(adapter="alpha", prompts=["fine", "  "])
    error = _refused(lambda: stack.stub.RegisterExamples(blank, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts[1]" in error.details()
    with grpc.insecure_channel(stack.guarded.target) as channel:
        guarded = pb_grpc.InferenceStub(channel)
        request = pb.RegisterExamplesRequest(adapter="nope", prompts=["hello there"])
        denied = _refused(lambda: guarded.RegisterExamples(request, timeout=30))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        with_token = _refused(
            lambda: guarded.RegisterExamples(request, timeout=30, metadata=bearer_metadata(ADMIN_TOKEN))
        )
        assert with_token.code() == grpc.StatusCode.NOT_FOUND  # let in; the adapter is what is wrong


def test_adapters_the_router_may_not_pick_are_left_out(
    stack: Stack, held_out: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.router, "config", replace(stack.router.config, adapters=("*", "!beta")))
    assert [c.adapter for c in _route(stack.stub, held_out["beta"]).candidates] == ["alpha"]
    request = pb.RegisterExamplesRequest(adapter="beta", prompts=["hello there"])
    error = _refused(lambda: stack.stub.RegisterExamples(request, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "--router-adapters *,!beta" in error.details()


def test_without_a_router_auto_route_and_examples_are_refused_clearly(stack: Stack) -> None:
    with grpc.insecure_channel(stack.plain.target) as channel:
        plain = pb_grpc.InferenceStub(channel)
        assert not plain.GetInfo(pb.GetInfoRequest(), timeout=30).HasField("router")
        for call in (
            lambda: plain.Generate(_greedy("Hi", adapter="auto"), timeout=30),
            lambda: plain.Route(pb.RouteRequest(prompt="Hi"), timeout=30),
            lambda: plain.RegisterExamples(
                pb.RegisterExamplesRequest(adapter="alpha", prompts=["x"]), timeout=30
            ),
        ):
            error = _refused(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "the router is disabled on this server (started with --no-router)" in error.details()


def test_get_info_reports_the_router(stack: Stack) -> None:
    info = stack.stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert info.HasField("router")
    assert (info.router.top_k, info.router.layer, list(info.router.adapters)) == (1, 2, ["*"])
    assert (info.router.adapters_by_examples, info.router.adapters_by_weights) == (2, 0)


# -- command line --------------------------------------------------------------------------


def test_serve_router_flags_make_the_router_config() -> None:
    def router(*flags: str) -> RouterConfig:
        return cli.server_config(cli.build_parser().parse_args(["serve", *flags])).router

    assert router() == RouterConfig()
    assert router("--no-router").enabled is False
    flags = (
        "--router-adapters",
        "sql-*, arith ,!sql-old",
        "--router-threshold",
        "0.3",
        "--router-top-k",
        "2",
    )
    given = router(*flags, "--router-layer", "4")
    assert (given.adapters, given.threshold, given.top_k, given.layer) == (
        ("sql-*", "arith", "!sql-old"),
        0.3,
        2,
        4,
    )
    assert given.allows("sql-new") and not given.allows("sql-old") and not given.allows("other")
    for bad in (["--router-top-k", "9"], ["--router-adapters", "!x"], ["--router-layer", "-1"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", *bad])


def test_serve_learns_the_examples_files_in_the_background(dirs: dict[str, Path], tmp_path: Path) -> None:
    for name in ADAPTERS:  # as a trained adapter ships them
        rows = "".join(json.dumps({"prompt": p}) + "\n" for p in EXAMPLES[name][:20])
        (dirs["root"] / name / "examples.jsonl").write_text(rows)
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", str(dirs["base"]), "--grpc-port", "0"]
    argv += ["--http-port", "0", "--adapter-root", str(dirs["root"]), "--max-slots", "2", "--max-rank", "8"]
    argv += [
        "--max-model-len",
        "256",
        "--model-kernels",
        "torch",
        "--cache-dir",
        str(tmp_path),
        "--router-threshold",
        "0",
        "--router-rescan",
        "0.2",
    ]
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    try:
        assert process.stderr is not None
        log, target = [], None
        for line in process.stderr:
            log.append(line)
            serving = re.search(r"loramux serving \S+ on (127\.0\.0\.1:\d+) \(router on", line)
            target = serving.group(1) if serving else target
            if "router ready" in line:
                break
        else:
            pytest.fail("serve exited before the router was ready:\n" + "".join(log))
        assert target is not None and "2 adapters by examples" in line, "".join(log)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert stub.GetInfo(pb.GetInfoRequest(), timeout=30).router.adapters_by_examples == 2
            answer = stub.Generate(_greedy(HELD_OUT["alpha"][0], adapter="auto"), timeout=60)
        assert answer.HasField("routing") and answer.adapter in ("alpha", "")  # "": out of domain
        # an adapter dropped into a root while serving is learned from its examples.jsonl
        shutil.copytree(dirs["root"] / "spare" / "delta", dirs["root"] / "epsilon")
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert _wait_until(
                lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=30).router.adapters_by_examples == 3,
                timeout=60,
            )
        shutil.rmtree(dirs["root"] / "epsilon")
        assert (tmp_path / "router").is_dir()  # the tables are saved in the cache
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        for name in ADAPTERS:
            (dirs["root"] / name / "examples.jsonl").unlink()


def test_route_and_examples_commands(
    stack: Stack, held_out: dict[str, str], tmp_path: Path, capsys: Any
) -> None:
    target = ["--target", stack.grpc.target]
    assert cli.main(["route", "--prompt", held_out["alpha"], "--top-k", "1", *target]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert [c["adapter"] for c in routed["candidates"]] == ["alpha"] and routed["fallback_to_base"] is False
    file = tmp_path / "examples.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EXAMPLES["alpha"][:4]))
    assert cli.main(["adapters", "examples", "nope", str(file), *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    file.write_text('{"text": "no prompt"}\n')
    assert cli.main(["adapters", "examples", "alpha", str(file), *target]) == 2
    assert 'line 1: expected an object with a "prompt" string' in capsys.readouterr().err
    generate = ["generate", "--prompt", held_out["alpha"], "--adapter", "auto", "--max-tokens", "4", *target]
    assert cli.main(generate) == 0
    assert "[auto: alpha (1.00)]" in capsys.readouterr().err  # what served, apart from the text on stdout


# -- HTTP ----------------------------------------------------------------------------------


def test_http_model_auto_names_what_served(stack: Stack, held_out: dict[str, str]) -> None:
    messages = [{"role": "user", "content": held_out["alpha"]}]
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        assert "auto" in {model.id for model in client.models.list()}
        answer = client.chat.completions.create(
            model="auto", messages=messages, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
        )
        assert answer.model == "alpha"
        routing = (answer.model_extra or {})["routing"]
        assert routing["candidates"][0]["adapter"] == "alpha" and routing["fallback_to_base"] is False
        direct = client.chat.completions.create(
            model="alpha", messages=messages, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
        )
        assert direct.choices[0].message.content == answer.choices[0].message.content
        assert "routing" not in (direct.model_extra or {})
        stream = client.chat.completions.create(
            model="auto", messages=messages, max_tokens=8, temperature=0.0, stream=True
        )
        chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {"alpha"}
    assert (chunks[0].model_extra or {})["routing"]["candidates"][0]["adapter"] == "alpha"
    assert not any("routing" in (chunk.model_extra or {}) for chunk in chunks[1:])


def test_http_router_route_ranks_candidates(stack: Stack, held_out: dict[str, str]) -> None:
    body = {"messages": [{"role": "user", "content": held_out["beta"]}], "top_k": 1}
    answer = httpx.post(stack.url + "/v1/router/route", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    routed = answer.json()
    assert routed["object"] == "router.route" and [c["adapter"] for c in routed["candidates"]] == ["beta"]
    both = httpx.post(stack.url + "/v1/router/route", json={"prompt": "Hello"}, timeout=30).json()
    assert sorted(c["adapter"] for c in both["candidates"]) == sorted(ADAPTERS)
    neither = httpx.post(stack.url + "/v1/router/route", json={"top_k": 1}, timeout=30)
    assert neither.status_code == 400 and "set exactly one of" in neither.json()["error"]["message"]


def test_http_router_examples_is_an_admin_route(stack: Stack) -> None:
    body = {"adapter": "nope", "prompts": ["hello there"]}
    refused = httpx.post(stack.url + "/v1/router/examples", json=body, timeout=30)
    assert refused.status_code == 403 and "--enable-admin" in refused.json()["error"]["message"]
    unknown = httpx.post(stack.admin_url + "/v1/router/examples", json=body, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_http_mixture_equals_the_grpc_mixture(stack: Stack, dirs: dict[str, Path]) -> None:
    mixture = [("alpha", 0.7), ("beta", 1.6)]
    body = {
        "model": dirs["base"].name,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0.0,
        "ignore_eos": True,
        "adapters": [{"name": name, "weight": weight} for name, weight in mixture],
    }
    answer = httpx.post(stack.url + "/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "alpha+beta" and "routing" not in answer.json()
    request = pb.GenerateRequest(
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0.0,
        ignore_eos=True,
        adapters=[pb.WeightedAdapter(name=name, weight=weight) for name, weight in mixture],
    )
    assert answer.json()["choices"][0]["text"] == stack.stub.Generate(request, timeout=60).text
    wrong = httpx.post(stack.url + "/v1/completions", json={**body, "model": "alpha"}, timeout=30)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    assert "set model to the base model's id" in wrong.json()["error"]["message"]
    several = httpx.post(
        stack.url + "/v1/completions",
        json={"model": "auto", "prompt": ["a", "b"], "max_tokens": 2},
        timeout=30,
    )
    assert several.status_code == 400 and "one prompt per request" in several.json()["error"]["message"]


# -- metrics, and the router following the adapters ------------------------------------------


def _sample(exposition: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", exposition, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_routing(stack: Stack, held_out: dict[str, str]) -> None:
    before = stack.metrics.exposition().decode()
    stack.stub.Generate(_greedy(held_out["alpha"], adapter="auto"), timeout=60)
    after = stack.metrics.exposition().decode()
    decisions = ("loramux_router_decisions_total", '{adapter="alpha"}')
    assert _sample(after, *decisions) == _sample(before, *decisions) + 1
    assert (
        _sample(after, "loramux_router_route_seconds_count")
        == _sample(before, "loramux_router_route_seconds_count") + 1
    )
    assert _sample(after, "loramux_router_fallbacks_total", '{reason="below threshold"}') == 0
    assert _sample(after, "loramux_router_examples_learned_total") >= 80
    assert _sample(after, "loramux_router_adapters", '{by="examples"}') == 2
    assert _sample(after, "loramux_router_adapters", '{by="weights"}') == 0


def test_a_refused_auto_request_is_counted_as_auto(stack: Stack, held_out: dict[str, str]) -> None:
    refused = ("loramux_requests_total", '{adapter="auto",outcome="invalid"}')
    unknown = ("loramux_requests_total", '{adapter="<unknown>",outcome="invalid"}')
    before = stack.metrics.exposition().decode()
    error = _refused(
        lambda: stack.stub.Generate(_greedy(held_out["alpha"], adapter="auto", top_p=7.0), timeout=30)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in error.details()
    after = stack.metrics.exposition().decode()
    assert _sample(after, *refused) == _sample(before, *refused) + 1
    assert _sample(after, *unknown) == _sample(before, *unknown)


def test_load_with_examples_learns_and_unload_forgets(stack: Stack) -> None:
    load = pb.LoadAdapterRequest(
        name="gamma", path="spare/gamma", example_prompts=TASKS[2].prompts(20, seed=0)
    )
    assert stack.stub.LoadAdapter(load, timeout=120).adapter.name == "gamma"
    assert "gamma" in stack.router.tables.selector.classes
    held = TASKS[2].prompts(10, seed=1)
    firsts = [_route(stack.stub, prompt).candidates[0].adapter for prompt in held]
    assert firsts.count("gamma") >= 8, firsts
    bad = pb.LoadAdapterRequest(name="gamma2", path="spare/gamma", example_prompts=[""])
    error = _refused(lambda: stack.stub.LoadAdapter(bad, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "example_prompts[0]" in error.details()
    assert "gamma2" not in {
        a.name for a in stack.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters
    }
    stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="alpha"), timeout=30)  # still in the root
    stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="gamma"), timeout=30)  # gone for good
    assert _wait_until(lambda: "gamma" not in stack.router.tables.selector.classes)
    assert "alpha" in stack.router.tables.selector.classes  # the router forgets in order: alpha was kept


def test_a_loaded_adapter_is_routed_by_its_examples_file(stack: Stack) -> None:
    load = pb.LoadAdapterRequest(name="delta", path="spare/delta")  # no example_prompts: its file
    assert stack.stub.LoadAdapter(load, timeout=120).adapter.name == "delta"
    assert _wait_until(lambda: "delta" in stack.router.tables.selector.classes, timeout=60)
    firsts = [_route(stack.stub, prompt).candidates[0].adapter for prompt in TASKS[3].prompts(10, seed=1)]
    assert firsts.count("delta") >= 8, firsts
    stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="delta"), timeout=30)
    assert _wait_until(lambda: "delta" not in stack.router.tables.selector.classes)


def test_the_routers_reads_count_as_the_servers_host_loads(dirs: dict[str, Path], tmp_path: Path) -> None:
    for seed, name in enumerate(("one", "two")):  # no examples: the router reads their weights
        _save_adapter(dirs["base"], tmp_path / name, QV4, seed=seed + 50)
    metrics = Metrics(process_metrics=False)
    config = ServerConfig(
        model=str(dirs["base"]),
        device="cpu",
        engine=EngineConfig(max_running=2, max_queue=4, max_model_len=256, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(tmp_path),), max_slots=2, max_rank=8),
    )
    engine = build_engine(config, metrics)
    try:
        router = build_router(engine, config)
        assert router is not None and engine.adapters is not None
        assert sorted(router.reconcile().weight_only) == ["one", "two"]
        assert engine.adapters.host_loads() == 2
        assert {status.name: status.load_count for status in engine.adapters.list()} == {"one": 1, "two": 1}
        scraped = metrics.exposition().decode()
        assert 'loramux_adapter_load_seconds_count{tier="host"} 2.0' in scraped
    finally:
        engine.shutdown()
