"""Log-probs and echo in OpenAI's shapes, as vLLM answers them.

Requests: `/v1/completions` `logprobs: N` (0-20) asks GenerateRequest.logprobs = N; `echo: true`
asks prompt_logprobs = N (0 without logprobs: the prompt's tokens come back as text, which a
token-id prompt needs to be echoed) and allows `max_tokens: 0` (score the prompt only, what
lm-eval's loglikelihood requests send). `/v1/chat/completions` `logprobs: true` with
`top_logprobs: N` asks logprobs = N.

Answers: a completion choice's `logprobs` is {tokens, token_logprobs, top_logprobs, text_offset}:
per token its text, its log-prob (null for the prompt's first token), the alternatives as
{text: log-prob} (the token itself included, as vLLM does) and where its text starts: the sum of
the texts before it (vLLM's offsets), from 0 in a whole answer and from the text already sent in a
stream. A chat choice's `logprobs` is {content: [{token, logprob, bytes, top_logprobs}]}.
Log-probs below -9999 read -9999 (OpenAI's floor; JSON has no -inf).

It knows the OpenAI bodies and the wire messages; it does not know how either is carried.
"""

from __future__ import annotations

from collections.abc import Sequence

from loramux.v1 import inference_pb2 as pb
from server.engine.request import MAX_LOGPROBS
from server.http import openai_types as oa
from server.http.errors import ApiError

LOGPROB_FLOOR = -9999.0


def check(body: oa.CompletionRequest | oa.ChatCompletionRequest) -> None:
    """400 naming the field for log-prob settings that cannot work."""
    if isinstance(body, oa.CompletionRequest):
        _check_range(body.logprobs, "logprobs")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(
                400,
                "max_tokens must be >= 1, got 0; 0 (score the prompt, generate nothing) only with echo: true",
                param="max_tokens",
            )
        return
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true; set both or neither", param="top_logprobs")
    _check_range(body.top_logprobs, "top_logprobs")


def _check_range(value: int | None, field: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"{field} must be between 0 and {MAX_LOGPROBS}, got {value}", param=field)


def ask(body: oa.CompletionRequest | oa.ChatCompletionRequest, request: pb.GenerateRequest) -> None:
    """Set `request`'s log-prob fields from the body (checked by `check`)."""
    if isinstance(body, oa.CompletionRequest):
        if body.logprobs is not None:
            request.logprobs = body.logprobs
        if body.echo:
            request.prompt_logprobs = body.logprobs or 0
    elif body.logprobs:
        request.logprobs = body.top_logprobs or 0


# -- completions ---------------------------------------------------------------------------


def echo_text(body: oa.CompletionRequest, choice: int, prompt: Sequence[pb.TokenLogprob]) -> str:
    """The prompt text a choice echoes: the body's text prompt as sent, or a token-id prompt's
    tokens as text."""
    prompts = (
        body.prompt if isinstance(body.prompt, list) and not _is_token_ids(body.prompt) else [body.prompt]
    )
    given = prompts[choice // body.n]
    return given if isinstance(given, str) else "".join(entry.text for entry in prompt)


def _is_token_ids(prompt: list) -> bool:
    return bool(prompt) and all(isinstance(item, int) for item in prompt)


def completion_logprobs(
    entries: Sequence[pb.TokenLogprob], alternatives: int, text_offset: int = 0
) -> oa.CompletionLogprobs:
    """OpenAI's legacy log-probs of `entries` (prompt ones first when echoed), texts from `text_offset`."""
    out = oa.CompletionLogprobs()
    offset = text_offset
    for entry in entries:
        out.tokens.append(entry.text)
        out.text_offset.append(offset)
        offset += len(entry.text)
        if not entry.HasField("logprob"):  # the prompt's first token
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_floored(entry.logprob))
        top = {t.text: _floored(t.logprob) for t in entry.top[:alternatives]}
        top.setdefault(entry.text, _floored(entry.logprob))  # vLLM: the token itself and the top N
        out.top_logprobs.append(top)
    return out


# -- chat ----------------------------------------------------------------------------------


def chat_logprobs(entries: Sequence[pb.TokenLogprob]) -> oa.ChatLogprobs:
    return oa.ChatLogprobs(
        content=[
            oa.ChatTokenLogprob(
                token=entry.text,
                logprob=_floored(entry.logprob),
                bytes=_bytes(entry.text),
                top_logprobs=[
                    oa.ChatTopLogprob(token=t.text, logprob=_floored(t.logprob), bytes=_bytes(t.text))
                    for t in entry.top
                ],
            )
            for entry in entries
        ]
    )


def _floored(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))
