"""loramux on Ray Serve: two replicas of a tiny model on a local Ray instance, four adapters.

The `ray`-marked tests share one Ray instance on loopback (2 CPUs, no dashboard) running the
application `loramux ray` deploys: 2 replicas with 2 device slots each, so Ray's multiplexing must
split the 4 adapters between them. Their oracle is a single loramux server (engine, gRPC and the
OpenAI shim, as `loramux serve` runs them) over the same model and adapter root. They check what a
user relies on: the same greedy answers as one server, streamed or not ("auto" reaching a
replica's router); requests for an adapter land on a replica that already holds it; a killed
replica's requests end with a clear error (none hangs) and Ray brings a replica back. The rest
runs without Ray: the `serve run` arguments as flags, the in-process ASGI call a replica makes,
and the message when ray is not installed."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import socket
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.cli import build_parser, ray_settings, server_config
from server.config import AdapterConfig, EngineConfig, RouterConfig, ServerConfig
from server.http.app import create_app
from server.http.server import HttpServer
from server.http.streaming import EventStreamResponse
from server.ray_serve.local_server import call_asgi
from server.ray_serve.settings import RayConfig, flags
from server.ray_serve.wire import REPLICA_HEADER, Answer, Forwarded, StreamStart
from tests.conftest import start_adapter_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="the `ray` extra is not installed (pip install -e '.[ray]')"
)
QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
ADAPTERS = ("ada", "bea", "cyd", "dot")
SLOTS = 2  # per replica: the four adapters fit only split between the two
ENGINE = EngineConfig(max_running=4, max_queue=16, max_model_len=512, max_batched_tokens=64)
GREEDY: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
PROMPT = "The capital of France is"
REPO = Path(__file__).resolve().parents[1]


# -- without Ray -------------------------------------------------------------------------------


def test_serve_run_arguments_are_the_flags_of_loramux_ray(tmp_path: Path) -> None:
    args = {
        "model": "/models/tiny",
        "adapter_root": [str(tmp_path / "a"), str(tmp_path / "b")],
        "replicas": "3",
        "max_slots": 2,
        "no_router": "true",
        "enable_admin": False,
        "replica_cpus": 0.5,
    }
    assert flags(args) == [
        "--model", "/models/tiny",
        "--adapter-root", str(tmp_path / "a"), "--adapter-root", str(tmp_path / "b"),
        "--replicas", "3", "--max-slots", "2", "--no-router", "--replica-cpus", "0.5",
    ]  # fmt: skip
    config, ray_config = ray_settings(flags(args))
    by_cli = build_parser().parse_args(["serve", "--model", "/models/tiny", "--adapter-root", str(tmp_path / "a")]
                                       + ["--adapter-root", str(tmp_path / "b"), "--max-slots", "2", "--no-router"])  # fmt: skip
    assert config == server_config(by_cli)  # the same ServerConfig `loramux serve` builds
    assert ray_config == RayConfig(replicas=3, replica_cpus=0.5)


@pytest.mark.parametrize(
    ("args", "wrong"),
    [
        ({"replicas": 0}, "--replicas"),
        ({"max_slot": 2}, "--max-slot"),
        ({"max_slots": "many"}, "--max-slots"),
    ],
)
def test_bad_serve_run_arguments_are_refused_with_what_was_wrong(args: dict[str, Any], wrong: str) -> None:
    with pytest.raises(ValueError, match=wrong):
        ray_settings(flags(args))


def _toy_app() -> Starlette:
    """A JSON route and an event stream (the shim's EventStreamResponse) that counts its events."""
    sent: list[int] = []

    async def whole(request: Request) -> JSONResponse:
        return JSONResponse(
            {"echo": json.loads(await request.body()), "query": request.url.query}, status_code=201
        )

    async def events(request: Request) -> EventStreamResponse:
        async def body() -> AsyncIterator[str]:
            for i in range(1000):
                sent.append(i)
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.002)

        return EventStreamResponse(body())

    app = Starlette(routes=[Route("/whole", whole, methods=["POST"]), Route("/events", events)])
    app.state.sent = sent
    return app


def test_a_replica_calls_its_http_app_in_process() -> None:
    app = _toy_app()
    extra = ((REPLICA_HEADER.encode(), b"r1"),)

    async def run() -> tuple[list[Any], list[Any]]:
        request = Forwarded("POST", "/whole", b"x=1", ((b"content-type", b"application/json"),), b'{"a": 1}')
        whole = [item async for item in call_asgi(app, request, extra)]
        stream = call_asgi(app, Forwarded("GET", "/events", b"", (), b""), extra)
        streamed = [await anext(stream), await anext(stream), await anext(stream)]
        await stream.aclose()  # the client left after two events
        return whole, streamed

    whole, streamed = asyncio.run(run())
    assert len(whole) == 1 and isinstance(whole[0], Answer)
    assert whole[0].status == 201 and json.loads(whole[0].body) == {"echo": {"a": 1}, "query": "x=1"}
    assert (b"x-loramux-replica", b"r1") in whole[0].headers
    assert dict(whole[0].headers)[b"content-length"] == str(len(whole[0].body)).encode()
    start, *chunks = streamed
    assert (
        isinstance(start, StreamStart)
        and start.status == 200
        and (b"x-loramux-replica", b"r1") in start.headers
    )
    assert chunks == [b"data: 0\n\n", b"data: 1\n\n"]
    assert len(app.state.sent) < 100  # the app saw the disconnect and stopped its stream (of 1000)


def test_loramux_ray_says_how_to_install_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.ray_serve.launch import cmd_ray

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray -> ImportError
    assert cmd_ray(ServerConfig(), RayConfig()) == 1
    assert "pip install -e '.[ray]'" in capsys.readouterr().err


@needs_ray
def test_the_serve_deploy_example_builds_the_application() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.ray_serve.app import build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "server.ray_serve.app:build_app"
    built = build_app(app.args)
    replicas = built._bound_deployment.init_args[0]  # the ingress is bound to the replicas
    assert replicas._bound_deployment.num_replicas == 2


# -- on a local Ray instance -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("ray-adapters")
    for seed, name in enumerate(ADAPTERS, start=1):
        _save_adapter(base, root / name, QV4, seed=seed)
    return {"base": base, "root": root}


@pytest.fixture(scope="module")
def oracle(dirs: dict[str, Path]) -> Iterator[str]:
    """One loramux server (engine, gRPC, OpenAI shim) over the same model and adapters: its URL."""
    engine = start_adapter_engine(dirs["base"], dirs["root"], ENGINE)
    grpc = ServerThread(engine)
    http = HttpServer(create_app(grpc.target), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{grpc._call(http.start())}"
    grpc._call(http.stop())
    grpc.close()
    engine.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _init_ray(attempts: int = 3) -> None:
    """A local Ray instance, tried again when its node does not come up. Ray forks its GCS and
    raylet with a Python preexec_fn, which can deadlock in the child of a process with many threads
    (this one, had it run after the whole suite): the GCS or the raylet never starts and ray.init
    gives up ("timed out during startup", "Timed out waiting for file"; 4 of ~9 full runs on
    2026-12-04, never alone). `make test` runs these tests in a pytest process of their own."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(  # "local": a new instance, never one a failed attempt or anyone else left
                address="local",
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=80 * 2**20,
                log_to_driver=False,
            )
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            ray.shutdown()  # kills what it started, the stuck child included
            if "imed out" not in str(exc) or attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def cluster(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The application on a local Ray instance: its URL."""
    if not HAVE_RAY:
        pytest.skip("the `ray` extra is not installed (pip install -e '.[ray]')")
    import ray
    from ray import serve

    from server.ray_serve.app import application

    port = _free_port()
    _init_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(
            model=str(dirs["base"]),
            device="cpu",
            engine=ENGINE,
            adapters=AdapterConfig(roots=(str(dirs["root"]),), max_slots=SLOTS, max_rank=8),
            router=RouterConfig(state_path=str(tmp_path_factory.mktemp("router") / "tables.safetensors")),
            drain_timeout_s=2.0,
        )
        serve.run(application(config, RayConfig(replicas=2)), name="loramux-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster, timeout=120) as client_:
        yield client_


def _complete(client: httpx.Client, model: str, **extra: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, **GREEDY, **extra})


def _stream_text(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[str, str]:
    """The text of a streamed answer and the replica that served it."""
    text = ""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        return text, response.headers[REPLICA_HEADER]


@pytest.mark.ray
def test_replicas_answer_as_a_single_server(client: httpx.Client, oracle: str, dirs: dict[str, Path]) -> None:
    base = dirs["base"].name
    chat = {"messages": [{"role": "user", "content": "Say hello."}], **GREEDY}
    with httpx.Client(base_url=oracle, timeout=60) as single:
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {base, "auto", *ADAPTERS}
        texts = set()
        for model in (base, *ADAPTERS):
            expected = _complete(single, model).json()
            answer = _complete(client, model)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == expected["choices"][0]["text"]
            assert answer.json()["model"] == model and answer.headers[REPLICA_HEADER]
            texts.add(expected["choices"][0]["text"])
            expected_chat = single.post("/v1/chat/completions", json={"model": model, **chat}).json()
            text, _ = _stream_text(client, "/v1/chat/completions", {"model": model, **chat})
            assert text == expected_chat["choices"][0]["message"]["content"]
        assert len(texts) == 5  # every adapter really changes the answer: equality means something
        routed = _complete(client, "auto")  # the replica's router picks (any replica)
        assert routed.status_code == 200 and "routing" in routed.json() and routed.headers[REPLICA_HEADER]
        unknown = _complete(client, "nobody")  # the shim's own 404, through Ray
        error, expected_error = unknown.json()["error"], _complete(single, "nobody").json()["error"]
        assert unknown.status_code == 404 and error["code"] == expected_error["code"] == "model_not_found"
        # the same words, save that the replicas (router on) also list "auto" where the oracle has no router
        assert error["message"] == expected_error["message"].replace(f"'{base}', ", f"'{base}', 'auto', ")


@pytest.mark.ray
def test_requests_land_on_a_replica_that_holds_their_adapter(client: httpx.Client) -> None:
    # What each replica holds, as Ray's multiplexing keeps it: the last SLOTS adapters it served (LRU).
    held: dict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)

    def serve_one(name: str) -> tuple[str, str]:
        answer = _complete(client, name)
        assert answer.status_code == 200, answer.text
        return name, answer.headers[REPLICA_HEADER]

    def landed_on_holder(name: str, replica: str) -> bool:
        adapters = held[replica]
        hit = name in adapters
        adapters[name] = None
        adapters.move_to_end(name)
        while len(adapters) > SLOTS:
            adapters.popitem(last=False)
        return hit

    for name in ADAPTERS * 3:  # warm-up, paced so that Ray's router hears where each adapter went
        landed_on_holder(*serve_one(name))
        time.sleep(0.2)
    names = random.Random(7).choices(ADAPTERS, k=60)
    hits = []
    with ThreadPoolExecutor(3) as pool:
        for start in range(0, len(names), 3):  # three at once
            hits += [landed_on_holder(*answer) for answer in pool.map(serve_one, names[start : start + 3])]
    assert sum(hits) >= 0.9 * len(hits), (sum(hits), {replica: list(a) for replica, a in held.items()})
    assert len(held) == 2 and all(len(adapters) == SLOTS for adapters in held.values())  # the 4 are split


@pytest.mark.ray
def test_a_killed_replica_ends_its_requests_with_an_error_and_comes_back(client: httpx.Client) -> None:
    import ray
    from ray import serve

    victim = _complete(client, "ada").headers[REPLICA_HEADER]
    long = {"model": "ada", "prompt": PROMPT, "max_tokens": 400, "temperature": 0.0, "ignore_eos": True}

    def stream_after_kill(kill: bool) -> list[str]:
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
            assert response.headers[REPLICA_HEADER] == victim
            lines = response.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]
            if kill:
                ray.kill(_replica_actor(victim), no_restart=True)
            events += [line for line in lines if line.startswith("data: ")]
            return events

    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(stream_after_kill, False)
        whole = pool.submit(client.post, "/v1/completions", json=long)
        time.sleep(0.2)
        killed = stream_after_kill(True)
        others, answer = other.result(timeout=120), whole.result(timeout=120)
    assert answer.status_code in (200, 503), answer.text  # 503 when cut short: a whole answer or none
    if answer.status_code == 503:
        assert "replica" in answer.json()["error"]["message"]
    for events in (killed, others):  # each ended (no hang) with [DONE]; cut short, with the reason
        assert events[-1] == "data: [DONE]"
        if len(events) < 400:
            error = json.loads(events[-2][6:])["error"]
            assert "replica" in error["message"] and error["code"] == "replica_unavailable"
    assert len(killed) < 400  # the kill came while it was generating

    survivors: set[str] = set()
    deadline = time.monotonic() + 180
    while len(survivors) < 2 and time.monotonic() < deadline:  # served meanwhile; then by a new replica
        for name in ADAPTERS:
            answer = _complete(client, name)
            assert answer.status_code in (200, 503), answer.text  # 503: routed to the dead one, once
            if answer.status_code == 200:
                survivors.add(answer.headers[REPLICA_HEADER])
        time.sleep(0.5)
    assert victim not in survivors and len(survivors) == 2, survivors
    assert serve.status().applications["loramux-test"].deployments["LoramuxReplica"].replica_states == {
        "RUNNING": 2
    }


def _replica_actor(unique_id: str) -> Any:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(f"#{unique_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no replica actor {unique_id}")
