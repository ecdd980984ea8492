"""Adapter formats: detecting one from a directory's files, and dispatching to its loader.

Each format registers a loader `(directory, spec, name) -> LoadedAdapter` and a way to recognise
its directories. Only `peft-lora` exists so far; `mos` and `compeft` will add their own entries.
This module reads at most the small JSON config needed to tell formats apart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adapters_store.adapter import LoadedAdapter
from adapters_store.errors import AdapterError
from adapters_store.peft_config import CONFIG_FILE, read_config_json
from adapters_store.peft_lora import FORMAT as PEFT_LORA
from adapters_store.peft_lora import load_peft_lora
from adapters_store.spec import BaseModelSpec

Loader = Callable[[Path, BaseModelSpec, str], LoadedAdapter]

LOADERS: dict[str, Loader] = {PEFT_LORA: load_peft_lora}
FORMATS = tuple(LOADERS)
# A directory that holds one of these files is an adapter directory (of some format).
MARKER_FILES = (CONFIG_FILE,)


def is_adapter_dir(directory: Path) -> bool:
    """True if `directory` looks like an adapter of some format (without validating it)."""
    return any((directory / marker).is_file() for marker in MARKER_FILES)


def detect_format(directory: Path | str) -> str:
    """The format of the adapter in `directory`; AdapterError when no format recognises it."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        peft_type = read_config_json(config_path).get("peft_type")
        if peft_type == "LORA":
            return PEFT_LORA
        raise AdapterError(
            f"{config_path}: peft_type {peft_type!r} is not supported; loramux serves PEFT adapters with "
            "peft_type 'LORA'"
        )
    if not directory.is_dir():
        raise AdapterError(f"{directory} is not a directory")
    raise AdapterError(
        f"{directory} holds no adapter loramux recognises: expected {CONFIG_FILE} + "
        "adapter_model.safetensors (a PEFT LoRA directory)"
    )


def load_adapter(
    directory: Path | str,
    spec: BaseModelSpec,
    name: str,
    format: str | None = None,
    expected_checksum: str | None = None,
) -> LoadedAdapter:
    """Load and validate the adapter in `directory` as `name` (format detected when None).

    `expected_checksum` ("sha256:<hex>"), when given, must equal the checksum of the files read.
    """
    directory = Path(directory)
    if format is None:
        format = detect_format(directory)
    loader = LOADERS.get(format)
    if loader is None:
        raise AdapterError(f"adapter format {format!r} is not supported; supported: {', '.join(FORMATS)}")
    adapter = loader(directory, spec, name)
    if expected_checksum is not None and adapter.checksum != expected_checksum:
        raise AdapterError(
            f"{directory}: checksum {adapter.checksum} does not match the expected {expected_checksum}; "
            "the files changed since the checksum was taken"
        )
    return adapter
