"""The OpenAI-compatible HTTP shim, driven by the official `openai` client against a live server.

A tiny random Llama engine with a real PEFT adapter in an adapter root is served over gRPC; the
shim runs under uvicorn on the same event loop (as `loramux serve` runs them) on 127.0.0.1 and
is a client of that gRPC server. A second shim on the same loop has the admin routes enabled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from server.engine.engine import Engine
from server.http.app import create_app
from server.http.server import HttpServer
from tests.conftest import start_adapter_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread, _slow_down, _wait_until

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
GREEDY: dict[str, Any] = dict(max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("http-adapters")
    _save_adapter(base, root / "qv4", QV4, seed=1)
    _save_adapter(base, root / "spare" / "extra", QV4, seed=2)  # below the top: served once loaded
    return {"base": base, "root": root}


@pytest.fixture(scope="module")
def engine(dirs: dict[str, Path]) -> Iterator[Engine]:
    engine_ = start_adapter_engine(dirs["base"], dirs["root"])
    yield engine_
    engine_.shutdown()


class Servers:
    """gRPC + two HTTP shims (admin off / on) on one event loop in a thread."""

    def __init__(self, engine: Engine) -> None:
        self.grpc = ServerThread(engine)
        self.http = HttpServer(create_app(self.grpc.target), "127.0.0.1", 0)
        self.admin_http = HttpServer(create_app(self.grpc.target, enable_admin=True), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.grpc._call(self.http.start())}"
        self.admin_url = f"http://127.0.0.1:{self.grpc._call(self.admin_http.start())}"

    def close(self) -> None:
        self.grpc._call(self.http.stop())
        self.grpc._call(self.admin_http.stop())
        self.grpc.close()


@pytest.fixture(scope="module")
def servers(engine: Engine) -> Iterator[Servers]:
    running = Servers(engine)
    yield running
    running.close()


@pytest.fixture()
def client(servers: Servers) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=servers.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client_:
        yield client_


@pytest.fixture(scope="module")
def base_id(dirs: dict[str, Path]) -> str:
    return dirs["base"].name


@pytest.fixture()
def aborted(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The request ids the gRPC service aborts (the engine still aborts them); slows outputs."""
    _slow_down(engine, monkeypatch)
    calls: list[str] = []
    real_abort = engine.abort

    def spy_abort(handle: Any) -> None:
        calls.append(handle.request.request_id)
        real_abort(handle)

    monkeypatch.setattr(engine, "abort", spy_abort)
    return calls


def _idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_slots_used == 0


# -- models --------------------------------------------------------------------------------


def test_models_lists_the_base_and_the_adapters(
    client: openai.OpenAI, base_id: str, dirs: dict[str, Path]
) -> None:
    models = {model.id: model for model in client.models.list()}
    assert base_id in models and "qv4" in models
    adapter = models["qv4"].model_dump()
    assert adapter["parent"] == base_id
    assert adapter["root"] == "qv4"  # relative to its adapter root: clients never see server paths
    assert models[base_id].model_dump()["parent"] is None
    assert client.models.retrieve("qv4").id == "qv4"


# -- completions ---------------------------------------------------------------------------


def test_completion_counts_usage_and_names_the_base(client: openai.OpenAI, base_id: str) -> None:
    completion = client.completions.create(model=base_id, prompt=PROMPT, **GREEDY)
    assert completion.model == base_id
    [choice] = completion.choices
    assert choice.text and choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_model_selects_the_adapter(client: openai.OpenAI, base_id: str) -> None:
    base = client.completions.create(model=base_id, prompt=PROMPT, **GREEDY)
    adapted = client.completions.create(model="qv4", prompt=PROMPT, **GREEDY)
    assert adapted.model == "qv4"
    assert adapted.choices[0].text != base.choices[0].text


def test_streamed_completion_matches_the_unary_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="qv4", prompt=PROMPT, **GREEDY)
    stream = client.completions.create(
        model="qv4", prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert {c.model for c in chunks} == {"qv4"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_prompt_lists_and_n_give_one_choice_each(client: openai.OpenAI, base_id: str) -> None:
    completion = client.completions.create(model=base_id, prompt=[PROMPT, "Once upon a time"], n=2, **GREEDY)
    texts = [choice.text for choice in sorted(completion.choices, key=lambda c: c.index)]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[0] != texts[2]  # greedy: n copies agree
    assert completion.usage is not None and completion.usage.completion_tokens == 32


def test_stop_string_ends_the_completion(client: openai.OpenAI, base_id: str) -> None:
    text = client.completions.create(model=base_id, prompt=PROMPT, **GREEDY).choices[0].text
    stop = text.strip()[:2] if text.strip() else text[:1]
    stopped = client.completions.create(model=base_id, prompt=PROMPT, stop=[stop], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


# -- chat ----------------------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI, base_id: str) -> None:
    chat = client.chat.completions.create(model=base_id, messages=CHAT, **GREEDY)  # type: ignore[arg-type]
    assert chat.model == base_id
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 8
    # the chat template wraps the message, so the prompt has more tokens than the text alone
    plain = client.completions.create(model=base_id, prompt="Say hello.", **GREEDY)
    assert plain.usage is not None and chat.usage.prompt_tokens > plain.usage.prompt_tokens


def test_streaming_chat_concatenates_to_the_unary_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="qv4", messages=CHAT, **GREEDY)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="qv4", messages=CHAT, stream=True, **GREEDY)  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {c.model for c in chunks} == {"qv4"}


def test_both_apis_stream_compact_json_events(servers: Servers) -> None:
    """Every data line of a chat and of a completion stream is JSON written alike: no spaces,
    UTF-8 as is (the chat stream's events were spaced out, its non-ASCII text escaped)."""
    bodies = {
        "/v1/completions": dict(model="qv4", prompt="Café ", max_tokens=4, temperature=0.0),
        "/v1/chat/completions": dict(
            model="qv4", messages=[{"role": "user", "content": "Café"}], max_tokens=4, temperature=0.0
        ),
    }
    for path, body in bodies.items():
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        answer = httpx.post(servers.url + path, json=body, timeout=60)
        events = [line[len("data: ") :] for line in answer.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 3
        for event in events[:-1]:
            assert event == json.dumps(json.loads(event), separators=(",", ":"), ensure_ascii=False), (
                path,
                event,
            )


# -- errors --------------------------------------------------------------------------------


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=4)
    assert "no-such-adapter" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="some/path", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT, stream=True, max_tokens=4)  # type: ignore[arg-type]


def test_bad_parameters_are_bad_requests(client: openai.OpenAI, base_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=base_id, prompt=PROMPT, temperature=-1)
    assert "temperature" in caught.value.message
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]  # the engine's refusal
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=base_id, prompt=PROMPT, top_p=2)
    assert caught.value.body["param"] == "top_p"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=base_id, prompt=PROMPT, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=base_id, prompt=PROMPT, logprobs=21)
    assert caught.value.body["param"] == "logprobs"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=base_id, messages=[], max_tokens=4)


def test_auto_without_a_router_is_a_clear_400(servers: Servers) -> None:
    answer = httpx.post(
        servers.url + "/v1/completions", json={"model": "auto", "prompt": PROMPT, "max_tokens": 2}
    )
    assert answer.status_code == 400  # this server runs without a router
    assert "the router is disabled on this server" in answer.json()["error"]["message"]


def test_client_leaving_a_stream_aborts_the_request(
    servers: Servers, engine: Engine, base_id: str, aborted: list[str]
) -> None:
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", servers.url + "/v1/completions", json=body, timeout=30) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first event
    assert _wait_until(lambda: _idle(engine), timeout=10), f"engine still busy: {engine.stats()}"
    assert len(aborted) == 1 and aborted[0].startswith("cmpl-")


# -- admin, health, schema -----------------------------------------------------------------


def test_admin_routes_are_refused_unless_enabled(servers: Servers) -> None:
    answer = httpx.post(servers.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "qv4"})
    assert answer.status_code == 403 and "--enable-admin" in answer.json()["error"]["message"]
    answer = httpx.post(servers.url + "/v1/unload_lora_adapter", json={"lora_name": "qv4"})
    assert answer.status_code == 403


def test_admin_routes_load_and_unload(servers: Servers) -> None:
    url = servers.admin_url
    loaded = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "spare/extra"}
    )
    assert loaded.status_code == 200, loaded.text
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        assert "extra" in {model.id for model in client.models.list()}
        assert client.completions.create(model="extra", prompt=PROMPT, max_tokens=2).model == "extra"
    unloaded = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert unloaded.status_code == 200, unloaded.text
    again = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert again.status_code == 404 and again.json()["error"]["type"] == "not_found_error"
    outside = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "../x"})
    assert outside.status_code == 400


def test_health_and_openapi(servers: Servers) -> None:
    assert httpx.get(servers.url + "/health").status_code == 200
    schema = httpx.get(servers.url + "/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"} <= set(schema["paths"])
    assert "/v1/load_lora_adapter" not in schema["paths"]
    admin_schema = httpx.get(servers.admin_url + "/openapi.json").json()
    assert "/v1/load_lora_adapter" in admin_schema["paths"]


def test_unknown_route_is_openai_json(servers: Servers) -> None:
    answer = httpx.get(servers.url + "/v1/nothing")
    assert answer.status_code == 404
    assert json.loads(answer.text)["error"]["type"] == "not_found_error"


def test_unreachable_grpc_server_is_unavailable(servers: Servers) -> None:
    lonely = HttpServer(create_app("127.0.0.1:1"), "127.0.0.1", 0)
    port = servers.grpc._call(lonely.start())
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").status_code == 503
        answer = httpx.get(url + "/v1/models")
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "service_unavailable_error"
    finally:
        servers.grpc._call(lonely.stop())
