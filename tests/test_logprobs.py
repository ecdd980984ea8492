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
