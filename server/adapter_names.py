"""Which adapter a request asks for: name rules and the choice between base, one adapter or "auto".

Adapter names are identifiers, never paths: letters, digits, '.', '_' and '-', starting with a
letter or digit, at most 128 characters. `""` is the base model and `"auto"` asks the router.

This module knows the naming rules and which names are loaded (it is handed the set); it
does not load adapters, route prompts or know about gRPC. Until the multi-adapter work
lands, no adapter is loaded and there is no router, so only the base model can be chosen.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence

from adapters_store.names import NAME_PATTERN, NAME_RULE
from server.engine.request import InvalidRequest

BASE_ADAPTER = ""
AUTO_ADAPTER = "auto"
MAX_MIXTURE = 8


class AdapterNotFound(LookupError):
    """A well-formed adapter name that is not loaded (maps to NOT_FOUND / HTTP 404)."""


def check_adapter_name(name: str, field: str = "adapter") -> None:
    """Raise InvalidRequest unless `name` is a well-formed adapter identifier."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(f"{field} {name!r} is not a valid adapter name: {NAME_RULE}")


def select_adapter(adapter: str, mixture: Sequence[tuple[str, float]], loaded: Container[str]) -> str:
    """The adapter a request will run with: `adapter`, or the one adapter of `mixture`.

    Raises InvalidRequest for malformed input, AdapterNotFound for names not in `loaded`
    and NotImplementedError for what this server cannot do yet ("auto", mixtures).
    """
    if mixture and adapter:
        raise InvalidRequest("set either adapter or adapters (a weighted mixture), not both")
    if mixture:
        return _select_from_mixture(mixture, loaded)
    if adapter == BASE_ADAPTER:
        return BASE_ADAPTER
    if adapter == AUTO_ADAPTER:
        raise NotImplementedError(
            "adapter 'auto' needs the router, which arrives with the multi-adapter work; "
            "use adapter '' for the base model"
        )
    check_adapter_name(adapter)
    if adapter not in loaded:
        raise AdapterNotFound(
            f"adapter {adapter!r} is not loaded (adapters arrive with the multi-adapter work); "
            "use adapter '' for the base model"
        )
    return adapter


def _select_from_mixture(mixture: Sequence[tuple[str, float]], loaded: Container[str]) -> str:
    if len(mixture) > MAX_MIXTURE:
        raise InvalidRequest(f"at most {MAX_MIXTURE} adapters in a mixture, got {len(mixture)}")
    names = [name for name, _weight in mixture]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"adapters lists a name twice: {names}")
    for index, (name, weight) in enumerate(mixture):
        check_adapter_name(name, field=f"adapters[{index}].name")
        if not math.isfinite(weight) or weight <= 0.0:
            raise InvalidRequest(f"adapters[{index}].weight must be a finite number > 0, got {weight}")
    for name in names:
        if name not in loaded:
            raise AdapterNotFound(
                f"adapter {name!r} is not loaded (adapters arrive with the multi-adapter work)"
            )
    raise NotImplementedError("weighted adapter mixtures are not supported yet; name one adapter instead")
