"""Quote what a client sent inside an error message: a bounded prefix that always encodes.

A 10,000-character role or a lone surrogate (`"\\ud800"` in JSON) must not make an error
message huge (gRPC's metadata limit turns an oversized status message into RESOURCE_EXHAUSTED)
or unencodable (UTF-8 refuses lone surrogates, in protobuf and in JSON alike). `quote` is for
the value the client sent; `encodable` bounds and repairs a whole message.

This module knows nothing about gRPC, HTTP or requests.
"""

from __future__ import annotations

QUOTE_CHARS = 64  # of one quoted value
LONE_SURROGATE = "holds a lone UTF-16 surrogate (such as \\ud800), which is not text; send valid Unicode"
TRUNCATED = "... (truncated)"


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` of at most `limit` characters of it, with its length when it was cut.

    repr escapes lone surrogates (`'\\ud800'`), so the result is always valid UTF-8.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def has_lone_surrogate(text: str) -> bool:
    """True if `text` holds a UTF-16 surrogate code point, which no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encodable(message: str, max_bytes: int) -> str:
    """`message` as valid UTF-8 of at most `max_bytes` bytes (surrogates escaped, the tail cut)."""
    data = message.encode("utf-8", "backslashreplace")
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    keep = max(0, max_bytes - len(TRUNCATED))
    return data[:keep].decode("utf-8", "ignore") + TRUNCATED
