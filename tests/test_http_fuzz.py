"""Property-based fuzzing of the OpenAI HTTP API against its own OpenAPI schema (schemathesis).

Every operation of `/openapi.json` (the admin routes included: the shim under test runs with
`--enable-admin`) gets a bounded number of generated requests: `LORAMUX_FUZZ_EXAMPLES` (default
30) schema-valid ones and half as many schema-breaking ones (schemathesis' positive and negative
modes; a fixed seed, so runs repeat). The server must
answer each one without a 5xx other than the documented 501 (what is not built yet), 503 (engine down
or draining) and 504 (request timeout); every 4xx/5xx must be OpenAI's error JSON; and every
answer must agree with the schema, by schemathesis' own checks: its status code documented
for the operation, its content type documented for that status, its body valid against the
documented schema (`status_code_conformance`, `content_type_conformance`,
`response_schema_conformance`). Afterwards `/health` is 200 and a normal completion still works.

Generated requests are nudged towards the paths that really run the engine: three quarters of
the `model` values become the base model's id or the adapter's name (two thirds of those also
lose the fields loramux refuses and get a valid chat role), half of `/v1/models/{model}`'s, and
token counts up to max_model_len are clamped to 4 and `n` to 2, so that the file stays under a
minute on two cores (about 35 s).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.engine.engine import Engine
from server.http.app import create_app
from server.http.server import HttpServer
from tests.conftest import start_adapter_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
DOCUMENTED_5XX = {501, 503, 504}
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = int(os.environ.get("LORAMUX_FUZZ_EXAMPLES", "30"))
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
REFUSED = ("suffix", "tools")  # fields loramux refuses (400): removed to reach generation


@pytest.fixture(scope="module")
def stack(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("fuzz-adapters")
    _save_adapter(base, root / "qv4", QV4, seed=1)
    engine: Engine = start_adapter_engine(base, root)
    grpc = ServerThread(engine)
    http = HttpServer(create_app(grpc.target, enable_admin=True), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{grpc._call(http.start())}"
    yield {"url": url, "base_id": base.name, "engine": engine}
    grpc._call(http.stop())
    grpc.close()
    engine.shutdown()


def _steer(case: Any, base_id: str) -> None:
    """Point most requests at a real model and keep generated token counts small."""
    path_model = (case.path_parameters or {}).get("model")
    if isinstance(path_model, str) and len(path_model) % 2 == 0:
        case.path_parameters["model"] = base_id if len(path_model) % 4 == 0 else "qv4"
    body = case.body
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and len(model) % 4 != 3:
        body["model"] = base_id if len(model) % 2 == 0 else "qv4"
        if len(model) % 4 != 0:  # and past the refusals of unsupported fields and roles, to generate
            for field in REFUSED:
                body.pop(field, None)
            for message in body.get("messages") or []:
                if isinstance(message, dict) and isinstance(message.get("role"), str):
                    message["role"] = "user"
    for field in TOKEN_FIELDS:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and 4 < value <= 256:
            body[field] = 4  # larger values are kept: they test the max_model_len refusal
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 16:
        body["n"] = 2


def _check(response: Any) -> None:
    status = response.status_code
    assert status < 500 or status in DOCUMENTED_5XX, f"{status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), response.text[:500]
        error = body["error"]
        assert isinstance(error.get("message"), str) and error["message"], error
        assert isinstance(error.get("type"), str), error


def test_fuzz_every_operation(stack: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_url(stack["url"] + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {operation.path for operation in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"} <= paths
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES if mode is GenerationMode.POSITIVE else EXAMPLES // 2,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: Any) -> None:
            _steer(case, stack["base_id"])
            response = case.call(timeout=30)
            _check(response)
            case.validate_response(response, checks=SCHEMA_CHECKS)

        try:
            fuzz()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise  # negative mode has nothing to break in an operation without inputs


def test_server_still_answers_after_fuzzing(stack: dict[str, Any]) -> None:
    # Runs after the fuzz tests in this file (pytest keeps definition order).
    with httpx.Client(base_url=stack["url"], timeout=30) as client:
        assert client.get("/health").status_code == 200
        answer = client.post(
            "/v1/completions",
            json={"model": "qv4", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
    stats = stack["engine"].stats()
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_regression_inputs(stack: dict[str, Any]) -> None:
    """Hand-picked edge inputs of the kind the fuzzer generates; none may be a 500."""
    bodies: list[tuple[str, Any]] = [
        ("/v1/completions", {"model": stack["base_id"], "prompt": [], "max_tokens": 1}),
        ("/v1/completions", {"model": stack["base_id"], "prompt": [[]], "max_tokens": 1}),
        ("/v1/completions", {"model": stack["base_id"], "prompt": [2**32 - 1], "max_tokens": 1}),
        ("/v1/completions", {"model": stack["base_id"], "prompt": "", "max_tokens": 1}),
        ("/v1/completions", {"model": "", "prompt": "x"}),
        ("/v1/completions", {"model": stack["base_id"], "prompt": "x", "seed": 2**64 - 1, "n": 2}),
        ("/v1/completions", {"model": stack["base_id"], "prompt": "x", "temperature": -1}),
        ("/v1/completions", {"model": stack["base_id"], "prompt": "x", "top_p": 0}),
        ("/v1/completions", {"model": stack["base_id"], "prompt": "x", "stop": [""]}),
        ("/v1/chat/completions", {"model": stack["base_id"], "messages": [{"role": "", "content": ""}]}),
        ("/v1/chat/completions", {"model": stack["base_id"], "messages": [{"role": "user", "content": []}]}),
        ("/v1/load_lora_adapter", {"lora_name": "", "lora_path": ""}),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "\x00"}),
        ("/v1/unload_lora_adapter", {"lora_name": "\x00"}),
    ]
    with httpx.Client(base_url=stack["url"], timeout=30) as client:
        for path, body in bodies:
            _check(client.post(path, json=body))
        _check(
            client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        )
        _check(client.get("/v1/models/%00"))
        for path, raw in (  # a lone surrogate as JSON sends it: 400, not a 500 from protobuf
            ("/v1/completions", b'{"model": "m", "prompt": "\\ud800"}'),
            ("/v1/unload_lora_adapter", b'{"lora_name": "\\ud800"}'),
        ):
            answer = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert answer.status_code == 400, answer.text
