"""The one exception family of the adapter store; the server maps each kind to a status code.

Every message says what was wrong (naming the config field, tensor or path) and what to do.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter or an adapter request that the store refuses (gRPC INVALID_ARGUMENT)."""


class AdapterNotFound(AdapterError, LookupError):
    """A well-formed name or path that names no adapter (gRPC NOT_FOUND)."""


class AdapterExists(AdapterError):
    """A load under a name already registered to another directory, without `replace` (ALREADY_EXISTS)."""


class AdapterTooLarge(AdapterError):
    """An adapter whose host form does not fit the whole host cache (RESOURCE_EXHAUSTED)."""
