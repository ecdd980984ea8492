"""Sampling controls: logit_bias, min_tokens, the presence / frequency / repetition penalties and min_p.

The processor is checked against a plain-Python reference written from the definitions (OpenAI's
penalties, vLLM's repetition penalty and min_p) on small hand-made logits, over several steps of a
mixed batch; the engine is checked end to end with the tiny model (transformers' own repetition
penalty as the oracle of a greedy decode), and the wire: gRPC fields 18-23 and the HTTP shim's fields,
including their refusals.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import openai
import pytest
import torch

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server.engine.engine import Engine
from server.engine.logits_processors import LogitsProcessor
from server.engine.request import FinishReason, InvalidRequest, PreparedRequest, SamplingParams
from server.engine.sampling import Sampler
from server.http.app import create_app
from server.http.server import HttpServer
from tests.conftest import start_engine
from tests.test_engine import submit
from tests.test_grpc_service import ServerThread

VOCAB = 12
EOS = 11
INF = float("inf")


# -- the reference ---------------------------------------------------------------------------------


def reference(
    logits: list[float], prompt: list[int], output: list[int], p: SamplingParams, eos: set[int]
) -> list[float]:
    """What the controls do to one row of logits, straight from their definitions."""
    out = list(logits)
    for token, bias in p.logit_bias:
        out[token] += bias
    if len(output) < p.min_tokens:
        for token in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            out[token] = -INF
    seen = set(prompt) | set(output)
    for token in range(len(out)):
        if token in seen:  # vLLM / transformers: divide the positive, multiply the others
            out[token] = (
                out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
            )
        count = output.count(token)
        out[token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def min_p_probs(logits: list[float], temperature: float, min_p: float) -> list[float]:
    """vLLM's min_p: softmax after the temperature, drop p < min_p * max p, renormalise."""
    top = max(logits)
    weights = [math.exp((x - top) / temperature) for x in logits]
    total = sum(weights)
    probs = [w / total for w in weights]
    kept = [q if q >= min_p * max(probs) else 0.0 for q in probs]
    return [q / sum(kept) for q in kept]


@dataclass(eq=False)
class FakeSeq:
    request: PreparedRequest
    output_ids: list[int] = field(default_factory=list)


def _seq(prompt: list[int], **controls: Any) -> FakeSeq:
    return FakeSeq(PreparedRequest("r", tuple(prompt), SamplingParams(**controls)))


# -- the processor against the reference -----------------------------------------------------------

ROWS: list[dict[str, Any]] = [
    {},  # plain: untouched
    dict(frequency_penalty=0.7),
    dict(presence_penalty=-1.3),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),  # < 1 rewards repeats
    dict(frequency_penalty=1.1, presence_penalty=0.4, repetition_penalty=1.3),
    dict(logit_bias=((3, 5.0), (7, -2.5))),
    dict(min_tokens=3, stop_token_ids=(4,)),
    dict(min_tokens=3, ignore_eos=True, stop_token_ids=(5,)),
    dict(logit_bias=((EOS, 3.0),), min_tokens=2, presence_penalty=2.0, repetition_penalty=1.5),
    {},  # plain, after controlled rows
]


def test_each_control_matches_the_reference_over_steps_of_a_mixed_batch() -> None:
    rng = random.Random(0)
    seqs = [_seq([rng.randrange(VOCAB) for _ in range(5)], **controls) for controls in ROWS]
    processor = LogitsProcessor(frozenset({EOS}))
    for step in range(6):
        logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(step)) * 3
        before = logits.clone()
        assert processor.apply(logits, seqs) == {}
        for row, seq in enumerate(seqs):
            expected = reference(
                before[row].tolist(), list(seq.request.prompt_token_ids), seq.output_ids,
                seq.request.sampling, {EOS},
            )  # fmt: skip
            assert torch.allclose(logits[row], torch.tensor(expected), atol=1e-5), (step, ROWS[row])
            if not seq.request.sampling.processes_logits:
                assert torch.equal(logits[row], before[row])  # bit for bit: never touched
            seq.output_ids.append(rng.choice([1, 2, 3, 3, 4, 5, EOS]))  # repeats, so counts grow


def test_a_batch_without_controls_is_left_alone_and_state_is_forgotten() -> None:
    processor = LogitsProcessor(frozenset({EOS}))
    penalized = _seq([1, 2], frequency_penalty=1.0)
    penalized.output_ids.extend([3, 3])
    logits = torch.zeros(2, VOCAB)
    processor.apply(logits, [penalized, _seq([1])])
    assert logits[0, 3] == -2.0 and processor._states
    plain = torch.randn(3, VOCAB)
    expected = plain.clone()
    assert processor.apply(plain, [_seq([1]), _seq([2]), _seq([3])]) == {}
    assert torch.equal(plain, expected)
    assert not processor._states  # the penalized sequence left: its counts went with it


def test_a_failure_fails_only_the_rows_with_controls() -> None:
    processor = LogitsProcessor(frozenset({EOS}))
    broken = _seq([1], logit_bias=((VOCAB + 5, 1.0),))  # validation would refuse it; force a failure
    errors = processor.apply(torch.zeros(2, VOCAB), [_seq([1]), broken])
    assert list(errors) == [1] and "logit_bias" in errors[1]


# -- min_p in the sampler --------------------------------------------------------------------------

MIN_P_LOGITS = [2.0, 1.5, 0.2, -0.5, 1.9, -3.0, 0.8]


@pytest.mark.parametrize(
    "temperature,min_p,top_k,top_p",
    [(1.0, 0.3, 0, 1.0), (0.7, 0.1, 0, 1.0), (1.5, 0.5, 3, 1.0), (2.0, 0.1, 0, 0.7)],
)
def test_min_p_samples_its_definition(temperature: float, min_p: float, top_k: int, top_p: float) -> None:
    expected = torch.tensor(min_p_probs(MIN_P_LOGITS, temperature, min_p))
    if top_k:  # top_k after min_p; the kept set here is within the top 3
        assert int((expected > 0).sum()) <= top_k
    if top_p < 1.0:  # then the nucleus of what min_p kept, renormalised
        mass, order = 0.0, expected.argsort(descending=True).tolist()
        for token in order:
            if mass >= top_p:
                expected[token] = 0.0
            mass += float(expected[token])
        expected /= expected.sum()
        assert (
            0
            < int((expected > 0).sum())
            < int((torch.tensor(min_p_probs(MIN_P_LOGITS, temperature, min_p)) > 0).sum())
        )
    params = SamplingParams(temperature=temperature, min_p=min_p, top_k=top_k, top_p=top_p)
    sampler = Sampler(torch.Generator().manual_seed(7))
    logits = torch.tensor([MIN_P_LOGITS]).expand(4000, -1).contiguous()
    out = sampler.sample(logits, [params] * 4000, [None] * 4000)
    counts = torch.bincount(torch.tensor(out.tokens), minlength=len(MIN_P_LOGITS)).float()
    assert counts[expected == 0].sum() == 0  # below the cut: never
    assert 0.5 * float((counts / counts.sum() - expected).abs().sum()) < 0.03


def test_min_p_is_per_row_and_leaves_greedy_and_plain_rows_alone() -> None:
    logits = torch.tensor([MIN_P_LOGITS] * 4)
    plain, cut = SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, min_p=0.9)
    greedy = SamplingParams(temperature=0.0, min_p=0.9)
    seen: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    for seed in range(200):
        gens = [torch.Generator().manual_seed(seed) for _ in range(3)]
        out = Sampler(torch.Generator()).sample(logits[:3], [plain, cut, greedy], gens)
        for row in range(3):
            seen[row].add(out.tokens[row])
    assert seen[1] == {0, 4}  # p / p_max >= 0.9: tokens 0 and 4 (exp(-0.1) = 0.905)
    assert seen[2] == {0}
    assert len(seen[0]) >= 5  # the plain neighbour still samples the whole row
    # a plain row draws the same token beside a min_p row as beside another plain row
    for seed in range(20):
        alone = Sampler(torch.Generator()).sample(
            logits[:2], [plain, plain], [torch.Generator().manual_seed(seed)] * 2
        )
        mixed = Sampler(torch.Generator()).sample(
            logits[:2],
            [plain, cut],
            [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)],
        )
        assert alone.tokens[0] == mixed.tokens[0]


# -- validation ------------------------------------------------------------------------------------

INVALID: list[tuple[dict[str, Any], str]] = [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(logit_bias=((VOCAB, 1.0),)), f"logit_bias token id {VOCAB} is outside the vocabulary"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias for token id 1 must be in [-100, 100]"),
    (dict(logit_bias=tuple((i, 1.0) for i in range(301))), "at most 300"),
    (dict(logit_bias=((1, 1.0), (1, 2.0))), "logit_bias names token id 1 more than once"),
    (dict(min_tokens=9, max_tokens=8), "min_tokens must be in [0, max_tokens]"),
]


@pytest.mark.parametrize("controls,message", INVALID)
def test_validation_names_the_field(controls: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**controls).validate(vocab_size=400 if "300" in message else VOCAB)


def test_the_boundaries_are_valid() -> None:
    for controls in (
        dict(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3, min_p=1.0),
        dict(logit_bias=((0, -100.0), (VOCAB - 1, 100.0)), min_tokens=8, max_tokens=8),
    ):
        SamplingParams(**controls).validate(VOCAB)  # type: ignore[arg-type]


# -- the engine ------------------------------------------------------------------------------------

PROMPT = [17, 600, 3441, 28, 17, 600, 912, 12]


@pytest.fixture(scope="module")
def model_dir(make_tiny_model: Any) -> Path:
    return make_tiny_model()


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    engine_ = start_engine(model_dir)
    yield engine_
    engine_.shutdown()


def _eos(engine: Engine) -> int:
    return min(engine.eos_token_ids)


def test_logit_bias_forces_a_token_through_the_engine(engine: Engine) -> None:
    params = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True, logit_bias=((1000, 100.0),))
    assert submit(engine, "forced", PROMPT, params).wait().tokens == [1000] * 6
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    first = submit(engine, "plain", PROMPT, greedy).wait().tokens[0]
    banned = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logit_bias=((first, -100.0),))
    assert submit(engine, "banned", PROMPT, banned).wait().tokens[0] != first


def test_min_tokens_suppresses_eos_then_allows_it(engine: Engine) -> None:
    eos = _eos(engine)
    wants_eos = dict(max_tokens=20, temperature=0.0, logit_bias=((eos, 100.0),))
    early = submit(engine, "early", PROMPT, SamplingParams(**wants_eos)).wait()
    assert early.tokens == [eos] and early.reason is FinishReason.STOP
    late = submit(engine, "late", PROMPT, SamplingParams(**wants_eos, min_tokens=5)).wait()
    assert len(late.tokens) == 6 and eos not in late.tokens[:5] and late.tokens[5] == eos
    assert late.reason is FinishReason.STOP


def test_min_tokens_holds_stop_token_ids_and_stop_strings(engine: Engine, tokenizer: Any) -> None:
    stop_id = 1000
    forced = dict(max_tokens=20, temperature=0.0, ignore_eos=True, logit_bias=((stop_id, 100.0),))
    by_id = submit(engine, "id", PROMPT, SamplingParams(**forced, stop_token_ids=(stop_id,), min_tokens=3))
    tokens = by_id.wait().tokens  # masked for 3 tokens, then forced
    assert len(tokens) == 4 and stop_id not in tokens[:3] and tokens[3] == stop_id
    assert by_id.reason is FinishReason.STOP
    word = tokenizer.decode([stop_id])
    assert word.strip()
    plain = submit(engine, "s0", PROMPT, SamplingParams(**forced, stop=(word,))).wait()
    assert plain.tokens == [stop_id] and plain.text == ""
    held = submit(engine, "s4", PROMPT, SamplingParams(**forced, stop=(word,), min_tokens=4)).wait()
    assert len(held.tokens) == 4 and held.reason is FinishReason.STOP
    assert held.text == word * 3  # the 4th token completes the first stop string honoured


def test_seeded_penalized_sampling_does_not_depend_on_neighbours(engine: Engine) -> None:
    params = SamplingParams(
        max_tokens=12, temperature=1.0, seed=5, ignore_eos=True, frequency_penalty=1.5,
        presence_penalty=0.5, repetition_penalty=1.2, min_p=0.02,
    )  # fmt: skip
    alone = submit(engine, "alone", PROMPT, params).wait().tokens
    neighbours = [
        submit(engine, f"n{i}", PROMPT[i:], SamplingParams(max_tokens=10, ignore_eos=True, **controls))
        for i, controls in enumerate(
            [{}, dict(frequency_penalty=-1.0), dict(logit_bias=((5, 9.0),), min_tokens=3), dict(min_p=0.3)]
        )
    ]
    again = submit(engine, "again", PROMPT, params)
    assert again.wait().tokens == alone
    for neighbour in neighbours:
        neighbour.wait()
    assert submit(engine, "other-seed", PROMPT, replace(params, seed=6)).wait().tokens != alone


def test_greedy_repetition_penalty_equals_transformers(engine: Engine, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, repetition_penalty=1.7,
            pad_token_id=0, eos_token_id=None,
        )[0, len(PROMPT) :].tolist()  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=1.7)
    assert submit(engine, "rep", PROMPT, params).wait().tokens == expected


def test_greedy_frequency_and_presence_penalties_follow_the_reference(
    engine: Engine, model_dir: Path
) -> None:
    """A greedy decode with transformers' logits and the reference processor step by step."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    params = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=1.0
    )
    output: list[int] = []
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = hf(torch.tensor([PROMPT + output])).logits[0, -1].tolist()
            row = reference(logits, PROMPT, output, params, set())
            output.append(max(range(len(row)), key=row.__getitem__))
    assert submit(engine, "freq", PROMPT, params).wait().tokens == output


# -- the wire: gRPC fields 18-23 and the HTTP shim ------------------------------------------------


@pytest.fixture(scope="module")
def servers(engine: Engine) -> Iterator[dict[str, Any]]:
    grpc_server = ServerThread(engine)
    http = HttpServer(create_app(grpc_server.target), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{grpc_server._call(http.start())}"
    yield {"grpc": grpc_server.target, "url": url}
    grpc_server._call(http.stop())
    grpc_server.close()


@pytest.fixture()
def stub(servers: dict[str, Any]) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(servers["grpc"]) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture()
def client(servers: dict[str, Any]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=servers["url"] + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_grpc_controls_reach_the_engine(stub: pb_grpc.InferenceStub, engine: Engine) -> None:
    eos = _eos(engine)
    request = pb.GenerateRequest(token_ids=PROMPT, max_tokens=10, temperature=0.0, min_tokens=3)
    request.logit_bias[eos] = 100.0
    answer = stub.Generate(request, timeout=60)
    assert list(answer.token_ids) == [answer.token_ids[0], answer.token_ids[1], answer.token_ids[2], eos]
    assert eos not in answer.token_ids[:3] and answer.finish_reason == pb.FINISH_REASON_STOP
    penalized = pb.GenerateRequest(
        token_ids=PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.0,
        frequency_penalty=2.0, repetition_penalty=1.7, min_p=0.5,
    )  # fmt: skip
    local = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.0, frequency_penalty=2.0,
        repetition_penalty=1.7, min_p=0.5,
    )  # fmt: skip
    assert (
        list(stub.Generate(penalized, timeout=60).token_ids)
        == submit(engine, "pb", PROMPT, local).wait().tokens
    )


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2]"),
        (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2, 2]"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0"),
        (dict(min_p=2.0), "min_p must be in [0, 1]"),
        (dict(logit_bias={10**6: 1.0}), "logit_bias token id 1000000 is outside the vocabulary"),
        (dict(logit_bias={5: 1e9}), "logit_bias for token id 5"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens must be in [0, max_tokens]"),
    ],
)
def test_grpc_refuses_bad_controls(stub: pb_grpc.InferenceStub, fields: dict[str, Any], message: str) -> None:
    fields.setdefault("max_tokens", 4)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(token_ids=PROMPT, **fields), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_http_controls_on_completions_and_chat(
    client: openai.OpenAI, servers: dict[str, Any], engine: Engine
) -> None:
    models = [m.id for m in client.models.list()]
    base = models[0]
    forced = client.completions.create(
        model=base, prompt=PROMPT, max_tokens=5, logit_bias={"1000": 100}, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].text == engine.tokenizer.decode([1000] * 5)
    chat = client.chat.completions.create(
        model=base, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0.0,
        frequency_penalty=2.0, presence_penalty=1.0,
        extra_body={"repetition_penalty": 1.7, "min_p": 0.2, "min_tokens": 6, "ignore_eos": True},
    )  # fmt: skip
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    # stop_token_ids through the shim: the forced token stops at once
    stopped = client.completions.create(
        model=base,
        prompt=PROMPT,
        max_tokens=5,
        logit_bias={"1000": 100},
        extra_body={"stop_token_ids": [1000]},
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage is not None
    assert stopped.usage.completion_tokens == 1
    held = client.completions.create(
        model=base, prompt=PROMPT, max_tokens=5, logit_bias={"1000": 100},
        extra_body={"stop_token_ids": [1000], "min_tokens": 2},
    )  # fmt: skip
    assert held.usage is not None and held.usage.completion_tokens == 3


@pytest.mark.parametrize(
    "fields,param,message",
    [
        ({"logit_bias": {"hello": 5}}, "logit_bias", "token ids"),
        ({"logit_bias": {"-3": 5}}, "logit_bias", "token ids"),
        ({"logit_bias": {"99999999": 5}}, None, "logit_bias token id 99999999 is outside the vocabulary"),
        ({"presence_penalty": 2.5}, None, "presence_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0}, None, "repetition_penalty must be > 0"),
        ({"min_p": -0.1}, None, "min_p must be in [0, 1]"),
        ({"min_tokens": 9, "max_tokens": 4}, None, "min_tokens must be in [0, max_tokens]"),
        ({"min_tokens": -1}, "min_tokens", "min_tokens"),
    ],
)
def test_http_refuses_bad_controls(
    servers: dict[str, Any], client: openai.OpenAI, fields: dict[str, Any], param: str | None, message: str
) -> None:
    base = next(iter(client.models.list())).id
    for path, body in (
        ("/v1/completions", {"model": base, "prompt": "Hi", "max_tokens": 4}),
        (
            "/v1/chat/completions",
            {"model": base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        ),
    ):
        response = httpx.post(servers["url"] + path, json={**body, **fields}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"]
        if param is not None:
            assert error["param"] == param


def test_the_bench_baseline_agrees_with_the_processor() -> None:
    """bench/penalties_bench.py's on-demand dense penalties and the processor: two implementations, one result."""
    from bench.penalties_bench import _dense_on_demand, _sequences

    seqs = _sequences(batch=6, penalized=4, vocab=40, prompt_tokens=8, outputs=12)
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3)) * 3
    dense = logits.clone()
    assert LogitsProcessor(frozenset()).apply(logits, seqs) == {}
    _dense_on_demand(dense, seqs)
    assert torch.allclose(logits, dense, atol=1e-5)


def test_log_probs_are_of_the_raw_logits_not_the_biased_ones(engine: Engine) -> None:
    """Step order: log-probs (1) before logit_bias / penalties (2): a forced token keeps its raw log-prob."""
    params = SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias=((1000, 100.0),), logprobs=1
    )
    done = submit(engine, "raw", PROMPT, params).wait()
    assert done.tokens == [1000] * 3
    entries = [entry for output in done.outputs for entry in output.logprobs]
    assert len(entries) == 3 and all(e.token_id == 1000 and e.logprob is not None for e in entries)
    assert all(e.logprob < -1.0 and e.rank > 1 for e in entries)  # biased it would be ~0.0, rank 1


def test_min_tokens_with_structured_output_is_refused() -> None:
    from server.engine.request import StructuredOutput

    params = SamplingParams(max_tokens=8, min_tokens=2, structured=StructuredOutput("json_object", ""))
    with pytest.raises(InvalidRequest, match="min_tokens cannot be combined with structured output"):
        params.validate(100)
