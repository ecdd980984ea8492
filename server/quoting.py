"""Error messages that stay bounded and always encode, whatever a client sent.

A 10,000-character role or a lone surrogate (`"\\ud800"` in JSON) must not make an error
message huge (gRPC's metadata limit turns an oversized status message into RESOURCE_EXHAUSTED)
or unencodable (UTF-8 refuses lone surrogates, in protobuf and in JSON alike). The value the
client sent is quoted with `adapters_store.errors.shown` (a bounded repr, which escapes
surrogates); `encodable` bounds and repairs a whole message.

This module knows nothing about gRPC, HTTP or requests.
"""

from __future__ import annotations

LONE_SURROGATE = "holds a lone UTF-16 surrogate (such as \\ud800), which is not text; send valid Unicode"
TRUNCATED = "... (truncated)"


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
