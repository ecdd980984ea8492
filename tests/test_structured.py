"""Structured output: answers under a JSON schema, json_object, a regex or a choice list.

A tiny random Llama with the real SmolLM2 tokenizer (tests/conftest.py) samples at temperature
1.0 under each constraint, with and without PEFT adapters, in one batch with free requests; every
answer is checked by an independent oracle (`jsonschema`, `json`, `re`). A random model picks
tokens almost uniformly among those the grammar allows, so the schemas bound what can grow
(maxLength, maxItems, integer ranges): the grammar then forces the answer to its end, and EOS
(allowed only once the grammar accepts) ends it with "stop". json_object (keys and values
unbounded) is checked with SmolLM2 itself, which writes a short object on its own. The API tests
go through the official `openai` client and a gRPC stub.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest
import torch

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import InvalidRequest, RequestOutput, SamplingParams, StructuredOutput
from server.engine.structured import GrammarCompiler, GrammarMasks
from server.preparation import RequestInput, RequestPreparer
from server.prompts import PromptInput
from tests.conftest import prepare, start_adapter_engine, start_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import OpenAIServers

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
ADAPTERS = ["", "qv4", "other"]  # "" = the base model
ENGINE = EngineConfig(max_running=16, max_queue=128, max_model_len=512, max_batched_tokens=256)
MAX_TOKENS = 320  # more than any answer the schemas below allow
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
}


def random_schema(rng: random.Random) -> dict[str, Any]:
    """An object schema of 1-5 required fields: bounded strings, integer ranges, enums, arrays, booleans."""
    properties: dict[str, Any] = {}
    for index in range(rng.randint(1, 5)):
        kind = rng.choice(["string", "integer", "enum", "array", "boolean", "object"])
        if kind == "string":
            spec: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 12)}
        elif kind == "integer":
            low = rng.randint(-50, 50)
            spec = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
        elif kind == "enum":
            spec = {
                "enum": rng.sample(["alpha", "beta", "gamma", "delta", "e", "zeta eta"], rng.randint(1, 4))
            }
        elif kind == "array":
            items = rng.choice(
                [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 9}]
            )
            spec = {"type": "array", "items": items, "maxItems": rng.randint(1, 3)}
            if rng.random() < 0.5:
                spec["minItems"] = 1
        elif kind == "boolean":
            spec = {"type": "boolean"}
        else:
            spec = {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["id"],
            }
        properties[f"{kind}_{index}"] = spec
    return {"type": "object", "properties": properties, "required": list(properties)}


@pytest.fixture(scope="module")
def dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("structured-adapters")
    _save_adapter(base, root / "qv4", QV4, seed=1)
    _save_adapter(base, root / "other", QV4, seed=2)
    return {"base": base, "root": root}


@pytest.fixture(scope="module")
def engine(dirs: dict[str, Path]) -> Iterator[Engine]:
    engine_ = start_adapter_engine(dirs["base"], dirs["root"], ENGINE)
    yield engine_
    engine_.shutdown()


def run_all(engine: Engine, requests: list[Any], timeout: float = 300.0) -> list[RequestOutput]:
    """Submit every request at once; each one's concatenated answer as one RequestOutput."""
    parts: list[list[RequestOutput]] = [[] for _ in requests]
    done = threading.Event()
    left = [len(requests)]
    lock = threading.Lock()

    def sink_for(i: int) -> Any:
        def sink(output: RequestOutput) -> None:
            parts[i].append(output)
            if output.finished:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        return sink

    for i, request in enumerate(requests):
        engine.submit(request, sink_for(i))
    assert done.wait(timeout), "the requests did not finish"
    answers = []
    for outputs in parts:
        last = outputs[-1]
        assert last.error is None, last.error
        answers.append(
            RequestOutput(
                last.request_id,
                "".join(o.text for o in outputs),
                tuple(t for o in outputs for t in o.token_ids),
                True,
                last.finish_reason,
                completion_tokens=last.completion_tokens,
            )
        )
    return answers


def constrained(kind: str, spec: str = "", **options: Any) -> SamplingParams:
    options = {"max_tokens": MAX_TOKENS, "temperature": 1.0, **options}
    return SamplingParams(structured=StructuredOutput(kind, spec), **options)


# -- the engine --------------------------------------------------------------------------------


def test_50_schema_answers_validate_with_adapters_beside_free_requests(engine: Engine) -> None:
    rng = random.Random(15)
    schemas = [PERSON] + [random_schema(rng) for _ in range(49)]
    free = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    free_prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,", "def main():"]
    requests = []
    for i, schema in enumerate(schemas):
        adapter = ADAPTERS[i % len(ADAPTERS)]
        params = constrained("json_schema", json.dumps(schema), seed=i)  # seeded: the same draws every run
        requests.append(prepare(engine, f"s{i}", f"Record {i} as JSON:", params, adapter))
        if i % 12 == 0:  # free greedy requests in the same batches, with adapters too
            k = i // 12
            requests.append(prepare(engine, f"f{k}", free_prompts[k % 4], free, ADAPTERS[k % 3]))
    answers = run_all(engine, requests)
    free_answers = {a.request_id: a for a in answers if a.request_id.startswith("f")}
    assert len(free_answers) == 5
    for answer in answers:
        if answer.request_id.startswith("f"):
            continue
        schema = schemas[int(answer.request_id[1:])]
        assert answer.finish_reason == "stop", (answer.request_id, answer.text)
        jsonschema.validate(json.loads(answer.text), schema)
    # the free rows got what they get alone
    for k, answer in sorted(free_answers.items()):
        index = int(k[1:])
        alone = run_all(
            engine, [prepare(engine, "alone", free_prompts[index % 4], free, ADAPTERS[index % 3])]
        )[0]
        assert answer.token_ids == alone.token_ids


def test_regex_and_choice_answers_match(engine: Engine) -> None:
    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,3}(\.[0-9]{2})?"
    choices = ["yes", "no", 'say "maybe"', "naïve café", "a\\b"]
    requests = []
    for i in range(12):
        adapter = ADAPTERS[i % 3]
        requests.append(prepare(engine, f"r{i}", "Name and number:", constrained("regex", pattern), adapter))
        choice = constrained("choice", json.dumps(choices), top_p=0.9 if i % 2 else 1.0)
        requests.append(prepare(engine, f"c{i}", "Answer:", choice, adapter))
    for answer in run_all(engine, requests):
        assert answer.finish_reason == "stop", answer
        if answer.request_id.startswith("r"):
            assert re.fullmatch(pattern, answer.text), answer.text
        else:
            assert answer.text in choices


def test_greedy_and_seeded_constrained_answers_do_not_depend_on_the_batch(engine: Engine) -> None:
    spec = json.dumps(PERSON)
    greedy = constrained("json_schema", spec, temperature=0.0)
    seeded = constrained("json_schema", spec, seed=7)
    alone = [run_all(engine, [prepare(engine, "a", "Person:", p, "qv4")])[0] for p in (greedy, seeded)]
    noise = [
        prepare(engine, f"n{i}", "Noise", constrained("json_schema", spec), ADAPTERS[i % 3]) for i in range(6)
    ]
    together = run_all(
        engine,
        [
            prepare(engine, "g", "Person:", greedy, "qv4"),
            *noise[:3],
            prepare(engine, "s", "Person:", seeded, "qv4"),
            *noise[3:],
        ],
    )
    assert together[0].token_ids == alone[0].token_ids
    assert together[4].token_ids == alone[1].token_ids
    for answer in alone + together:
        jsonschema.validate(json.loads(answer.text), PERSON)


def test_invalid_constraints_are_refused_at_preparation(engine: Engine) -> None:
    cases = [
        (StructuredOutput("json_schema", '{"type": "bogus"}'), "JSON schema is invalid"),
        (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
        (StructuredOutput("json_schema", "[1, 2]"), "must be a JSON object"),
        (StructuredOutput("json_schema", "[" * 20_000), "not valid JSON"),
        (StructuredOutput("json_schema", '{"items": ' * 80 + "{}" + "}" * 80), "deeper than 64 levels"),
        (StructuredOutput("json_schema", json.dumps({"description": "x" * 64_001})), "at most 64000"),
        (StructuredOutput("regex", "(unclosed"), "regular expression is invalid"),
        (StructuredOutput("choice", "[]"), "non-empty list"),
        (StructuredOutput("choice", '["ok", ""]'), "choice 1 must be a non-empty string"),
        (StructuredOutput("grammar", "root ::= nothing_defined"), "grammar is invalid"),
        (StructuredOutput("yaml", "a: b"), "kind must be one of"),
    ]
    for structured, words in cases:
        params = SamplingParams(max_tokens=8, structured=structured)
        with pytest.raises(InvalidRequest, match=words):
            prepare(engine, "bad", "Hi", params)


def test_json_object_answers_of_smollm2_parse(smollm2_dir: Path) -> None:
    """SmolLM2 closes a short object by itself on these chat prompts (greedy, and seeded at T=0.7;
    on others it can nest for ever: json_object cannot bound an answer, only max_tokens can)."""
    config = EngineConfig(max_running=8, max_queue=16, max_model_len=512, max_batched_tokens=512)
    engine = start_engine(smollm2_dir, config)
    try:
        prompts = [
            "Return a JSON object with the name and capital of France.",
            "What is 2+2? Answer in JSON with the key answer.",
            "Give a JSON object with a city and its country.",
            "Reply with a JSON object: your name and your favourite color.",
        ]
        preparer = RequestPreparer.for_engine(engine)
        requests = []
        for i, prompt in enumerate(prompts):
            for temperature in (0.0, 0.7):
                params = SamplingParams(
                    max_tokens=200,
                    temperature=temperature,
                    seed=i,
                    structured=StructuredOutput("json_object"),
                )
                given = RequestInput(PromptInput(messages=(("user", prompt),)), params, f"j{i}-{temperature}")
                requests.append(preparer.prepare(given))
        for answer in run_all(engine, requests):
            assert answer.finish_reason == "stop", answer.text
            assert isinstance(json.loads(answer.text), dict)
    finally:
        engine.shutdown()


# -- the library's side, on its own --------------------------------------------------------------


def test_padded_vocabulary_ids_are_never_allowed(tokenizer: Any) -> None:
    vocab = len(tokenizer) + 100  # the model's logits are wider than the tokenizer's vocabulary
    compiler = GrammarCompiler(tokenizer, vocab, frozenset({tokenizer.eos_token_id}))
    grammar = compiler.compile(StructuredOutput("choice", '["yes", "no"]'))

    class Seq:  # what GrammarMasks reads of a sequence
        def __init__(self, grammar: Any) -> None:
            self.request = type("R", (), {"grammar": grammar})()
            self.grammar_matcher = None

    masks = GrammarMasks(overlap=False)
    rows = [Seq(None), Seq(grammar)]
    step = masks.begin(rows)  # type: ignore[arg-type]
    assert step is not None and step.rows == [1]
    logits = torch.zeros(2, vocab)
    step.apply(logits)
    assert bool((logits[0] == 0).all())  # the free row is untouched
    allowed = (logits[1] == 0).nonzero().flatten().tolist()
    assert allowed and max(allowed) < len(tokenizer)
    assert {tokenizer.decode([t]) for t in allowed} <= {"y", "ye", "yes", "n", "no"}
    assert masks.begin([Seq(None), Seq(None)]) is None  # type: ignore[list-item]


def test_a_mask_that_cannot_be_made_fails_its_row_alone(tokenizer: Any) -> None:
    compiler = GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    grammar = compiler.compile(StructuredOutput("choice", '["yes", "no"]'))

    class Broken:
        def is_terminated(self) -> bool:
            return False

        def fill_next_token_bitmask(self, bitmask: Any, row: int) -> None:
            raise RuntimeError("no mask today")

    class Seq:
        def __init__(self, grammar: Any, matcher: Any) -> None:
            self.request = type("R", (), {"grammar": grammar})()
            self.grammar_matcher = matcher

    masks = GrammarMasks()  # filled in the worker thread
    step = masks.begin([Seq(None, None), Seq(grammar, Broken()), Seq(grammar, None)])  # type: ignore[list-item]
    assert step is not None and step.rows == [1, 2]
    logits = torch.zeros(3, len(tokenizer))
    step.apply(logits)
    errors = step.advance([5, 6, 7], {})
    assert set(errors) == {1, 2} and "no mask today" in errors[1]  # the free row 0 is untouched
    assert bool((logits[0] == 0).all())


def test_bounded_json_strings_admit_no_raw_control_character(tokenizer: Any) -> None:
    """JSON forbids raw U+0000-U+001F in a string (they must be escaped): no token that carries one
    may follow an opening quote, whatever bounds the schema puts on the string."""
    compiler = GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    schemas = [{"type": "string"}, {"type": "string", "maxLength": 5}, {"type": "string", "minLength": 2}]
    for schema in schemas:
        matcher = compiler.compile(StructuredOutput("json_schema", json.dumps(schema))).matcher()
        assert matcher.accept_string('"')
        bitmask = torch.zeros(1, (len(tokenizer) + 31) // 32, dtype=torch.int32)
        matcher.fill_next_token_bitmask(bitmask, 0)
        words = bitmask[0].tolist()
        allowed = [t for t in range(len(tokenizer)) if (words[t // 32] >> (t % 32)) & 1]
        texts = [tokenizer.decode([t]) for t in allowed]
        assert "abc" in texts or "a" in texts  # not vacuous: plain text may follow
        bad = [t for t in texts if any(ord(ch) < 0x20 for ch in t)]
        assert not bad, (schema, bad[:5])


def test_compiled_grammars_are_cached_by_their_spec_and_bounded(tokenizer: Any) -> None:
    compiler = GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), max_cached=2)
    first = compiler.compile(StructuredOutput("regex", "[ab]+"))
    assert compiler.compile(StructuredOutput("regex", "[ab]+")) is first
    compiler.compile(StructuredOutput("regex", "c+"))
    compiler.compile(StructuredOutput("regex", "d+"))
    assert compiler.num_cached == 2
    assert compiler.compile(StructuredOutput("regex", "[ab]+")) is not first  # evicted, compiled again


# -- the APIs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(engine: Engine) -> Iterator[OpenAIServers]:
    running = OpenAIServers(engine)
    yield running
    running.close()


@pytest.fixture()
def client(servers: OpenAIServers) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=servers.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client_:
        yield client_


def test_openai_response_format_json_schema_end_to_end(client: openai.OpenAI, dirs: dict[str, Path]) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for model in (dirs["base"].name, "qv4"):
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "A person, please."}],
            response_format=response_format,
            max_tokens=MAX_TOKENS,
            n=2,
        )
        for choice in answer.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_openai_completions_guided_extras(client: openai.OpenAI, dirs: dict[str, Path]) -> None:
    base = dirs["base"].name
    schema_text = client.completions.create(
        model="qv4", prompt="JSON:", max_tokens=MAX_TOKENS, extra_body={"guided_json": json.dumps(PERSON)}
    )
    jsonschema.validate(json.loads(schema_text.choices[0].text), PERSON)
    completion = client.completions.create(  # the openai client sends response_format for chat only
        model=base,
        prompt="JSON:",
        max_tokens=MAX_TOKENS,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
        },
    )
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    regex = client.completions.create(
        model=base, prompt="Code:", max_tokens=32, extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"}
    )
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", regex.choices[0].text)
    choice = client.chat.completions.create(
        model="other",
        messages=[{"role": "user", "content": "Pick one."}],
        max_tokens=32,
        extra_body={"guided_choice": ["left", "right"]},
    )
    assert choice.choices[0].message.content in ("left", "right")
    assert choice.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": "JSON please."}],
        max_tokens=24,
        response_format={"type": "json_object"},
    )
    text = obj.choices[0].message.content or ""
    assert text.startswith("{")  # a random model rarely closes an unbounded object within 24 tokens
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_invalid_schema_is_400_over_http(client: openai.OpenAI, dirs: dict[str, Path]) -> None:
    base = dirs["base"].name
    bad_format: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": "x"}], response_format=bad_format
        )
    assert caught.value.status_code == 400
    assert "JSON schema is invalid" in caught.value.message and "bogus" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="regular expression is invalid"):
        client.completions.create(model=base, prompt="x", extra_body={"guided_regex": "(("})
    with pytest.raises(openai.BadRequestError, match="json_schema.schema is required") as caught:
        client.chat.completions.create(
            model=base,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},  # type: ignore[typeddict-item]
        )
    assert caught.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="not several") as caught:
        client.completions.create(
            model=base, prompt="x", extra_body={"guided_regex": "a", "guided_choice": ["a"]}
        )
    assert caught.value.body["param"] == "guided_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=base,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "yaml"},  # type: ignore[typeddict-item]
        )
    # the server still serves
    ok = client.completions.create(
        model=base, prompt="x", max_tokens=4, extra_body={"guided_choice": ["a", "b"]}
    )
    assert ok.choices[0].text in ("a", "b")


def test_structured_output_over_grpc(servers: OpenAIServers) -> None:
    with grpc.insecure_channel(servers.grpc.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(prompt="JSON:", max_tokens=MAX_TOKENS, adapter="qv4")
        request.structured_output.json_schema = json.dumps(PERSON)
        answer = stub.Generate(request, timeout=120)
        assert answer.finish_reason == pb.FINISH_REASON_STOP
        jsonschema.validate(json.loads(answer.text), PERSON)
        choice = pb.GenerateRequest(prompt="Pick:", max_tokens=16)
        choice.structured_output.choice.choices.extend(["alpha", "beta"])
        assert stub.Generate(choice, timeout=60).text in ("alpha", "beta")
        bad = pb.GenerateRequest(
            prompt="x", structured_output=pb.StructuredOutput(json_schema='{"type": "bogus"}')
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(bad, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "JSON schema is invalid" in (caught.value.details() or "")
        off = pb.GenerateRequest(prompt="x", structured_output=pb.StructuredOutput(json_object=False))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(off, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_grammar_bench_reports_a_failed_request_instead_of_waiting() -> None:
    """bench/grammar_bench.run_batch: sinks run on the engine thread, which swallows what they raise;
    a failed request must still end the wait and fail the run, not leave it waiting forever."""
    from types import SimpleNamespace

    from bench.grammar_bench import run_batch

    class EngineThread:  # delivers on a thread of its own, dropping what a sink raises, as Engine does
        def submit(self, request: str, sink: Any) -> None:
            def deliver() -> None:
                with contextlib.suppress(Exception):
                    sink(SimpleNamespace(token_ids=[1, 2], finished=True, error=request or None))

            threading.Thread(target=deliver).start()

    outcome: list[BaseException | float] = []

    def bench() -> None:
        try:
            outcome.append(run_batch(EngineThread(), ["", "grammar refused"]))
        except RuntimeError as exc:
            outcome.append(exc)

    runner = threading.Thread(target=bench, daemon=True)
    runner.start()
    runner.join(10)
    assert outcome and isinstance(outcome[0], RuntimeError), outcome
    assert "1 of 2" in str(outcome[0]) and "grammar refused" in str(outcome[0])
