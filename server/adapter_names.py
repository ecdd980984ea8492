"""Which adapter a request asks for: name rules and the choice between base, one adapter or "auto".

Adapter names are identifiers, never paths: letters, digits, '.', '_' and '-', starting with a
letter or digit, at most 128 characters. `""` is the base model and `"auto"` asks the router.

This module knows the naming rules and the request shapes; whether a well-formed name can be
served it asks the `check_known` callable it is handed (the engine's), which raises
`adapters_store.AdapterNotFound`. It does not load adapters, route prompts or know about gRPC.
There is no router yet, so "auto" and weighted mixtures are refused as not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from adapters_store.names import NAME_PATTERN, NAME_RULE
from server.engine.request import InvalidRequest

BASE_ADAPTER = ""
AUTO_ADAPTER = "auto"
MAX_MIXTURE = 8

CheckKnown = Callable[[str], None]  # raises adapters_store.AdapterNotFound for a name it cannot serve


def check_adapter_name(name: str, field: str = "adapter") -> None:
    """Raise InvalidRequest unless `name` is a well-formed adapter identifier."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(f"{field} {name!r} is not a valid adapter name: {NAME_RULE}")


def select_adapter(adapter: str, mixture: Sequence[tuple[str, float]], check_known: CheckKnown) -> str:
    """The adapter a request will run with: `adapter`, or the one adapter of `mixture`.

    Raises InvalidRequest for malformed input, AdapterNotFound (from `check_known`) for names
    the server cannot serve and NotImplementedError for what it cannot do yet ("auto", mixtures).
    """
    if mixture and adapter:
        raise InvalidRequest("set either adapter or adapters (a weighted mixture), not both")
    if mixture:
        return _select_from_mixture(mixture, check_known)
    if adapter == BASE_ADAPTER:
        return BASE_ADAPTER
    if adapter == AUTO_ADAPTER:
        raise NotImplementedError(
            "adapter 'auto' needs the router, which is not built yet; name an adapter "
            "(ListAdapters shows them) or use adapter '' for the base model"
        )
    check_adapter_name(adapter)
    check_known(adapter)
    return adapter


def _select_from_mixture(mixture: Sequence[tuple[str, float]], check_known: CheckKnown) -> str:
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
        check_known(name)
    raise NotImplementedError("weighted adapter mixtures are not supported yet; name one adapter instead")
