"""Adapter formats: each recognises its own directories and loads them; detection asks them in turn.

A format is one `AdapterFormat` entry: its name, `claims(directory)` (True when the directory is
this format's; it may raise AdapterError for a directory of its kind in a variant it refuses, e.g.
a PEFT directory of another peft_type) and `load(directory, spec, name) -> LoadedAdapter`. Only
`peft-lora` exists so far; `mos` and `compeft` add their own entries to FORMAT_REGISTRY.
This module reads at most the small JSON config needed to tell formats apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters_store.adapter import LoadedAdapter
from adapters_store.errors import AdapterError
from adapters_store.peft_config import CONFIG_FILE, read_config_json
from adapters_store.peft_lora import FORMAT as PEFT_LORA
from adapters_store.peft_lora import load_peft_lora
from adapters_store.spec import BaseModelSpec

Loader = Callable[[Path, BaseModelSpec, str], LoadedAdapter]


@dataclass(frozen=True)
class AdapterFormat:
    name: str
    marker_files: tuple[str, ...]  # a directory holding one of these is an adapter of some format
    claims: Callable[[Path], bool]
    load: Loader


def _claims_peft_lora(directory: Path) -> bool:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return False
    peft_type = read_config_json(config_path).get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{config_path}: peft_type {peft_type!r} is not supported; loramux serves PEFT adapters with "
            "peft_type 'LORA'"
        )
    return True


FORMAT_REGISTRY: tuple[AdapterFormat, ...] = (
    AdapterFormat(PEFT_LORA, (CONFIG_FILE,), _claims_peft_lora, load_peft_lora),
)
LOADERS: dict[str, Loader] = {f.name: f.load for f in FORMAT_REGISTRY}
FORMATS = tuple(LOADERS)
MARKER_FILES = tuple(marker for f in FORMAT_REGISTRY for marker in f.marker_files)


def is_adapter_dir(directory: Path) -> bool:
    """True if `directory` looks like an adapter of some format (without validating it)."""
    return any((directory / marker).is_file() for marker in MARKER_FILES)


def detect_format(directory: Path | str) -> str:
    """The format of the adapter in `directory`; AdapterError when no format recognises it."""
    directory = Path(directory)
    for adapter_format in FORMAT_REGISTRY:
        if adapter_format.claims(directory):
            return adapter_format.name
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
