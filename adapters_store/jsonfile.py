"""Decoding the small JSON documents of adapter files (configs, safetensors headers) safely.

Whatever the bytes hold — invalid UTF-8 or JSON, integers of thousands of digits (which
`json.loads` refuses with a plain ValueError), nesting deep enough to exhaust the recursion
limit — the result is a dict or an AdapterError that names the file. This module knows no
fields; callers check what the object holds.
"""

from __future__ import annotations

import json
from typing import Any

from adapters_store.errors import AdapterError


def decode_object(data: bytes, where: str) -> dict[str, Any]:
    """The JSON object in `data`; `where` names the document in messages ("sql/adapter_config.json")."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(f"{where} is not valid UTF-8; re-save the adapter") from None
    except RecursionError:
        raise AdapterError(f"{where} is not valid JSON (nested too deeply); re-save the adapter") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        reason = str(exc)[:200]
        raise AdapterError(f"{where} is not valid JSON ({reason}); re-save the adapter") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{where} must hold a JSON object, got {type(value).__name__}")
    return value
