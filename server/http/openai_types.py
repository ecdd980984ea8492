"""The OpenAI request and response bodies the shim speaks, as pydantic models.

FastAPI validates requests against them and builds the OpenAPI schema from them. Fields follow
the OpenAI API; `top_k`, `stop_token_ids`, `ignore_eos`, `repetition_penalty`, `min_p` and
`min_tokens` are vLLM's extensions, `route_top_k`
and `adapters` (a weighted mixture) loramux's (send them in the `openai` client's `extra_body`);
structured output is OpenAI's `response_format` or vLLM's `guided_json|regex|choice|grammar`;
answers of model "auto" carry loramux's `routing`, answers an adapter served its `adapter_tier`.
The router's own routes have their bodies here too. Fields a client may send that loramux cannot
honour are declared so that a non-default value is refused (`unsupported()`) rather than silently ignored.
Range checks that the gRPC server makes anyway (temperature, top_p, stop strings, lengths) are
left to it, so HTTP and gRPC refuse the same things with the same words; what the schema does
say (non-empty prompts, names and stop strings, the chat roles) agrees with the server, so
that a schema-valid request is not refused for its shape. Every string that travels on is
`Text`: a lone UTF-16 surrogate (JSON's "\ud800", which Python's JSON parser accepts but no
UTF-8 encoder, protobuf's included) is refused here with 400 naming the field.

This module does not know about gRPC.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from adapters_store.names import NAME_PATTERN
from server.http.content_parts import text_only
from server.quoting import LONE_SURROGATE, has_lone_surrogate

UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
UInt64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
MaxTokens = Annotated[int, Field(ge=1, le=2**32 - 1)]
MAX_CHOICES = 16  # prompts x n of one request
CHAT_ROLES = ("system", "user", "assistant", "tool")  # server.prompts.CHAT_ROLES, which decides


def _valid_unicode(text: str) -> str:
    if has_lone_surrogate(text):
        raise ValueError(LONE_SURROGATE)
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _token_id_keys(bias: dict[str, float]) -> dict[str, float]:
    """logit_bias keys are token ids written as strings (JSON object keys), as OpenAI sends them."""
    for key in bias:
        if not (key.isascii() and key.isdigit() and int(key) < 2**32):
            raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key[:32]!r}")
    return bias


NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
TokenIds = Annotated[list[UInt32], Field(min_length=1)]
AdapterName = Annotated[
    str,
    Field(
        pattern=f"^{NAME_PATTERN.pattern}$",
        description="1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class WeightedAdapter(_Request):
    name: Text = Field(description="an adapter's name")
    weight: float = Field(description="its weight in the mixture, > 0 (used as given, not normalized)")


class JsonSchemaFormat(_Request):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Text = Field(default="response", description="the schema's name (not used)")
    description: Text | None = None
    schema_: dict | None = Field(
        default=None, alias="schema", description="the JSON schema the answer follows"
    )
    strict: bool | None = Field(
        default=None, description="always strict: the answer is valid against the schema"
    )


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (free), json_object (any JSON object) or json_schema (valid against json_schema.schema)"
    )
    json_schema: JsonSchemaFormat | None = None


class StructuredFields(_Request):
    """Structured output: OpenAI's response_format and vLLM's guided_* extensions (at most one)."""

    response_format: ResponseFormat | None = None
    guided_json: dict | Text | None = Field(
        default=None, description="vLLM extension: a JSON schema (an object or its JSON text)"
    )
    guided_regex: Text | None = Field(default=None, description="vLLM extension: the answer matches it")
    guided_choice: list[Text] | None = Field(
        default=None, description="vLLM extension: the answer is one of these strings"
    )
    guided_grammar: Text | None = Field(
        default=None, description="vLLM extension: an EBNF grammar (xgrammar's dialect) the answer matches"
    )


class SamplingParams(StructuredFields):
    """The fields completions and chat completions share."""

    model: Text = Field(description="the base model's id (no adapter), an adapter's name, or 'auto'")
    max_tokens: MaxTokens | None = Field(
        None, description="most tokens to generate (unset: the server's default, 64)"
    )
    temperature: float | None = Field(default=None, description="0 = greedy; unset: 1.0")
    top_p: float | None = None
    top_k: UInt32 | None = Field(
        default=None, description="vLLM extension: sample from the k most likely tokens"
    )
    seed: UInt64 | None = Field(default=None, description="choice i of n samples with seed + i")
    stop: NonEmptyText | list[NonEmptyText] | None = None
    stop_token_ids: list[UInt32] | None = Field(default=None, description="vLLM extension")
    ignore_eos: bool = Field(
        default=False, description="vLLM extension: generate past the end-of-sequence token"
    )
    route_top_k: UInt32 | None = Field(
        default=None,
        description="loramux extension, model 'auto' only: how many of the router's best adapters to mix, "
        "1-8 (unset: the server's default)",
    )
    adapters: list[WeightedAdapter] | None = Field(
        default=None,
        description="loramux extension: run a weighted mixture of these adapters (at most 8); model must "
        "then be the base model's id, and the answer's model names the mixture ('a+b')",
    )
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # -- sampling controls (ranges are checked by the server: server.engine.request.SamplingParams)
    presence_penalty: float | None = Field(
        default=None, description="in [-2, 2]: minus this for every token already generated (unset: 0)"
    )
    frequency_penalty: float | None = Field(
        default=None, description="in [-2, 2]: minus this times how often a token was generated (unset: 0)"
    )
    repetition_penalty: float | None = Field(
        default=None,
        description="vLLM extension, > 0: positive logits of prompt and generated tokens are divided by it, "
        "negative ones multiplied (unset: 1, off)",
    )
    min_p: float | None = Field(
        default=None,
        description="vLLM extension, in [0, 1]: drop tokens less likely than min_p times the most likely "
        "one, after the temperature (unset: 0, off)",
    )
    min_tokens: UInt32 | None = Field(
        default=None,
        description="vLLM extension: generate at least this many tokens (EOS, stop_token_ids and stop "
        "strings are not honoured before), <= max_tokens (unset: 0)",
    )
    logit_bias: Annotated[dict[str, float], AfterValidator(_token_id_keys)] | None = Field(
        default=None,
        description="token id (as a string) -> bias in [-100, 100] added to its logit; at most 300 entries",
    )
    user: Text | None = None

    def unsupported(self) -> str | None:
        """The name of a field set to something loramux cannot do, or None."""
        return None


class CompletionRequest(SamplingParams):
    prompt: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(
        description="text, a list of texts, token ids or a list of token-id lists (one choice set each)"
    )
    # 0 only with echo: score the prompt, generate nothing (lm-eval's loglikelihood requests).
    max_tokens: UInt32 | None = Field(
        None, description="most tokens to generate (unset: the server's default, 64); 0 only with echo"
    )
    echo: bool = Field(default=False, description="prepend the prompt (and its log-probs, with logprobs)")
    logprobs: int | None = Field(
        default=None, description="log-probs of each token with this many alternatives, 0-20"
    )
    suffix: Text | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported()


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessageIn(_Request):
    role: Literal[CHAT_ROLES] = Field(description="who speaks; the chat template renders it")  # type: ignore[valid-type]
    # An image, audio or file part is refused in one sentence (server.http.content_parts).
    content: Annotated[Text | list[TextPart] | None, BeforeValidator(text_only)] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = Field(
        default=None, description="OpenAI's newer name for max_tokens"
    )
    logprobs: bool = Field(default=False, description="log-probs of each generated token")
    top_logprobs: int | None = Field(
        default=None, description="with logprobs: this many most likely alternatives per token, 0-20"
    )
    tools: list[dict] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        return super().unsupported()


# -- responses -----------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort"] | None


class RouteCandidate(BaseModel):
    adapter: str
    score: float = Field(description="the router's calibrated confidence, in [0, 1]")
    by: str = Field(description="examples (learned from example prompts) or weights (it has none)")


class ServedCandidate(RouteCandidate):
    weight: float = Field(description="its weight in the mixture that served; 0 when the base model did")


class Routing(BaseModel):
    """How the router served a request for model 'auto' (a loramux extension of the answer)."""

    candidates: list[ServedCandidate] = Field(
        description="the route_top_k best adapters, best first: those that served, or on a fallback "
        "those that did not reach it"
    )
    fallback_to_base: bool = Field(description="true: the base model served (see reason)")
    reason: str = Field(
        description="why it fell back: no routable adapter | below threshold | out of domain; '' if not"
    )
    route_seconds: float


_ROUTING = Field(default=None, description="model 'auto' only: the router's decision (loramux extension)")
_TIER_DESCRIPTION = (
    "where the request's adapter was when it arrived: device (in a device slot) | host (in host memory, "
    "not in a device slot) | disk (a cold start); a mixture's coldest, the coldest of the choices; "
    "absent when the base model served (loramux extension)"
)
# A plain string, not an enum: a shim must not fail an answer of a newer server that knows more tiers.
_ADAPTER_TIER = Field(default=None, description=_TIER_DESCRIPTION)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """A completion choice's log-probs (OpenAI's legacy shape, as vLLM answers it): per token its
    text, log-prob (null for the prompt's first token), the alternatives {text: log-prob} and the
    character offset where the token's text starts."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: Text = Field(description="the adapter that served the request, or the base model's id")
    choices: list[CompletionChoice]
    usage: Usage | None = None
    routing: Routing | None = _ROUTING
    adapter_tier: str | None = _ADAPTER_TIER


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: FinishReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: Text = Field(description="the adapter that served the request, or the base model's id")
    choices: list[ChatChoice]
    usage: Usage
    routing: Routing | None = _ROUTING
    adapter_tier: str | None = _ADAPTER_TIER


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    routing: Routing | None = Field(default=None, description="model 'auto': on the first chunk only")
    adapter_tier: str | None = Field(
        default=None, description=f"on the first chunk only: {_TIER_DESCRIPTION}"
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loramux"
    root: str = Field(description="the base model's id, or the adapter's source directory")
    parent: str | None = Field(
        default=None, description="the base model's id for an adapter; null for the base"
    )
    max_model_len: int | None = None
    # loramux extension: an adapter found broken without serving it (its config, or its last load).
    status: Literal["ready", "invalid"] = Field(
        default="ready", description="loramux extension: invalid = it cannot be served (see error)"
    )
    error: str | None = Field(
        default=None, description="loramux extension: why an invalid model cannot be served"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraAdapterRequest(_Request):
    lora_name: AdapterName
    lora_path: NonEmptyText
    load_inplace: bool = Field(default=False, description="replace an adapter already loaded under this name")


class UnloadLoraAdapterRequest(_Request):
    lora_name: AdapterName
    lora_int_id: int | None = None


class RouteRequest(_Request):
    """Which adapters model 'auto' would run for a prompt (exactly one of prompt and messages)."""

    prompt: NonEmptyText | TokenIds | None = Field(
        default=None, description="text (no chat template, as /v1/completions reads it) or token ids"
    )
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)] | None = Field(
        default=None, description="a chat, read as /v1/chat/completions reads it"
    )
    top_k: UInt32 = Field(default=0, description="candidates to return, best first; 0 = all")


class RouteResponse(BaseModel):
    object: Literal["router.route"] = "router.route"
    candidates: list[RouteCandidate] = Field(description="best first")
    fallback_to_base: bool = Field(description="true: model 'auto' would run the base model (see reason)")
    reason: str = Field(
        description="why it would fall back: no routable adapter | below threshold | out of domain; '' if not"
    )
    route_seconds: float


class RegisterExamplesRequest(_Request):
    adapter: NonEmptyText = Field(description="an adapter the server can serve")
    prompts: list[Text] = Field(description="1-256 example prompts, as users would send them")


class RegisterExamplesResponse(BaseModel):
    object: Literal["router.examples"] = "router.examples"
    adapter: str
    examples: int = Field(description="example prompts learned now")
    steps: int = Field(description="training steps run")
    seconds: float


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
