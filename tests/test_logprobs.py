"""Log-probabilities of sampled and prompt tokens (echo), with transformers and PEFT as the oracles:
every value is log_softmax of the same model's logits within 1e-4, in mixed batches (echo rows
beside plain rows beside adapter rows) whose prompts are read in several chunks; prompt-only
scoring (max_tokens 0) as lm-eval's loglikelihood path asks for it; the engine's refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.config import EngineConfig
from server.engine.request import FinishReason, InvalidRequest, SamplingParams, TokenLogprob
from tests.conftest import prepare, start_engine
from tests.test_adapters_engine import ADAPTERS, _engine, peft_model, setup  # noqa: F401 (fixtures)
from tests.test_engine import Collected, submit

TOL = 1e-4
# A small token budget: prompts of 20-40 tokens are read in 2-4 chunks, beside decode tokens.
CHUNKED = EngineConfig(max_running=8, max_queue=64, max_model_len=256, max_batched_tokens=16)


def _prompt(seed: int, length: int, vocab: int = 1000) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=generator).tolist()


def _oracle_logprobs(model: Any, token_ids: list[int], **kwargs: Any) -> torch.Tensor:
    """log_softmax of the model's logits at every position of `token_ids`: [len, vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids]), **kwargs).logits[0].float()
    return torch.log_softmax(logits, -1)


def _check_entry(entry: TokenLogprob, row: torch.Tensor, token: int, alternatives: int) -> None:
    """One entry against the oracle's log-probs `row` [vocab] of its position."""
    assert entry.token_id == token
    assert entry.logprob is not None
    assert abs(entry.logprob - row[token].item()) < TOL
    value = row[token].item()  # rank: 1 + the tokens more likely (a near tie may count either way)
    assert int((row > value + TOL).sum()) + 1 <= entry.rank <= int((row >= value - TOL).sum())
    assert len(entry.top) == alternatives
    best = row.topk(alternatives)
    for alternative, value in zip(entry.top, best.values.tolist(), strict=True):
        assert abs(alternative.logprob - value) < TOL
        assert abs(row[alternative.token_id].item() - alternative.logprob) < TOL
    assert [a.logprob for a in entry.top] == sorted((a.logprob for a in entry.top), reverse=True)


def _check_request(sink: Collected, prompt: list[int], params: SamplingParams, oracle: Any) -> None:
    """Every log-prob a request got against the oracle over its prompt + generated tokens."""
    out = sink.wait()
    assert out.reason in (FinishReason.LENGTH, FinishReason.STOP)
    tokens = out.tokens
    logprobs = [e for o in out.outputs for e in o.logprobs]
    prompt_entries = [e for o in out.outputs for e in o.prompt_logprobs]
    assert out.outputs[0].prompt_logprobs == tuple(prompt_entries)  # all on the first output
    rows = oracle(prompt + tokens)  # rows[p] scores token p + 1
    if params.prompt_logprobs is None:
        assert prompt_entries == []
    else:
        assert len(prompt_entries) == len(prompt)
        first = prompt_entries[0]
        assert (first.token_id, first.logprob, first.rank, first.top) == (prompt[0], None, 0, ())
        for p in range(1, len(prompt)):
            _check_entry(prompt_entries[p], rows[p - 1], prompt[p], params.prompt_logprobs)
    if params.logprobs is None:
        assert logprobs == []
    else:
        assert len(logprobs) == len(tokens)
        for i, token in enumerate(tokens):
            _check_entry(logprobs[i], rows[len(prompt) - 1 + i], token, params.logprobs)


@pytest.fixture(scope="module")
def hf_tiny(make_tiny_model) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(make_tiny_model(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chunked_engine(make_tiny_model):
    engine = start_engine(make_tiny_model(), CHUNKED)
    yield engine
    engine.shutdown()


def test_logprobs_equal_transformers_in_a_mixed_chunked_batch(chunked_engine, hf_tiny) -> None:
    cases = [
        (_prompt(1, 37), SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, prompt_logprobs=4)),
        (_prompt(2, 23), SamplingParams(max_tokens=8, temperature=0.0)),  # plain row beside them
        (_prompt(3, 29), SamplingParams(max_tokens=5, temperature=1.0, seed=7, logprobs=0)),  # raw, not T
        (_prompt(4, 1), SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2)),  # one token
        (_prompt(5, 31), SamplingParams(max_tokens=4, temperature=0.7, top_k=5, seed=3, logprobs=20)),
        (_prompt(6, 19), SamplingParams(max_tokens=0, prompt_logprobs=0)),  # scored only
        (_prompt(7, 16), SamplingParams(max_tokens=7, temperature=0.0, prompt_logprobs=1)),  # one chunk
    ]
    sinks = [submit(chunked_engine, f"r{i}", p, params) for i, (p, params) in enumerate(cases)]
    for sink, (prompt, params) in zip(sinks, cases, strict=True):
        _check_request(sink, prompt, params, lambda ids: _oracle_logprobs(hf_tiny, ids))


def test_greedy_tokens_are_rank_one_and_echo_changes_no_token(chunked_engine) -> None:
    prompt = _prompt(11, 33)
    plain = submit(chunked_engine, "plain", prompt, SamplingParams(max_tokens=10, temperature=0.0)).wait()
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=1, prompt_logprobs=1)
    echo = submit(chunked_engine, "echo", prompt, params).wait()
    assert echo.tokens == plain.tokens
    entries = [e for o in echo.outputs for e in o.logprobs]
    assert all(e.rank == 1 and e.top[0].token_id == e.token_id for e in entries)


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(chunked_engine, hf_tiny) -> None:
    prompt = _prompt(12, 40)  # three chunks of 16
    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    out = submit(chunked_engine, "score", prompt, params).wait()
    assert len(out.outputs) == 1
    final = out.outputs[0]
    assert (final.finish_reason, final.token_ids, final.text, final.completion_tokens) == (
        FinishReason.LENGTH,
        (),
        "",
        0,
    )
    assert final.prompt_tokens == len(prompt)
    rows = _oracle_logprobs(hf_tiny, prompt)
    total = sum(e.logprob for e in final.prompt_logprobs[1:] if e.logprob is not None)
    expected = sum(rows[p - 1, prompt[p]].item() for p in range(1, len(prompt)))
    assert abs(total - expected) < 1e-3
    _check_request(out, prompt, params, lambda ids: _oracle_logprobs(hf_tiny, ids))


def test_token_texts_are_each_tokens_own_text(chunked_engine, tokenizer) -> None:
    prompt = tokenizer.encode("The quick brown fox jumps")
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=2)
    out = submit(chunked_engine, "texts", prompt, params).wait()
    entries = out.outputs[0].prompt_logprobs
    assert "".join(e.text for e in entries) == "The quick brown fox jumps"
    for entry in [*entries, *(e for o in out.outputs for e in o.logprobs)]:
        assert entry.text == tokenizer.convert_tokens_to_string(
            [tokenizer.convert_ids_to_tokens(entry.token_id)]
        )
        for alternative in entry.top:
            assert alternative.text == tokenizer.convert_tokens_to_string(
                [tokenizer.convert_ids_to_tokens(alternative.token_id)]
            )


def test_steps_without_asking_rows_do_no_log_prob_work() -> None:
    from server.engine.logprobs import Logprobs
    from server.model.batch import DecodeSeq, StepBatch

    logits = torch.randn(3, 50)
    assert Logprobs().begin(logits, [SamplingParams()] * 3) is None
    assert Logprobs().finish(None, [1, 2, 3]) == {}
    cpu = torch.device("cpu")
    plain = StepBatch.build([DecodeSeq(0, 4, 1)], [(1, 0, [5, 6, 7], True)], cpu)
    assert plain.logits_rows.tolist() == [0, 3] and plain.num_sampled == 2
    echo = StepBatch.build([DecodeSeq(0, 4, 1)], [(1, 0, [5, 6, 7], True)], cpu, prompt_scores=[2])
    assert echo.logits_rows.tolist() == [0, 3, 1, 2] and echo.num_sampled == 2  # sampled rows first


@pytest.mark.parametrize("alternatives", [0, 1, 2, 5])
def test_ranks_count_every_token_at_least_as_likely_ties_included(alternatives: int) -> None:
    from server.engine.logprobs import Logprobs

    logits = torch.tensor([[3.0, 3.0, 1.0, 2.0, 2.0, 2.0, 0.0]] * 7)
    tokens = list(range(7))  # row i picks token i
    pending = Logprobs().begin(logits, [SamplingParams(logprobs=alternatives)] * 7)
    entries = Logprobs().finish(pending, tokens)
    expected = [int((logits[0] >= logits[0, t]).sum()) for t in tokens]  # vLLM's rank
    assert [entries[i].rank for i in range(7)] == expected == [2, 2, 6, 5, 5, 5, 7]
    assert all(len(entries[i].top) == alternatives for i in range(7))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        (SamplingParams(max_tokens=0, logprobs=2), "only with prompt_logprobs"),
        (SamplingParams(logprobs=21), "logprobs must be in [0, 20]"),
        (SamplingParams(prompt_logprobs=-1), "prompt_logprobs must be in [0, 20]"),
        (SamplingParams(prompt_logprobs=21, max_tokens=0), "prompt_logprobs must be in [0, 20]"),
    ],
)
def test_bad_logprob_values_are_refused(chunked_engine, params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        prepare(chunked_engine, "bad", [1, 2, 3], params)


# ---- adapters: PEFT as the oracle --------------------------------------------------------------


def test_logprobs_with_adapters_equal_peft_in_a_mixed_batch(setup, peft_model) -> None:  # noqa: F811
    engine = _engine(setup, max_batched_tokens=16)
    try:
        names = list(ADAPTERS)
        cases = [
            (_prompt(20 + i, 18 + 3 * i), adapter, params)
            for i, (adapter, params) in enumerate(
                [
                    (names[0], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=3)),
                    ("", SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2)),
                    (names[1], SamplingParams(max_tokens=5, temperature=0.0)),  # an adapter row, no log-probs
                    (names[2], SamplingParams(max_tokens=0, prompt_logprobs=1)),
                    (names[3], SamplingParams(max_tokens=4, temperature=1.0, seed=1, logprobs=5)),
                    ("", SamplingParams(max_tokens=3, temperature=0.0, logprobs=1)),
                ]
            )
        ]
        sinks = [
            submit(engine, f"a{i}", prompt, params, adapter)
            for i, (prompt, adapter, params) in enumerate(cases)
        ]
        for sink, (prompt, adapter, params) in zip(sinks, cases, strict=True):

            def oracle(ids: list[int], adapter: str = adapter) -> torch.Tensor:
                return _oracle_logprobs(peft_model, ids, adapter_names=[adapter or "__base__"])

            _check_request(sink, prompt, params, oracle)
    finally:
        engine.shutdown()


# ---- over the wire: gRPC fields, the OpenAI shapes, lm-eval's loglikelihood requests ----------

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


class Wire:
    """A chunked adapter engine served over gRPC and the OpenAI shim (one event loop, a thread)."""

    def __init__(self, base: Any, root: Any) -> None:
        from server.http.app import create_app
        from server.http.server import HttpServer
        from tests.conftest import start_adapter_engine
        from tests.test_grpc_service import ServerThread

        self.engine = start_adapter_engine(base, root, CHUNKED)
        self.grpc = ServerThread(self.engine)
        self.http = HttpServer(create_app(self.grpc.target), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.grpc._call(self.http.start())}"

    def close(self) -> None:
        self.grpc._call(self.http.stop())
        self.grpc.close()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def wire_models(make_tiny_model, tmp_path_factory) -> tuple[Any, Any]:
    from tests.test_adapters_engine import _save_adapter

    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("logprob-adapters")
    _save_adapter(base, root / "qv4", QV4, seed=5)
    return base, root


@pytest.fixture(scope="module")
def wire(wire_models) -> Any:
    running = Wire(*wire_models)
    yield running
    running.close()


@pytest.fixture(scope="module")
def wire_oracle(wire_models) -> Any:
    """oracle(token_ids, adapter) -> log_softmax rows [len, vocab] of transformers / PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, root = wire_models
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), root / "qv4", adapter_name="qv4"
    ).eval()
    return lambda ids, adapter="": _oracle_logprobs(model, ids, adapter_names=[adapter or "__base__"])


@pytest.fixture()
def stub(wire) -> Any:
    import grpc

    from loramux.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(wire.grpc.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_grpc_fields_carry_log_probs_whole_and_streamed(stub, wire_oracle) -> None:
    from loramux.v1 import inference_pb2 as pb

    prompt = _prompt(30, 27)
    request = pb.GenerateRequest(
        token_ids=prompt,
        max_tokens=6,
        temperature=0.0,
        ignore_eos=True,
        logprobs=2,
        prompt_logprobs=3,
        adapter="qv4",
    )
    answer = stub.Generate(request, timeout=60)
    rows = wire_oracle(prompt + list(answer.token_ids), "qv4")
    assert len(answer.prompt_logprobs) == len(prompt) and len(answer.logprobs) == len(answer.token_ids) == 6
    assert (
        not answer.prompt_logprobs[0].HasField("logprob") and answer.prompt_logprobs[0].token_id == prompt[0]
    )
    for p in range(1, len(prompt)):
        entry = answer.prompt_logprobs[p]
        assert entry.token_id == prompt[p] and abs(entry.logprob - rows[p - 1, prompt[p]].item()) < TOL
        assert len(entry.top) == 3
    for i, entry in enumerate(answer.logprobs):
        assert entry.token_id == answer.token_ids[i] and entry.rank == 1 and len(entry.top) == 2
        assert abs(entry.logprob - rows[len(prompt) - 1 + i, entry.token_id].item()) < TOL

    chunks = list(stub.GenerateStream(request, timeout=60))
    assert [len(c.logprobs) for c in chunks] == [len(c.token_ids) for c in chunks]
    assert list(chunks[0].prompt_logprobs) == list(answer.prompt_logprobs)
    assert all(not c.prompt_logprobs for c in chunks[1:])
    assert [e for c in chunks for e in c.logprobs] == list(answer.logprobs)

    plain = stub.Generate(pb.GenerateRequest(token_ids=prompt, max_tokens=3, temperature=0.0), timeout=60)
    assert not plain.logprobs and not plain.prompt_logprobs


def test_grpc_scores_a_prompt_with_max_tokens_zero_and_refuses_bad_values(stub) -> None:
    import grpc

    from loramux.v1 import inference_pb2 as pb

    scored = stub.Generate(pb.GenerateRequest(prompt="Hello there, world", max_tokens=0, prompt_logprobs=0))
    assert scored.finish_reason == pb.FINISH_REASON_LENGTH and not scored.token_ids
    assert len(scored.prompt_logprobs) == scored.prompt_tokens and scored.completion_tokens == 0
    for bad, field in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=99), "prompt_logprobs"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(prompt="Hi", **bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.details()


@pytest.fixture()
def client(wire) -> Any:
    import openai

    with openai.OpenAI(base_url=wire.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client_:
        yield client_


def _base_id(wire: Wire) -> str:
    return wire.engine.info.model_name


def test_completion_logprobs_and_echo_have_vllms_shape(wire, client, wire_oracle, tokenizer) -> None:
    text = "The capital of France is"
    prompt = tokenizer.encode(text)
    answer = client.completions.create(
        model=_base_id(wire), prompt=text, max_tokens=4, temperature=0.0, logprobs=2, echo=True
    )
    choice = answer.choices[0]
    generated = choice.text.removeprefix(text)
    assert choice.text.startswith(text) and answer.usage.completion_tokens == 4
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(prompt) + 4
    assert (
        "".join(logprobs.tokens[: len(prompt)]) == text
        and "".join(logprobs.tokens[len(prompt) :]) == generated
    )
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    rows = wire_oracle(prompt)
    for i in range(1, len(prompt)):
        assert abs(logprobs.token_logprobs[i] - rows[i - 1, prompt[i]].item()) < TOL
    for top, token in zip(logprobs.top_logprobs[1:], logprobs.tokens[1:], strict=True):
        assert token in top and 2 <= len(top) <= 3  # the token itself and the top 2
    generated_steps = zip(
        logprobs.token_logprobs[len(prompt) :], logprobs.top_logprobs[len(prompt) :], strict=True
    )
    for value, top in generated_steps:
        assert value == max(top.values())  # greedy: each generated token is the most likely
    # without echo: only the generated tokens, offsets from 0
    plain = client.completions.create(
        model=_base_id(wire), prompt=text, max_tokens=4, temperature=0.0, logprobs=0
    )
    assert (
        plain.choices[0].text == generated
        and plain.choices[0].logprobs.tokens == logprobs.tokens[len(prompt) :]
    )
    assert plain.choices[0].logprobs.text_offset[0] == 0
    assert all(len(top) == 1 for top in plain.choices[0].logprobs.top_logprobs)
    # echo alone: the prompt text and no log-probs
    echoed = client.completions.create(
        model=_base_id(wire), prompt=text, max_tokens=2, temperature=0.0, echo=True
    )
    assert echoed.choices[0].text.startswith(text) and echoed.choices[0].logprobs is None


def test_streamed_completion_logprobs_join_to_the_whole_answer(wire, client) -> None:
    kwargs: dict[str, Any] = dict(
        model=_base_id(wire), prompt="Once upon a time", max_tokens=6, temperature=0.0, logprobs=1, echo=True
    )
    whole = client.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0]
    events = list(client.completions.create(**kwargs, stream=True, extra_body={"ignore_eos": True}))
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == whole.text
    tokens = [t for e in events if e.choices and e.choices[0].logprobs for t in e.choices[0].logprobs.tokens]
    values = [
        v for e in events if e.choices and e.choices[0].logprobs for v in e.choices[0].logprobs.token_logprobs
    ]
    assert tokens == whole.logprobs.tokens and values == whole.logprobs.token_logprobs
    offsets = [
        o for e in events if e.choices and e.choices[0].logprobs for o in e.choices[0].logprobs.text_offset
    ]
    assert offsets == whole.logprobs.text_offset  # no held-back text here: the same offsets


def test_streamed_echo_with_max_tokens_zero_is_one_event_of_the_prompt(wire, client) -> None:
    events = list(
        client.completions.create(
            model=_base_id(wire), prompt="Score me, please", max_tokens=0, logprobs=1, echo=True, stream=True
        )
    )
    choices = [e.choices[0] for e in events if e.choices]
    assert (
        len(choices) == 1 and choices[0].text == "Score me, please" and choices[0].finish_reason == "length"
    )
    assert "".join(choices[0].logprobs.tokens) == "Score me, please"
    assert choices[0].logprobs.token_logprobs[0] is None and all(
        v is not None and v <= 0 for v in choices[0].logprobs.token_logprobs[1:]
    )


def test_chat_logprobs_have_openais_shape_whole_and_streamed(wire, client) -> None:
    kwargs: dict[str, Any] = dict(
        model="qv4",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5,
        temperature=0.0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    content = whole.logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == whole.message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: rank 1
        assert entry.top_logprobs[0].logprob == entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    streamed = [
        c
        for e in client.chat.completions.create(**kwargs, stream=True)
        for ch in e.choices
        if ch.logprobs
        for c in ch.logprobs.content
    ]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    none = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None}).choices[0]
    assert none.logprobs is None


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_logprob_fields_are_400_naming_the_field(wire, endpoint: str, body: dict, param: str) -> None:
    import httpx2 as httpx

    request = {"model": _base_id(wire), **body}
    if endpoint == "completions":
        request["prompt"] = "Hi"
    else:
        request["messages"] = [{"role": "user", "content": "Hi"}]
    answer = httpx.post(f"{wire.url}/v1/{endpoint}", json=request, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param and param in answer.json()["error"]["message"]


def _multiple_choice(tokenizer: Any, questions: int = 10) -> list[tuple[list[int], list[list[int]], int]]:
    """(context ids, four continuation ids, gold index) per question, from seeded random words."""
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "road", "cloud"]
    generator = torch.Generator().manual_seed(42)

    def pick(n: int) -> str:
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=generator).tolist())

    made = []
    for q in range(questions):
        context = tokenizer.encode(f"Question {q}: {pick(6)}? Answer:")
        choices = [tokenizer.encode(" " + pick(1 + (c + q) % 3)) for c in range(4)]
        made.append((context, choices, int(torch.randint(0, 4, (1,), generator=generator))))
    return made


@pytest.mark.parametrize("model", ["base", "qv4"])
def test_lm_eval_loglikelihood_requests_pick_what_transformers_picks(
    wire, client, wire_oracle, tokenizer, model: str
) -> None:
    """lm-eval's local-completions loglikelihood request (token-id prompt, echo, logprobs=1, and
    max_tokens 1, whose last entry lm-eval drops; or max_tokens 0): the sums of the continuation's
    log-probs and is_greedy (lm-eval's parse_logprobs) give transformers' choices and accuracy."""
    adapter = "" if model == "base" else model
    ours, theirs, golds = [], [], []
    for index, (context, choices, gold) in enumerate(_multiple_choice(tokenizer)):
        scores, expected = [], []
        for continuation in choices:
            ids = context + continuation
            max_tokens = index % 2  # lm-eval 0.4's payload (max_tokens 1) and vLLM's documented one (0)
            answer = client.completions.create(
                model=adapter or _base_id(wire),
                prompt=[ids],
                echo=True,
                logprobs=1,
                max_tokens=max_tokens,
                temperature=0.0,
                seed=1234,
            )
            choice = answer.choices[0]
            assert choice.finish_reason == "length"
            entries = choice.logprobs.token_logprobs[len(context) :]
            tops = choice.logprobs.top_logprobs[len(context) :]
            if max_tokens:
                entries, tops = entries[:-1], tops[:-1]
            assert len(entries) == len(continuation)
            is_greedy = all(value == max(top.values()) for value, top in zip(entries, tops, strict=True))
            scores.append(sum(entries))
            rows = wire_oracle(ids, adapter)
            steps = [rows[len(context) - 1 + j] for j in range(len(continuation))]
            expected.append(sum(step[t].item() for step, t in zip(steps, continuation, strict=True)))
            greedy = all(int(step.argmax()) == t for step, t in zip(steps, continuation, strict=True))
            assert abs(scores[-1] - expected[-1]) < 1e-3 and is_greedy == greedy
        ours.append(max(range(4), key=scores.__getitem__))
        theirs.append(max(range(4), key=expected.__getitem__))
        golds.append(gold)
    assert ours == theirs
    accuracy = sum(o == g for o, g in zip(ours, golds, strict=True)) / len(golds)
    assert accuracy == sum(t == g for t, g in zip(theirs, golds, strict=True)) / len(golds)


def test_a_constrained_request_reports_the_raw_log_probs_of_what_the_grammar_let_through(
    chunked_engine, hf_tiny, tokenizer
) -> None:
    """Grammar masks come after the log-probs: values are the model's, not the masked row's."""
    import json

    from server.engine.request import StructuredOutput

    words = ["alpha", "beta", "gamma"]
    params = SamplingParams(
        max_tokens=12, temperature=0.0, logprobs=3, structured=StructuredOutput("choice", json.dumps(words))
    )
    prompt = tokenizer.encode("Pick one:")
    out = submit(chunked_engine, "choice", prompt, params).wait()
    assert out.text in words
    _check_request(out, prompt, params, lambda ids: _oracle_logprobs(hf_tiny, ids))
