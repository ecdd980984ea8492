"""Request preparation: what an API received -> a `PreparedRequest` the engine trusts.

The one place a generation is checked: request id, adapter choice (base model, one adapter, a
weighted mixture, or "auto"), input shape and size, sampling values, tokenization (or the chat
template) and the prompt against the vocabulary and the context length. An "auto" request is
routed here, once its tokens are known: the router's decision picks its adapters (the top
`route_top_k` servable candidates, weighted by their renormalized scores) and travels on the
PreparedRequest to the answer. Every rule lives in one
place with one message (quoting at most a bounded prefix of what the client sent); the gRPC service calls it for every generation and the HTTP shim reaches
it through the gRPC service, so both refuse the same requests with the same words.

`prepare` (and `route`) tokenize, may look at the adapter roots on disk, compile a structured
output's constraint (server.engine.structured, cached) and, for "auto", run the base model's first
layers: call them off the event loop, from one thread (the tokenizer is not used concurrently). It knows nothing about protobuf or HTTP, and does not load adapters (the
engine does, once the request is accepted) nor how the router decides.
"""

from __future__ import annotations

import math
import struct
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from adapters_store import AdapterNotFound, check_adapter_name
from adapters_store.errors import AdapterError, shown
from server.engine.request import (
    AdapterChoice,
    InvalidRequest,
    PreparedRequest,
    SamplingParams,
    StructuredOutput,
)
from server.prompts import PromptInput, check_input, check_prompt_tokens, tokenize

if TYPE_CHECKING:
    from server.engine.engine import Engine, EngineInfo
    from server.engine.structured import Grammar, GrammarCompiler
    from server.router.decision import Candidate, RouteDecision
    from server.router.router import Router

AUTO_ADAPTER = "auto"
MAX_MIXTURE = 8
MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True)
class RequestInput:
    """A generation as an API received it, nothing checked yet."""

    prompt: PromptInput
    sampling: SamplingParams
    request_id: str = ""  # "" = make one
    adapter: str = ""  # "" = base model, "auto" = the router, else an adapter's name
    mixture: tuple[tuple[str, float], ...] = ()  # weighted adapters (instead of `adapter`)
    route_top_k: int | None = None  # "auto": adapters to mix; None = the router's default


class RouterDisabled(InvalidRequest):
    """Adapter "auto", Route or example prompts on a server without a router (FAILED_PRECONDITION)."""


class AdapterCatalog(Protocol):
    def check_known(self, name: str) -> None:
        """Raise adapters_store.AdapterNotFound unless the well-formed `name` can be served."""


class RequestPreparer:
    def __init__(
        self,
        info: EngineInfo,
        tokenizer: Any,
        adapters: AdapterCatalog | None,
        router: Router | None = None,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.router = router  # None: "auto" is refused (RouterDisabled)
        self.grammars = grammars  # None: structured output is refused

    @classmethod
    def for_engine(cls, engine: Engine, router: Router | None = None) -> RequestPreparer:
        return cls(engine.info, engine.tokenizer, engine.adapters, router, engine.grammars)

    def prepare(self, given: RequestInput) -> PreparedRequest:
        """Check `given`, tokenize its prompt and route it if it asks for "auto". Raises
        InvalidRequest (bad input; RouterDisabled for "auto" without a router) or AdapterNotFound
        (an adapter nobody can serve)."""
        info = self.info
        request_id = given.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(
                f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
            )
        route_top_k = self._route_top_k(given)  # None unless "auto"
        if route_top_k is None:
            adapters = self.adapter_choice(given.adapter, given.mixture)
        check_input(given.prompt, info.max_model_len)
        given.sampling.validate(info.vocab_size)
        token_ids = tokenize(self.tokenizer, given.prompt)
        check_prompt_tokens(token_ids, given.sampling.max_tokens, info.vocab_size, info.max_model_len)
        grammar = self._grammar(given.sampling.structured)
        routing = None
        if route_top_k is not None:
            routing = self._servable(self.router_or_refuse().route(token_ids), route_top_k)
            adapters = AdapterChoice(tuple((name, _float32(w)) for name, w in routing.mixture(route_top_k)))
        return PreparedRequest(request_id, tuple(token_ids), given.sampling, adapters, routing, grammar)

    def _grammar(self, structured: StructuredOutput | None) -> Grammar | None:
        """The request's structured output compiled against the vocabulary (cached by the compiler)."""
        if structured is None:
            return None
        if self.grammars is None:
            raise InvalidRequest("structured output is not available on this server")
        return self.grammars.compile(structured)

    def route(self, prompt: PromptInput) -> RouteDecision:
        """The router's decision for `prompt`, read as `prepare` reads a generation's (the Route RPC).
        Raises InvalidRequest (RouterDisabled without a router)."""
        router = self.router_or_refuse()
        check_input(prompt, self.info.max_model_len)
        token_ids = tokenize(self.tokenizer, prompt)
        check_prompt_tokens(token_ids, 0, self.info.vocab_size, self.info.max_model_len)
        return router.route(token_ids)

    def adapter_choice(self, adapter: str, mixture: tuple[tuple[str, float], ...]) -> AdapterChoice:
        """The adapters a request that does not ask for "auto" runs with; every name must be one
        this server can serve."""
        if mixture and adapter:
            raise InvalidRequest("set either adapter or adapters (a weighted mixture), not both")
        if mixture:
            return self._mixture(mixture)
        if adapter:
            self._check_known(adapter)
        return AdapterChoice.single(adapter)

    def _route_top_k(self, given: RequestInput) -> int | None:
        """How many adapters an "auto" request mixes; None for any other request."""
        if given.adapter != AUTO_ADAPTER:
            if given.route_top_k is not None:
                raise InvalidRequest(
                    "route_top_k applies to adapter 'auto' only; leave it unset or set adapter to 'auto'"
                )
            return None
        if given.mixture:
            raise InvalidRequest("set either adapter or adapters (a weighted mixture), not both")
        router = self.router_or_refuse()
        top_k = given.route_top_k if given.route_top_k is not None else min(router.config.top_k, MAX_MIXTURE)
        if not 1 <= top_k <= MAX_MIXTURE:
            raise InvalidRequest(f"route_top_k must be between 1 and {MAX_MIXTURE}, got {top_k}")
        return top_k

    def router_or_refuse(self) -> Router:
        """The router; RouterDisabled (saying why there is none) when the server has none."""
        if self.router is not None:
            return self.router
        if self.adapters is None:
            raise RouterDisabled(
                "adapter 'auto' needs the router, and this server serves no adapters (started with "
                "--max-slots 0); use adapter '' for the base model"
            )
        raise RouterDisabled(
            "the router is disabled on this server (started with --no-router): adapter 'auto', Route and "
            "example prompts are refused; name an adapter (ListAdapters shows them) or use adapter '' "
            "for the base model"
        )

    def _servable(self, decision: RouteDecision, top_k: int) -> RouteDecision:
        """The decision cut to its `top_k` best candidates this server can serve now (the router's
        tables may still name an adapter that was removed); the base model when none is left."""
        kept: list[Candidate] = []
        for candidate in decision.candidates:
            if len(kept) == top_k:
                break
            if self._can_serve(candidate.adapter):
                kept.append(candidate)
        if not kept and not decision.fallback:
            return replace(decision, candidates=(), fallback=True, reason="no routable adapter")
        return replace(decision, candidates=tuple(kept))

    def _can_serve(self, name: str) -> bool:
        try:
            self._check_known(name)
        except AdapterError:
            return False
        return True

    def _mixture(self, mixture: tuple[tuple[str, float], ...]) -> AdapterChoice:
        if len(mixture) > MAX_MIXTURE:
            raise InvalidRequest(f"at most {MAX_MIXTURE} adapters in a mixture, got {len(mixture)}")
        names = [name for name, _ in mixture]
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise InvalidRequest(f"adapters lists the name {shown(twice)} twice")
        for index, (_name, weight) in enumerate(mixture):
            if not math.isfinite(weight) or weight <= 0.0:
                raise InvalidRequest(f"adapters[{index}].weight must be a finite number > 0, got {weight}")
        for name in names:
            self._check_known(name)
        return AdapterChoice(tuple(mixture))

    def _check_known(self, name: str) -> None:
        check_adapter_name(name, lookup=True)
        if self.adapters is None:
            raise AdapterNotFound(
                f"adapter {shown(name)} is not loaded: this server serves no adapters (started with --max-slots 0)"
            )
        self.adapters.check_known(name)


def _float32(weight: float) -> float:
    """`weight` rounded to float32, as the wire carries it: a client that sends back the weights of
    an "auto" answer's mixture runs exactly the same mixture."""
    return float(struct.unpack("f", struct.pack("f", weight))[0])
