"""The documented defaults of unset request fields, and the finish-reason mapping."""

from __future__ import annotations

from loramux.v1 import inference_pb2 as pb
from server.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob, TopLogprob
from server.grpc_convert import finish_reason_to_pb, prompt_from_pb, response_to_pb, sampling_from_pb


def test_unset_sampling_fields_take_the_documented_defaults() -> None:
    sampling = sampling_from_pb(pb.GenerateRequest(prompt="hi"))
    assert sampling == SamplingParams(max_tokens=64, temperature=1.0, top_k=0, top_p=1.0, seed=None)


def test_explicit_zeros_are_kept() -> None:
    request = pb.GenerateRequest(prompt="hi", max_tokens=0, temperature=0.0, top_p=0.0, seed=0)
    sampling = sampling_from_pb(request)
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (0, 0.0, 0.0, 0)
    assert sampling.greedy


def test_an_empty_prompt_differs_from_no_prompt() -> None:
    assert prompt_from_pb(pb.GenerateRequest(prompt="")).text == ""
    assert prompt_from_pb(pb.GenerateRequest(token_ids=[1])).text is None


def test_finish_reasons_map_one_to_one() -> None:
    assert finish_reason_to_pb(FinishReason.STOP) == pb.FINISH_REASON_STOP
    assert finish_reason_to_pb(FinishReason.LENGTH) == pb.FINISH_REASON_LENGTH
    assert finish_reason_to_pb(FinishReason.CANCELLED) == pb.FINISH_REASON_CANCELLED
    assert finish_reason_to_pb(None) == pb.FINISH_REASON_UNSPECIFIED


def test_response_joins_the_increments() -> None:
    outputs = [
        RequestOutput("r", "Hel", (1,), prompt_tokens=3, completion_tokens=1),
        RequestOutput("r", "lo", (2, 3), True, FinishReason.STOP, prompt_tokens=3, completion_tokens=3),
    ]
    response = response_to_pb("r", outputs, adapter="")
    assert (response.text, list(response.token_ids)) == ("Hello", [1, 2, 3])
    assert (response.prompt_tokens, response.completion_tokens) == (3, 3)
    assert response.finish_reason == pb.FINISH_REASON_STOP


def test_logprob_fields_read_unset_as_none_and_zero_as_zero() -> None:
    assert sampling_from_pb(pb.GenerateRequest(prompt="hi")).logprobs is None
    assert sampling_from_pb(pb.GenerateRequest(prompt="hi")).prompt_logprobs is None
    sampling = sampling_from_pb(pb.GenerateRequest(prompt="hi", logprobs=0, prompt_logprobs=3))
    assert (sampling.logprobs, sampling.prompt_logprobs) == (0, 3)


def test_response_joins_the_log_probs_and_keeps_the_first_prompt_tokens_unset() -> None:
    first = TokenLogprob(7, "A", None, 0)
    scored = TokenLogprob(8, "B", -1.5, 2, (TopLogprob(9, "C", -0.5), TopLogprob(8, "B", -1.5)))
    outputs = [
        RequestOutput(
            "r", "x", (1,), logprobs=(TokenLogprob(1, "x", -0.1, 1),), prompt_logprobs=(first, scored)
        ),
        RequestOutput("r", "y", (2,), True, FinishReason.LENGTH, logprobs=(TokenLogprob(2, "y", -0.2, 1),)),
    ]
    response = response_to_pb("r", outputs, adapter="")
    assert [e.token_id for e in response.logprobs] == [1, 2]
    assert [e.token_id for e in response.prompt_logprobs] == [7, 8]
    assert not response.prompt_logprobs[0].HasField("logprob") and response.prompt_logprobs[0].rank == 0
    entry = response.prompt_logprobs[1]
    assert (entry.text, entry.logprob, entry.rank) == ("B", -1.5, 2)
    assert [(t.token_id, t.text, t.logprob) for t in entry.top] == [(9, "C", -0.5), (8, "B", -1.5)]
