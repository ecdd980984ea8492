"""The engine end to end (in-process): transformers' greedy generate as the oracle, continuous
batching that does not change a request's tokens, sampling controls, cancellation and limits."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from adapters_store import AdapterNotFound
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import (
    EngineOverloaded,
    FinishReason,
    InvalidRequest,
    RequestHandle,
    RequestOutput,
    SamplingParams,
)
from tests.conftest import prepare, start_engine

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@dataclass
class Collected:
    outputs: list[RequestOutput] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    handle: RequestHandle | None = None

    def __call__(self, out: RequestOutput) -> None:
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    def wait(self, timeout: float = 60.0) -> Collected:
        assert self.done.wait(timeout), "request did not finish"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def reason(self) -> FinishReason | None:
        return self.outputs[-1].finish_reason


def submit(
    engine: Engine, rid: str, prompt: list[int], params: SamplingParams = GREEDY, adapter: str = ""
) -> Collected:
    sink = Collected()
    sink.handle = engine.submit(prepare(engine, rid, prompt, params, adapter), sink)
    return sink


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


# ---- the oracle: transformers generate on the real default model ------------------------------


def test_greedy_equals_transformers_generate_on_smollm2(smollm2_dir, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    engine = start_engine(smollm2_dir, EngineConfig(max_running=4, max_model_len=512, max_batched_tokens=64))
    try:
        prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three colors."]
        sinks = [submit(engine, f"p{i}", chat_ids(tokenizer, p)) for i, p in enumerate(prompts)]
        for prompt, sink in zip(prompts, sinks, strict=True):
            ids = torch.tensor([chat_ids(tokenizer, prompt)])
            expected = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
            got = sink.wait().tokens
            assert got == expected[: len(got)], prompt
            # shorter only when transformers also stopped at EOS
            assert len(got) == len(expected) or expected[len(got) - 1] in engine.eos_token_ids
        assert "Paris" in sinks[0].text
    finally:
        engine.shutdown()


# ---- continuous batching ------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    engine = start_engine(
        make_tiny_model(), EngineConfig(max_running=4, max_queue=64, max_model_len=256, max_batched_tokens=16)
    )
    yield engine
    engine.shutdown()


LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)


@pytest.mark.parametrize("params", [LONG, SEEDED], ids=["greedy", "seeded"])
def test_request_decodes_the_same_beside_others_joining_and_leaving(engine: Engine, params) -> None:
    prompt = list(range(300, 331))
    alone = submit(engine, "alone", prompt, params).wait().tokens
    others = []
    # Some start before, some join mid-flight, with different lengths; there are more requests
    # than slots (4), so the queue and slot reuse are exercised too.
    for i in range(3):
        others.append(
            submit(
                engine,
                f"before{i}",
                list(range(1000 + i, 1010 + 7 * i)),
                SamplingParams(max_tokens=5 + 9 * i, temperature=0.0),
            )
        )
    target = submit(engine, "target", prompt, params)
    for i in range(4):
        time.sleep(0.02)
        others.append(
            submit(
                engine,
                f"after{i}",
                list(range(2000 + i, 2040 + i)),
                SamplingParams(max_tokens=3 + 11 * i, temperature=1.0),
            )
        )
    assert target.wait().tokens == alone
    for other in others:
        other.wait()
    wait_idle(engine)


def test_stream_pieces_concatenate_to_the_decoded_text(engine: Engine, tokenizer) -> None:
    sink = submit(
        engine, "text", list(range(500, 520)), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ).wait()
    assert len(sink.outputs) > 10  # streamed in pieces
    assert sink.text == tokenizer.decode(sink.tokens, skip_special_tokens=True)
    assert sink.outputs[-1].completion_tokens == 30
    assert sink.outputs[-1].prompt_tokens == 20
    assert sink.reason == FinishReason.LENGTH


def test_stop_string_cuts_the_text_and_finishes(engine: Engine, tokenizer) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = submit(engine, "full", list(range(600, 620)), params).wait().text
    assert len(full) > 12
    stop = full[8:12]
    cut = submit(
        engine,
        "cut",
        list(range(600, 620)),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,)),
    ).wait()
    assert cut.reason == FinishReason.STOP
    assert cut.text == full[: full.index(stop)]


def test_stop_token_id_finishes(engine: Engine) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    tokens = submit(engine, "t", list(range(700, 720)), params).wait().tokens
    stop_at = tokens[5]
    got = submit(
        engine,
        "t2",
        list(range(700, 720)),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,)),
    ).wait()
    assert got.reason == FinishReason.STOP
    assert got.tokens == tokens[: tokens.index(stop_at) + 1]


def test_seed_reproduces_and_different_seeds_differ(engine: Engine) -> None:
    prompt = list(range(800, 810))

    def run(seed: int) -> list[int]:
        return (
            submit(
                engine,
                f"s{seed}-{time.monotonic_ns()}",
                prompt,
                SamplingParams(max_tokens=20, temperature=1.5, seed=seed, ignore_eos=True),
            )
            .wait()
            .tokens
        )

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_abort_frees_the_slot_and_reports_cancelled(engine: Engine) -> None:
    sink = submit(
        engine,
        "abort-me",
        list(range(900, 930)),
        SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
    )
    while not sink.outputs:
        time.sleep(0.005)
    assert sink.handle is not None
    engine.abort(sink.handle)
    assert sink.wait().reason == FinishReason.CANCELLED
    assert len(sink.tokens) < 200
    wait_idle(engine)
    engine.abort(sink.handle)  # finished by now: ignored


def test_invalid_requests_are_refused_at_submit(engine: Engine) -> None:
    cases = [
        (list(range(10)), SamplingParams(max_tokens=0), "max_tokens"),
        (list(range(10)), SamplingParams(temperature=-1), "temperature"),
        (list(range(10)), SamplingParams(temperature=float("nan")), "temperature"),
        (list(range(10)), SamplingParams(top_p=0.0), "top_p"),
        (list(range(10)), SamplingParams(top_k=-3), "top_k"),
        ([], SamplingParams(), "no input"),
        ([10**9], SamplingParams(), "vocabulary"),
        (
            list(range(250)),
            SamplingParams(max_tokens=10),
            "exceeds the model's context length max_model_len=256",
        ),
    ]
    for prompt, params, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            prepare(engine, "bad", prompt, params)
    with pytest.raises(AdapterNotFound, match="nope"):
        prepare(engine, "bad", [1, 2], SamplingParams(), adapter="nope")
    wait_idle(engine)


def test_full_queue_is_refused_and_everything_admitted_finishes(make_tiny_model) -> None:
    engine = start_engine(
        make_tiny_model(), EngineConfig(max_running=2, max_queue=3, max_model_len=128, max_batched_tokens=8)
    )
    try:
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        sinks, refused = [], 0
        for i in range(12):
            try:
                sinks.append(submit(engine, f"q{i}", [5, 6, 7, 8 + i], params))
            except EngineOverloaded as exc:
                assert "queue is full" in str(exc)
                refused += 1
        assert refused > 0 and len(sinks) >= 3
        assert all(s.wait().reason == FinishReason.LENGTH for s in sinks)
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(engine: Engine, monkeypatch) -> None:
    real_forward = engine.model.forward
    calls = {"n": 0}

    def flaky(batch, kv):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_forward(batch, kv)

    monkeypatch.setattr(engine.model, "forward", flaky)
    failed = submit(engine, "fails", [1, 2, 3], GREEDY).wait()
    assert failed.reason == FinishReason.ERROR and "boom" in (failed.outputs[-1].error or "")
    assert submit(engine, "works", [1, 2, 3], GREEDY).wait().reason in (
        FinishReason.STOP,
        FinishReason.LENGTH,
    )
    wait_idle(engine)


def test_a_row_the_sampler_fails_fails_alone(engine: Engine, monkeypatch) -> None:
    real_sample = engine.runner.sampler.sample
    poisoned = SamplingParams(max_tokens=8, temperature=1.0, seed=666, ignore_eos=True)

    def poison(logits, params, generators):  # NaN logits for the poisoned request's row only
        logits = logits.clone()
        for row, p in enumerate(params):
            if p == poisoned:
                logits[row] = float("nan")
        return real_sample(logits, params, generators)

    monkeypatch.setattr(engine.runner.sampler, "sample", poison)
    neighbour = submit(engine, "neighbour", [1, 2, 3], LONG)
    failed = submit(engine, "poisoned", [4, 5, 6], poisoned).wait()
    assert failed.reason == FinishReason.ERROR and "NaN" in (failed.outputs[-1].error or "")
    assert neighbour.wait().reason == FinishReason.LENGTH and len(neighbour.tokens) == LONG.max_tokens
    wait_idle(engine)


def test_thousands_of_short_requests_leak_no_slot(engine: Engine) -> None:
    sinks = []
    for i in range(300):
        while True:
            try:
                sinks.append(
                    submit(engine, f"many{i}", [3 + i % 50, 9], SamplingParams(max_tokens=2, temperature=0.0))
                )
                break
            except EngineOverloaded:
                time.sleep(0.01)
        if i % 7 == 0:
            assert sinks[-1].handle is not None
            engine.abort(sinks[-1].handle)
    for sink in sinks:
        sink.wait()
    wait_idle(engine)
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
