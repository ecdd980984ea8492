"""Request preparation: what an API received -> a `PreparedRequest` the engine trusts.

The one place a generation is checked: request id, adapter choice (base model, one adapter, a
weighted mixture, or "auto"), input shape and size, sampling values, tokenization (or the chat
template) and the prompt against the vocabulary and the context length. Every rule lives in one
place with one message (quoting at most a bounded prefix of what the client sent); the gRPC service calls it for every generation and the HTTP shim reaches
it through the gRPC service, so both refuse the same requests with the same words.

`prepare` tokenizes and may look at the adapter roots on disk: call it off the event loop, from
one thread (the tokenizer is not used concurrently). It knows nothing about protobuf or HTTP,
and does not load adapters (the engine does, once the request is accepted).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from adapters_store import AdapterNotFound, check_adapter_name
from adapters_store.errors import shown
from server.engine.request import AdapterChoice, InvalidRequest, PreparedRequest, SamplingParams
from server.prompts import PromptInput, check_input, check_prompt_tokens, tokenize

if TYPE_CHECKING:
    from server.engine.engine import Engine, EngineInfo

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


class AdapterCatalog(Protocol):
    def check_known(self, name: str) -> None:
        """Raise adapters_store.AdapterNotFound unless the well-formed `name` can be served."""


class RequestPreparer:
    def __init__(self, info: EngineInfo, tokenizer: Any, adapters: AdapterCatalog | None) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.adapters = adapters

    @classmethod
    def for_engine(cls, engine: Engine) -> RequestPreparer:
        return cls(engine.info, engine.tokenizer, engine.adapters)

    def prepare(self, given: RequestInput) -> PreparedRequest:
        """Check `given` and tokenize its prompt. Raises InvalidRequest (bad input), AdapterNotFound
        (an adapter nobody can serve) or NotImplementedError (what is not built yet)."""
        info = self.info
        request_id = given.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(
                f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
            )
        adapters = self.adapter_choice(given.adapter, given.mixture)
        check_input(given.prompt, info.max_model_len)
        given.sampling.validate(info.vocab_size)
        token_ids = tokenize(self.tokenizer, given.prompt)
        check_prompt_tokens(token_ids, given.sampling.max_tokens, info.vocab_size, info.max_model_len)
        return PreparedRequest(request_id, tuple(token_ids), given.sampling, adapters)

    def adapter_choice(self, adapter: str, mixture: tuple[tuple[str, float], ...]) -> AdapterChoice:
        """The adapters a request runs with; every name must be one this server can serve."""
        if mixture and adapter:
            raise InvalidRequest("set either adapter or adapters (a weighted mixture), not both")
        if mixture:
            return self._mixture(mixture)
        if adapter == AUTO_ADAPTER:
            raise NotImplementedError(
                "adapter 'auto' needs the router, which is not built yet; name an adapter "
                "(ListAdapters shows them) or use adapter '' for the base model"
            )
        if adapter:
            self._check_known(adapter)
        return AdapterChoice.single(adapter)

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
