"""Error texts in an HTTP client's language: what the shim says instead of what gRPC would.

The gRPC server words its errors for gRPC clients (RPC names, `adapter ''` for the base model);
an OpenAI client knows routes and `model`. This module holds the shim's own texts:

  - `unknown_model`: a `model` (or a mixture's adapter) this server does not serve, listing
    the models that do exist, the base model's id first, cut after MAX_LISTED_MODELS;
  - `body_problem`: a body that is not JSON, not sent as JSON, empty, or not an object, as
    one sentence (None for a body that parsed, whose fields the schema then judges);
  - `for_http`: a gRPC server's message with RPC names and status-code names put in HTTP terms.

It does not know the routes' handlers, nor how the gRPC server decides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import grpc

from adapters_store.errors import shown

MAX_LISTED_MODELS = 20
JSON_CONTENT_TYPE = "application/json"

# gRPC wording -> HTTP wording; longest first, so a phrase wins over the RPC name inside it.
_PHRASES = (
    ("use adapter '' for the base model", "use the base model's id as model for the base model"),
    ("adapter ''", "the base model's id as model"),
    ("(LoadAdapter / --adapter-root)", "(POST /v1/load_lora_adapter, or --adapter-root)"),
    ("ListAdapters shows them", "GET /v1/models lists them"),
    ("list them with ListAdapters", "list them with GET /v1/models"),
)
_RPC_WORDS = {
    "ListAdapters": "GET /v1/models",
    "GetInfo": "GET /v1/models",
    "LoadAdapter": "POST /v1/load_lora_adapter",
    "UnloadAdapter": "POST /v1/unload_lora_adapter",
    "RegisterExamples": "POST /v1/router/examples",
    "GenerateStream": "a streamed request",
}
_RPC_PATTERN = re.compile(r"\b(" + "|".join(_RPC_WORDS) + r")\b")
_STATUS_PATTERN = re.compile(r"\b(" + "|".join(code.name for code in grpc.StatusCode) + r")\b:?\s*")
_SPACES = re.compile(r"\s{2,}")


def for_http(message: str) -> str:
    """`message` (a gRPC server's) without gRPC's names: RPCs become routes, status codes go."""
    for grpc_words, http_words in _PHRASES:
        message = message.replace(grpc_words, http_words)
    message = _RPC_PATTERN.sub(lambda found: _RPC_WORDS[found.group(1)], message)
    return _SPACES.sub(" ", _STATUS_PATTERN.sub("", message)).strip()


def unknown_model(name: str, models: Sequence[str], field: str = "model") -> str:
    """What a request for `name`, which is none of `models` (base model first), is told."""
    listed = ", ".join(shown(model) for model in models[:MAX_LISTED_MODELS])
    more = len(models) - MAX_LISTED_MODELS
    if more > 0:
        listed += f" and {more} more; GET /v1/models lists them"
    what = "model" if field == "model" else "adapter"
    return f"the {what} {shown(name)} does not exist on this server; the models it serves are: {listed}"


def body_problem(content_type: str | None, problems: Sequence[Any]) -> str | None:
    """One sentence for a body that is not a JSON object sent as JSON; None when the body parsed
    as one (its fields are then what is wrong)."""
    if not any(_about_whole_body(problem) for problem in problems):
        return None
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != JSON_CONTENT_TYPE and not media_type.endswith("+json"):
        sent = f"was sent as {shown(media_type)}" if media_type else "has no Content-Type header"
        return f"the request body {sent}; send JSON with the header 'Content-Type: {JSON_CONTENT_TYPE}'"
    for problem in problems:
        if problem.get("type") == "json_invalid":
            reason = (problem.get("ctx") or {}).get("error", "")
            position = next((part for part in problem.get("loc", ())[1:] if isinstance(part, int)), None)
            where = ", ".join(
                part for part in (reason, f"at character {position}" * (position is not None)) if part
            )
            detail = f" ({where})" if where else ""
            return f"the request body is not valid JSON{detail}; send one JSON object"
    for problem in problems:
        if tuple(problem.get("loc", ())) == ("body",) and problem.get("type") == "missing":
            return "the request body is empty; send a JSON object"
    return "the request body must be a JSON object ({...}), not another JSON value"


def _about_whole_body(problem: Any) -> bool:
    """A problem with the body itself (not parsed, or not an object), not with one of its fields."""
    loc = tuple(problem.get("loc", ()))
    if problem.get("type") == "json_invalid":
        return True
    return loc == ("body",)
