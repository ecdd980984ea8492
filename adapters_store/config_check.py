"""The cheap check of an adapter found on disk: is its config one loramux could serve?

`ConfigCheck(spec).problem(directory, label)` reads only the adapter's small JSON config and
its weights file's safetensors header: the config parses, its format is known, its required keys
are present and valid for this base model (ranks, targets), and the weights file the format needs
exists with a whole header that matches its length (so a truncated file is seen).
It returns the refusal's message, or None when nothing is wrong so far; `summary(directory, label)`
what the config says of a servable adapter (format, largest rank, adapted projections), for
listings of adapters not read yet. Loading still validates
the weights (shapes, dtypes, finite values, checksum), whose data this never reads. Results are kept
per directory until the config's or the weights file's stat changes, so listing thousands of
adapters costs a few `stat` calls each after the first listing.

It does not know the host cache or the device tier, and never raises for a bad adapter.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters_store import compeft_config, mos, peft_config, peft_lora
from adapters_store.compeft import WEIGHTS_FILE as COMPEFT_WEIGHTS_FILE
from adapters_store.errors import AdapterError
from adapters_store.formats import FORMAT_REGISTRY, detect_format
from adapters_store.safetensors_header import read_header
from adapters_store.spec import BaseModelSpec

Stat = tuple[int, int, int] | None  # (size, mtime_ns, inode); None when missing


@dataclass(frozen=True)
class ConfigSummary:
    """What a servable adapter's config says, before its weights are read."""

    format: str
    rank: int  # the largest rank of its modules
    target_modules: tuple[str, ...]  # the projections it adapts, in the base model's order


def _check_peft_lora(directory: Path, spec: BaseModelSpec, label: str) -> ConfigSummary:
    source = f"{label}/{peft_config.CONFIG_FILE}"
    config = peft_config.parse_peft_lora_config(
        peft_config.read_config_json(directory / peft_config.CONFIG_FILE, source), source
    )
    plans = peft_config.plan_modules(config, spec, source)  # targets and ranks against the base model
    _weights_present(directory, label, peft_lora.WEIGHTS_FILE, peft_config.CONFIG_FILE)
    projections = {plan.projection for plan in plans.values()}
    rank = max((plan.rank for plan in plans.values()), default=0)
    return ConfigSummary(peft_lora.FORMAT, rank, tuple(p for p in spec.projections if p in projections))


def _check_mos(directory: Path, spec: BaseModelSpec, label: str) -> ConfigSummary:
    source = f"{label}/{mos.CONFIG_FILE}"
    config = mos.parse_mos_config(
        peft_config.read_config_json(directory / mos.CONFIG_FILE, source), spec, source
    )
    _weights_present(directory, label, mos.WEIGHTS_FILE, mos.CONFIG_FILE)
    return ConfigSummary(mos.FORMAT, config.layout.r, config.target_modules)


def _check_compeft(directory: Path, spec: BaseModelSpec, label: str) -> ConfigSummary:
    source = f"{label}/{compeft_config.CONFIG_FILE}"
    raw = peft_config.read_config_json(directory / compeft_config.CONFIG_FILE, source)
    config = compeft_config.parse_compeft_config(raw, spec, source)
    _weights_present(directory, label, COMPEFT_WEIGHTS_FILE, compeft_config.CONFIG_FILE)
    projections = {m.projection for m in config.modules}
    rank = max((m.rank for m in config.modules), default=0)
    return ConfigSummary(compeft_config.FORMAT, rank, tuple(p for p in spec.projections if p in projections))


def _weights_present(directory: Path, label: str, weights: str, config: str) -> None:
    """The weights file exists and its safetensors header is whole and matches the file's length
    (a truncated or foreign file is refused here; its data is never read)."""
    path = directory / weights
    if not path.is_file():
        what = "is missing" if not path.exists() else "is not a regular file"
        raise AdapterError(f"{label}/{weights} {what}: the adapter needs it beside {config}")
    try:
        with path.open("rb") as file:
            read_header(file, f"{label}/{weights}")
    except OSError as exc:
        raise AdapterError(f"cannot read {label}/{weights}: {exc.strerror or type(exc).__name__}") from None


_CHECKS: dict[str, Callable[[Path, BaseModelSpec, str], ConfigSummary]] = {
    peft_lora.FORMAT: _check_peft_lora,
    mos.FORMAT: _check_mos,
    compeft_config.FORMAT: _check_compeft,
}
_WATCHED_FILES = tuple(dict.fromkeys(file for f in FORMAT_REGISTRY for file in f.files))


class ConfigCheck:
    """Config checks against one base model, remembered per directory until its files change."""

    def __init__(self, spec: BaseModelSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._seen: dict[Path, tuple[tuple[Stat, ...], str | ConfigSummary]] = {}

    def problem(self, directory: Path, label: str) -> str | None:
        """Why the adapter in `directory` (named `label` in messages) cannot be served, or None."""
        found = self.checked(directory, label)
        return found if isinstance(found, str) else None

    def summary(self, directory: Path, label: str) -> ConfigSummary | None:
        """What its config says, or None when it cannot be served (`problem` says why)."""
        found = self.checked(directory, label)
        return found if isinstance(found, ConfigSummary) else None

    def checked(self, directory: Path, label: str) -> str | ConfigSummary:
        """`problem`'s message, or `summary`'s summary, from one check."""
        stats = tuple(file_stat(directory / file) for file in _WATCHED_FILES)
        with self._lock:
            seen = self._seen.get(directory)
        if seen is not None and seen[0] == stats:
            return seen[1]
        found = self._check(directory, label)
        with self._lock:
            self._seen[directory] = (stats, found)
        return found

    def forget_except(self, directories: set[Path]) -> None:
        """Drop what is remembered about directories no longer listed."""
        with self._lock:
            for directory in set(self._seen) - directories:
                del self._seen[directory]

    def _check(self, directory: Path, label: str) -> str | ConfigSummary:
        try:
            return _CHECKS[detect_format(directory, label)](directory, self.spec, label)
        except AdapterError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a listing must never fail for one adapter
            return f"{label}: its config could not be checked ({type(exc).__name__})"


def file_stat(path: Path) -> Stat:
    """(size, mtime_ns, inode) of `path`, None when it cannot be stat'ed: a file's version, cheaply."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)
