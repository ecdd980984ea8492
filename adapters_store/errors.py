"""The one exception family of the adapter store; the server maps each kind to a status code.

Every message says what was wrong (naming the config field, tensor or path) and what to do.
Messages quote user input (names, paths, patterns, keys) through `shown`, so no input can make
a message longer than a bounded size, and name paths relative to their adapter root. An error
that is kept (a pending load's outcome, a remembered refusal) is kept as `message_only(exc)`:
its traceback's frames could otherwise keep the tensors and bytes of a refused file alive.
"""

from __future__ import annotations

SHOWN_CHARS = 80  # how much of one user-given value a message quotes


class AdapterError(ValueError):
    """An adapter or an adapter request that the store refuses (gRPC INVALID_ARGUMENT)."""


class AdapterNotFound(AdapterError, LookupError):
    """A well-formed name or path that names no adapter (gRPC NOT_FOUND)."""


class AdapterExists(AdapterError):
    """A load under a name already registered to another directory, without `replace` (ALREADY_EXISTS)."""


class AdapterTooLarge(AdapterError):
    """An adapter whose host form does not fit the whole host cache (FAILED_PRECONDITION: retrying
    cannot help until the operator raises --host-cache-mb)."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr` of `value` cut to `limit` characters, with the full length when cut.

    shown("sql") == "'sql'"; shown("x" * 10_000) == "'xxx…' (10000 characters)"; shown(4) == "4".
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = _bounded_repr(value, limit)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _bounded_repr(value: object, limit: int) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of {value.bit_length()} bits>"  # repr of a huge int is slow, or refused
    try:
        return repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__}>"


def message_only(exc: BaseException) -> BaseException:
    """A copy of `exc` with its message and type only: no traceback, cause or context to keep frames alive."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:  # an exception type whose constructor wants other arguments
        copy = RuntimeError(f"{type(exc).__name__}: {exc}")
    copy.__traceback__ = None
    copy.__cause__ = None
    copy.__context__ = None
    copy.__suppress_context__ = True
    return copy
