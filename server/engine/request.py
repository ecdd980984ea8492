"""What a caller hands the engine and what it gets back.

These types are the whole contract between the engine thread and the servers (gRPC, HTTP):
plain frozen dataclasses, no torch, no protobuf. A `PreparedRequest` is made by
`server.preparation` (validated once, tokenized, its adapter choice resolved); the engine
accepts nothing else and checks nothing again. `submit` answers with a `RequestHandle`, and
`abort(handle)` cancels exactly that submission, never a later one that reuses its request id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.structured import Grammar  # a compiled constraint (opaque to the engine)
    from server.router.decision import RouteDecision  # a plain frozen dataclass


class EngineError(Exception):
    """Base class of errors the engine reports to a caller."""


class InvalidRequest(EngineError, ValueError):
    """The request itself is wrong (maps to INVALID_ARGUMENT / HTTP 400)."""


class EngineOverloaded(EngineError):
    """The queue is full; retry later (maps to RESOURCE_EXHAUSTED / HTTP 429)."""


class EngineUnavailable(EngineError):
    """The engine is stopped or its thread died (maps to UNAVAILABLE / HTTP 503)."""


# Most alternatives a request may ask for per token (logprobs, prompt_logprobs), as OpenAI and vLLM.
MAX_LOGPROBS = 20
# In the refusal of a prompt + max_tokens past max_model_len (server/prompts.py); the HTTP API
# answers it as OpenAI's context_length_exceeded.
CONTEXT_LENGTH_EXCEEDED = "exceeds the model's context length"

# A temperature below this samples the argmax: dividing logits by it could overflow (vLLM uses 1e-5 too).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    CANCELLED = "cancelled"  # the caller aborted (or disconnected)
    ERROR = "error"  # the engine failed while running the request


STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on what a request may generate, as the API gave it (compiled by
    `server.engine.structured` at preparation).

    kind: json_object (spec "") | json_schema (spec: the schema as JSON text) | regex (spec: the
    pattern) | choice (spec: a JSON list of the allowed strings) | grammar (spec: EBNF text).
    """

    kind: str
    spec: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy. Checked by `validate()`."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # a seeded request samples the same tokens whatever it is batched with
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # -- sampling controls (server.engine.logits_processors; min_p in server.engine.sampling) --
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often it was generated
    repetition_penalty: float = 1.0  # vLLM/HF: logits of prompt or generated tokens / (> 0) or * (<= 0) it
    min_p: float = 0.0  # vLLM: drop tokens less likely than min_p x the most likely (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids ascending
    min_tokens: int = 0  # no EOS, stop token id or stop string before this many tokens

    @property
    def processes_logits(self) -> bool:
        """True if a logits processor must touch this row (bias, penalties or min_tokens)."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )

    # Log-probabilities (server.engine.logprobs): of each sampled token with this many alternatives,
    # and of each prompt token (echo) with this many; None = not asked for.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None  # None = free text

    @property
    def greedy(self) -> bool:
        """Argmax sampling: temperature 0, or one too small to divide logits by safely."""
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequest naming the first absurd value."""
        if self.max_tokens < 1 and not (self.max_tokens == 0 and self.prompt_logprobs is not None):
            raise InvalidRequest(
                f"max_tokens must be >= 1, got {self.max_tokens}; 0 (score the prompt, generate nothing) "
                "only with prompt_logprobs (echo over HTTP)"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.stop) > 16:
            raise InvalidRequest(f"at most 16 stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s or len(s) > 256:
                raise InvalidRequest("stop strings must be 1 to 256 characters long")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidRequest(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
        self._validate_controls(vocab_size)

    def _validate_controls(self, vocab_size: int) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise InvalidRequest(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        seen: set[int] = set()
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise InvalidRequest(
                    f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})"
                )
            if token in seen:
                raise InvalidRequest(f"logit_bias names token id {token} more than once")
            seen.add(token)
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise InvalidRequest(f"logit_bias for token id {token} must be in [-100, 100], got {bias}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(
                f"min_tokens must be in [0, max_tokens] (max_tokens is {self.max_tokens}), got {self.min_tokens}"
            )
        if self.min_tokens and self.structured is not None:
            # A complete grammar allows only EOS, which min_tokens would forbid: no token left to sample.
            raise InvalidRequest(
                "min_tokens cannot be combined with structured output (response_format, guided_*): "
                "the grammar decides where the answer ends"
            )


@dataclass(frozen=True)
class AdapterChoice:
    """The adapters a request runs with, as (name, weight) pairs.

    () = the base model; one pair = one adapter (weight 1.0); several = the weighted mixture
    `sum_i weight_i * scale_i * B_i A_i`, applied per token, never merged.
    """

    adapters: tuple[tuple[str, float], ...] = ()

    @classmethod
    def single(cls, name: str) -> AdapterChoice:
        """One adapter by name; "" is the base model."""
        return cls(((name, 1.0),)) if name else cls()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)

    @property
    def label(self) -> str:
        """How answers and metrics name it: "" for the base model, the adapter, or names joined by '+'."""
        return "+".join(self.names)


@dataclass(frozen=True)
class PreparedRequest:
    """One generation, validated against the engine's limits: prompt token ids and sampling.

    Made only by `server.preparation.RequestPreparer` (the one place requests are checked).
    """

    request_id: str  # the client's label for outputs; never a key of engine state
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapters: AdapterChoice = field(default_factory=AdapterChoice)
    # Adapter "auto": the router's decision that chose `adapters`, for the answer; the engine ignores it.
    routing: RouteDecision | None = None
    # sampling.structured compiled against the model's vocabulary (None without a constraint).
    grammar: Grammar | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # A sequence without prompt tokens would decode from nothing and fail its whole step.
        if not self.prompt_token_ids:
            raise InvalidRequest("the prompt has no tokens")
        if (self.sampling.structured is None) != (self.grammar is None):
            raise ValueError("a request's grammar is its sampling.structured compiled (preparation makes it)")


class RequestHandle:
    """What `Engine.submit` returns: the identity of one submission, for `Engine.abort`."""

    request: PreparedRequest


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int
    text: str  # the token alone as text (a piece of a UTF-8 character shows as U+FFFD)
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability: log_softmax of the model's raw next-token logits (before
    temperature, penalties and masks), its rank (1 = the most likely) and the `top` alternatives,
    most likely first. The prompt's first token has none (logprob None, rank 0)."""

    token_id: int
    text: str
    logprob: float | None
    rank: int
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a running request, delivered in order to the request's sink.

    `text` and `token_ids` are the new part only; the last output has `finished=True`
    and a `finish_reason`; `error` is set only with FinishReason.ERROR. `adapter_tier`, the same on
    every output of a request, is where its adapters were when it arrived: "device" (in a device
    slot), "host" (in the host cache only) or "disk" (a cold start), the coldest for a mixture;
    "" for the base model.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    adapter_tier: str = ""
    # With SamplingParams.logprobs: one entry per token of `token_ids`. With prompt_logprobs: one per
    # prompt token, on the request's first output only.
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
