"""Which adapters are versions of one another: a compressed or exported adapter names its source.

`loramux compress` and `loramux export` write `source.json` into the adapter they make (and copy
the source's `examples.jsonl`, the router's example prompts, beside it):

    {"source": {"name": "sql", "format": "peft-lora", "checksum": "sha256:..."},
     "original": "sha256:..."}

`source` is the adapter it was made from (its directory's name, its format and the sha256 of its
weight file, which is what the loaders call its checksum); `original` is the checksum of the first
adapter of the chain that was not made from another (an export of a ComPEFT adapter names the
LoRA the ComPEFT was compressed from). A ComPEFT adapter compressed before source.json existed
still names its source in its config (`source_checksum`), without a name.

`origin_of(directory)` reads either (None: an adapter made some other way, its own original);
`weights_checksum(directory)` hashes its weight file as the loaders do, so an adapter on disk is
matched with an original without being loaded. The router routes all versions of one original as
one adapter (server/router/variants.py). This module reads small files and hashes weight files;
it loads no adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.adapter import LoadedAdapter
from adapters_store.compeft import WEIGHTS_FILE as COMPEFT_WEIGHTS_FILE
from adapters_store.compeft_config import CONFIG_FILE as COMPEFT_CONFIG_FILE
from adapters_store.mos import WEIGHTS_FILE as MOS_WEIGHTS_FILE
from adapters_store.peft_lora import WEIGHTS_FILE

SOURCE_FILE = "source.json"
EXAMPLES_FILE = "examples.jsonl"  # server/router/examples.py reads it
WEIGHT_FILES = (WEIGHTS_FILE, MOS_WEIGHTS_FILE, COMPEFT_WEIGHTS_FILE)  # one per format
_CHUNK = 1 << 20
HEADER_ALLOWANCE = 1 << 20  # a safetensors header's bytes, at most, beside a LoRA's data


@dataclass(frozen=True)
class Origin:
    """Where a derived adapter comes from."""

    original: str  # "sha256:<hex>" of the weight file of the first adapter of its chain
    source_name: str  # its direct source's directory name ("" = not recorded)
    # the sizes in bytes the original's weight file can have (None = not known): only files of
    # such a size are hashed when the original is looked for by its checksum
    original_bytes: tuple[int, int] | None = None


def source_record(source: LoadedAdapter) -> dict[str, Any]:
    """What `write_source` writes for an adapter made from `source`."""
    origin = origin_of(source.source)
    return {
        "source": {
            "name": source.source.resolve().name,
            "format": source.format,
            "checksum": source.checksum,
        },
        "original": origin.original if origin is not None else source.checksum,
        "original_bytes": _original_bytes(origin, source.source),
    }


def _original_bytes(origin: Origin | None, source: Path) -> int | None:
    """The size of the original's weight file: the source's own when it is the original."""
    if origin is not None:
        low, high = origin.original_bytes or (0, -1)
        return low if low == high else None
    sizes = [(source / name).stat().st_size for name in WEIGHT_FILES if (source / name).is_file()]
    return sizes[0] if sizes else None


def write_source(directory: Path, source: LoadedAdapter) -> None:
    """Record in `directory` (an adapter being made) that it was made from `source`, and copy the
    source's example prompts (the router's `examples.jsonl`): the same task, the same examples."""
    (directory / SOURCE_FILE).write_text(json.dumps(source_record(source), indent=2) + "\n")
    examples = source.source / EXAMPLES_FILE
    if examples.is_file():
        (directory / EXAMPLES_FILE).write_bytes(examples.read_bytes())


def origin_of(directory: Path) -> Origin | None:
    """The origin `directory`'s adapter records, or None (made some other way, or nothing readable:
    an unreadable record makes it an original, never another adapter's version)."""
    record = _json(directory / SOURCE_FILE)
    if record is not None:
        original, source = record.get("original"), record.get("source")
        name = source.get("name") if isinstance(source, dict) else None
        if isinstance(original, str) and _is_checksum(original):
            size = record.get("original_bytes")
            exact = (
                (size, size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
            )
            return Origin(original, name if isinstance(name, str) else "", exact)
    config = _json(directory / COMPEFT_CONFIG_FILE)
    checksum = config.get("source_checksum") if config is not None else None
    if config is not None and isinstance(checksum, str) and _is_checksum(checksum):
        elements = config.get("total_elements")
        sizes = None
        if isinstance(elements, int) and not isinstance(elements, bool) and elements > 0:
            # a LoRA of that many elements in 16 or 32 bits, and its safetensors header
            sizes = (2 * elements, 4 * elements + HEADER_ALLOWANCE)
        return Origin(checksum, "", sizes)
    return None


def weights_checksum(directory: Path) -> str | None:
    """The "sha256:<hex>" of the adapter's weight file (the first of WEIGHT_FILES present), as its loader
    computes its checksum; None when there is none or it cannot be read."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            digest = hashlib.sha256()
            try:
                with path.open("rb") as file:
                    while chunk := file.read(_CHUNK):
                        digest.update(chunk)
            except OSError:
                return None
            return "sha256:" + digest.hexdigest()
    return None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_checksum(value: str) -> bool:
    return value.startswith("sha256:") and len(value) == 71
