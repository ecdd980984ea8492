"""One log line per adapter tier move, on the logger `loramux.adapters`, as stable key=value pairs.

    adapter loaded name=sql tier=host format=peft-lora rank=16 bytes=4718592 seconds=0.041 source=sql
    adapter loaded name=sql tier=device slot=2 pool=lora rank=16 seconds=0.003
    adapter evicted name=sql tier=host bytes=4718592
    adapter evicted name=sql tier=device slot=2
    adapter unloaded name=sql
    adapter refused name=bad reason="bad/adapter_config.json: r must be ..."

Loads, evictions and unloads (UnloadAdapter) are INFO, refusals WARNING (each refusal once, until the adapter's files
change: the store remembers it). Values with spaces, quotes or '=' are JSON-quoted; a reason is
cut to REASON_CHARS. It never logs a weight, a prompt or an absolute path (sources are relative
to their adapter root). This module only formats; the tiers call it where things happen.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("loramux.adapters")
REASON_CHARS = 500


def value(text: object) -> str:
    """`text` as one key=value token: bare when it is safe, JSON-quoted otherwise."""
    text = str(text)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)


def _line(event: str, fields: dict[str, object]) -> str:
    return " ".join([f"adapter {event}", *(f"{key}={value(v)}" for key, v in fields.items())])


def loaded(name: str, tier: str, **fields: object) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(_line("loaded", {"name": name, "tier": tier, **fields}))


def evicted(name: str, tier: str, **fields: object) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(_line("evicted", {"name": name, "tier": tier, **fields}))


def unloaded(name: str) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(_line("unloaded", {"name": name}))


def refused(name: str, reason: object) -> None:
    log.warning(_line("refused", {"name": name, "reason": str(reason)[:REASON_CHARS]}))
