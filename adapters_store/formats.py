"""Adapter formats: each recognises its own directories and loads them; detection asks them in turn.

A format is one `AdapterFormat` entry: its name, `claims(directory)` (True when the directory is
this format's; it may raise AdapterError for a directory of its kind in a variant it refuses, e.g.
a PEFT directory of another peft_type) and `load(directory, spec, name, label=, max_bytes=)
-> LoadedAdapter`, where `label` is the directory as messages name it (relative to its adapter
root, never an absolute path) and `max_bytes` the host memory one adapter may take. `files`
are the files its loader reads (their stat fingerprints a loaded version): `peft-lora`, `mos` and
`compeft`.
This module reads at most the small JSON config needed to tell formats apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters_store.adapter import LoadedAdapter
from adapters_store.compeft import WEIGHTS_FILE as COMPEFT_WEIGHTS_FILE
from adapters_store.compeft import load_compeft
from adapters_store.compeft_config import CONFIG_FILE as COMPEFT_CONFIG_FILE
from adapters_store.compeft_config import FORMAT as COMPEFT
from adapters_store.errors import AdapterError, shown
from adapters_store.mos import CONFIG_FILE as MOS_CONFIG_FILE
from adapters_store.mos import FORMAT as MOS
from adapters_store.mos import WEIGHTS_FILE as MOS_WEIGHTS_FILE
from adapters_store.mos import load_mos
from adapters_store.peft_config import CONFIG_FILE, read_config_json
from adapters_store.peft_lora import FORMAT as PEFT_LORA
from adapters_store.peft_lora import WEIGHTS_FILE, load_peft_lora
from adapters_store.spec import BaseModelSpec


class Loader(Protocol):
    def __call__(
        self,
        directory: Path,
        spec: BaseModelSpec,
        name: str,
        *,
        label: str | None = None,
        max_bytes: int | None = None,
    ) -> LoadedAdapter: ...


class Claims(Protocol):
    def __call__(self, directory: Path, label: str) -> bool: ...


@dataclass(frozen=True)
class AdapterFormat:
    name: str
    marker_files: tuple[str, ...]  # a directory holding one of these is an adapter of some format
    files: tuple[str, ...]  # every file its loader reads
    claims: Claims
    load: Loader


def _claims_peft_lora(directory: Path, label: str) -> bool:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return False
    source = f"{label}/{CONFIG_FILE}"
    peft_type = read_config_json(config_path, source).get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{source}: peft_type {shown(peft_type)} is not supported; loramux serves PEFT adapters with "
            "peft_type 'LORA'"
        )
    return True


def _claims_mos(directory: Path, label: str) -> bool:
    return (directory / MOS_CONFIG_FILE).is_file()  # its "format" field is load_mos's to check


def _claims_compeft(directory: Path, label: str) -> bool:
    config_path = directory / COMPEFT_CONFIG_FILE
    if not config_path.is_file():
        return False
    source = f"{label}/{COMPEFT_CONFIG_FILE}"
    format_name = read_config_json(config_path, source).get("format")
    if format_name != COMPEFT:
        raise AdapterError(f"{source}: format {shown(format_name)} is not supported; expected {COMPEFT!r}")
    return True


FORMAT_REGISTRY: tuple[AdapterFormat, ...] = (
    AdapterFormat(PEFT_LORA, (CONFIG_FILE,), (CONFIG_FILE, WEIGHTS_FILE), _claims_peft_lora, load_peft_lora),
    AdapterFormat(MOS, (MOS_CONFIG_FILE,), (MOS_CONFIG_FILE, MOS_WEIGHTS_FILE), _claims_mos, load_mos),
    AdapterFormat(
        COMPEFT,
        (COMPEFT_CONFIG_FILE,),
        (COMPEFT_CONFIG_FILE, COMPEFT_WEIGHTS_FILE),
        _claims_compeft,
        load_compeft,
    ),
)
LOADERS: dict[str, Loader] = {f.name: f.load for f in FORMAT_REGISTRY}
FORMATS = tuple(LOADERS)
MARKER_FILES = tuple(marker for f in FORMAT_REGISTRY for marker in f.marker_files)
ADAPTER_FILES = tuple(dict.fromkeys(file for f in FORMAT_REGISTRY for file in f.files))


def is_adapter_dir(directory: Path) -> bool:
    """True if `directory` looks like an adapter of some format (without validating it)."""
    return any((directory / marker).is_file() for marker in MARKER_FILES)


def detect_format(directory: Path | str, label: str | None = None) -> str:
    """The format of the adapter in `directory`; AdapterError when no format recognises it.

    `label`: the directory as messages name it (default its name).
    """
    directory = Path(directory)
    label = label or directory.name
    for adapter_format in FORMAT_REGISTRY:
        if adapter_format.claims(directory, label):
            return adapter_format.name
    if not directory.is_dir():
        raise AdapterError(f"{label} is not a directory")
    raise AdapterError(
        f"{label} holds no adapter loramux recognises: expected {CONFIG_FILE} + "
        f"{WEIGHTS_FILE} (a PEFT LoRA directory), {MOS_CONFIG_FILE} + {MOS_WEIGHTS_FILE} (a MoS directory) "
        f"or {COMPEFT_CONFIG_FILE} + {COMPEFT_WEIGHTS_FILE} (a compeft directory, from `loramux compress`)"
    )


def load_adapter(
    directory: Path | str,
    spec: BaseModelSpec,
    name: str,
    format: str | None = None,
    expected_checksum: str | None = None,
    *,
    label: str | None = None,
    max_bytes: int | None = None,
) -> LoadedAdapter:
    """Load and validate the adapter in `directory` as `name` (format detected when None).

    `expected_checksum` ("sha256:<hex>"), when given, must equal the checksum of the files read.
    `label`: the directory as messages name it (default its name); `max_bytes`: the host memory
    the adapter may take (AdapterTooLarge before its data is read).
    """
    directory = Path(directory)
    label = label or directory.name
    if format is None:
        format = detect_format(directory, label)
    loader = LOADERS.get(format)
    if loader is None:
        raise AdapterError(
            f"adapter format {shown(format)} is not supported; supported: {', '.join(FORMATS)}"
        )
    _check_marker(directory, format, label)
    adapter = loader(directory, spec, name, label=label, max_bytes=max_bytes)
    if expected_checksum is not None and adapter.checksum != expected_checksum:
        raise AdapterError(
            f"{label}: checksum {adapter.checksum} does not match the expected {shown(expected_checksum)}; "
            "the files changed since the checksum was taken"
        )
    return adapter


def _check_marker(directory: Path, format: str, label: str) -> None:
    """A format asked for explicitly must be the directory's: say what the directory holds instead."""
    markers = next(f.marker_files for f in FORMAT_REGISTRY if f.name == format)
    if any((directory / marker).is_file() for marker in markers):
        return
    try:
        found = f"it holds a {detect_format(directory, label)} adapter"
    except AdapterError:
        found = "it holds no adapter loramux recognises"
    raise AdapterError(f"{label} is not a {format} adapter (no {' or '.join(markers)}): {found}")
