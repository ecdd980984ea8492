"""The adapter-name rule: names are identifiers, never paths.

A name is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, so it can
never be `..`, hold a separator or be absolute. `""` (the base model) and `"auto"` (the
router) are reserved: no adapter may be registered under them. This module knows only the
rule; what a request means by `""` or `"auto"` is the server's business.
"""

from __future__ import annotations

import re

from adapters_store.errors import AdapterError, AdapterNotFound, shown

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
RESERVED_NAMES = frozenset({"", "auto"})


def is_adapter_name(name: str) -> bool:
    """True if `name` may be registered as an adapter (well-formed and not reserved)."""
    return NAME_PATTERN.fullmatch(name) is not None and name not in RESERVED_NAMES


def check_adapter_name(name: str, *, lookup: bool = False) -> None:
    """Raise unless `name` may name an adapter: AdapterError when registering one, AdapterNotFound
    when looking one up (`lookup`: no adapter can have a malformed name). The one place of the rule."""
    if name in RESERVED_NAMES:
        raise AdapterError(f"adapter name {name!r} is reserved ('' is the base model, 'auto' the router)")
    if NAME_PATTERN.fullmatch(name) is None:
        error = AdapterNotFound if lookup else AdapterError
        raise error(f"{shown(name)} is not a valid adapter name: {NAME_RULE}")
