"""Versions of one adapter are routed as one: `auto` serves the original.

A compressed or exported adapter records the adapter it was made from (adapters_store/lineage.py).
Routed beside it, the copies split the router's probability: the sql LoRA with a ComPEFT copy and
an export of that copy scored 0.21 each, below the 0.5 threshold, and `auto` fell back to the base
model; with top-k 2 a request ran an adapter mixed with its own copy. So among the routable
adapters each version of a routable original is left out of routing (it is still served by its
name), and versions whose original is not routable are routed as one: the first of them by name.

`Variants.of(routable)` -> {version: the adapter it is routed as}. A version's original is looked
for first through the name its record gives (one weight file hashed per link), then, for versions
still unmatched, among the checksums of every routable original's weight file. Records and hashes
are cached by their files' size and mtime, so a rescan of unchanged roots only stats them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from adapters_store.compeft_config import CONFIG_FILE as COMPEFT_CONFIG_FILE
from adapters_store.lineage import SOURCE_FILE, WEIGHT_FILES, Origin, origin_of, weights_checksum

MAX_LINKS = 8  # how far a chain of recorded sources is followed by name

Signature = tuple[tuple[int, int] | None, ...]


class Variants:
    def __init__(self) -> None:
        self._origins: dict[Path, tuple[Signature, Origin | None]] = {}
        self._checksums: dict[Path, tuple[Signature, str | None]] = {}

    def of(self, routable: Mapping[str, Path]) -> dict[str, str]:
        """{version: the adapter `auto` routes it as} among `routable` (name -> directory)."""
        origins = {name: self._origin(directory) for name, directory in routable.items()}
        derived = {name: origin for name, origin in origins.items() if origin is not None}
        if not derived:
            return {}
        routed_as: dict[str, str] = {}
        unmatched = []
        for name in sorted(derived):
            original = self._by_name(name, derived, routable)
            if original is not None:
                routed_as[name] = original
            else:
                unmatched.append(name)
        if unmatched:
            by_checksum: dict[str, str] = {}
            for name in sorted(set(routable) - set(derived)):
                checksum = self._checksum(routable[name])
                if checksum is not None:
                    by_checksum.setdefault(checksum, name)
            for name in unmatched:
                original = by_checksum.get(derived[name].original)
                if original is not None:
                    routed_as[name] = original
        groups: dict[str, list[str]] = {}
        for name in sorted(set(derived) - set(routed_as)):
            groups.setdefault(derived[name].original, []).append(name)
        for first, *others in groups.values():
            routed_as.update((other, first) for other in others)
        return routed_as

    def _by_name(self, name: str, derived: Mapping[str, Origin], routable: Mapping[str, Path]) -> str | None:
        """The routable original reached by following recorded source names from `name`, if its
        weight file is the original `name` records."""
        wanted, current = derived[name].original, name
        for _ in range(MAX_LINKS):
            source = derived[current].source_name
            if source not in routable or source == current:
                return None
            if source not in derived:
                return source if self._checksum(routable[source]) == wanted else None
            if derived[source].original != wanted:
                return None
            current = source
        return None

    def _origin(self, directory: Path) -> Origin | None:
        signature = _signature(directory, (SOURCE_FILE, COMPEFT_CONFIG_FILE))
        cached = self._origins.get(directory)
        if cached is None or cached[0] != signature:
            cached = (signature, origin_of(directory))
            self._origins[directory] = cached
        return cached[1]

    def _checksum(self, directory: Path) -> str | None:
        signature = _signature(directory, WEIGHT_FILES)
        cached = self._checksums.get(directory)
        if cached is None or cached[0] != signature:
            cached = (signature, weights_checksum(directory))
            self._checksums[directory] = cached
        return cached[1]


def _signature(directory: Path, names: tuple[str, ...]) -> Signature:
    """(size, mtime) of each of `names` in `directory`, None where absent."""
    result: list[tuple[int, int] | None] = []
    for name in names:
        try:
            stat = os.stat(directory / name)
        except OSError:
            result.append(None)
        else:
            result.append((stat.st_size, stat.st_mtime_ns))
    return tuple(result)
