"""Versions of one adapter are routed as one: `auto` serves the original.

A compressed or exported adapter records the adapter it was made from (adapters_store/lineage.py).
Routed beside it, the copies split the router's probability: the sql LoRA with a ComPEFT copy and
an export of that copy scored 0.21 each, below the 0.5 threshold, and `auto` fell back to the base
model; with top-k 2 a request ran an adapter mixed with its own copy. So among the routable
adapters each version of a routable original is left out of routing (it is still served by its
name), and versions whose original is not routable are routed as one: the first of them by name.

`Variants.of(routable)` -> {version: the adapter it is routed as}. A version's original is looked
for first through the name its record gives (one weight file hashed per link), then, for versions
still unmatched, among the routable originals whose weight file has a size the original can have
(recorded by compress and export; from the element count for a ComPEFT config): so one ComPEFT
whose LoRA is elsewhere hashes no file, or those of that size, at most MAX_HASHED_PER_CALL a call
(the rest on later rescans: a version unmatched meanwhile is routed on its own). Records and
hashes are cached by
their files' size, mtime and inode (forgotten with their directories), so a rescan of unchanged
roots only stats them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from adapters_store.compeft_config import CONFIG_FILE as COMPEFT_CONFIG_FILE
from adapters_store.config_check import Stat, file_stat
from adapters_store.lineage import SOURCE_FILE, WEIGHT_FILES, Origin, origin_of, weights_checksum

MAX_LINKS = 8  # how far a chain of recorded sources is followed by name
# Weight files hashed per call when versions are matched by checksum (cached after): a root of
# thousands of same-shape LoRAs is covered over several rescans, none of which stalls for long.
MAX_HASHED_PER_CALL = 32

Signature = tuple[Stat, ...]


class Variants:
    def __init__(self) -> None:
        self._origins: dict[Path, tuple[Signature, Origin | None]] = {}
        self._checksums: dict[Path, tuple[Signature, str | None]] = {}

    def of(
        self, routable: Mapping[str, Path], refused: Callable[[str], bool] = lambda name: False
    ) -> dict[str, str]:
        """{version: the adapter `auto` routes it as} among `routable` (name -> directory). An
        original whose last load was `refused` (too large, a bad file) is itself routed as its first
        servable version: `auto` would only fail on it."""
        for cache in (self._origins, self._checksums):  # directories gone or no longer routable
            for gone in set(cache) - set(routable.values()):
                del cache[gone]
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
        originals = sorted(set(routable) - set(derived))
        budget = [MAX_HASHED_PER_CALL]
        for name in unmatched:  # only weight files of a size the original can have are hashed
            sizes = derived[name].original_bytes
            candidates = [
                n
                for n in originals
                if sizes is not None and sizes[0] <= (self._weights_size(routable[n]) or -1) <= sizes[1]
            ]
            for candidate in candidates:
                if self._checksum(routable[candidate], budget) == derived[name].original:
                    routed_as[name] = candidate
                    break
        found = {derived[name].original: original for name, original in routed_as.items()}
        for name in unmatched:  # another version of the same original found it
            if name not in routed_as and derived[name].original in found:
                routed_as[name] = found[derived[name].original]
        groups: dict[str, list[str]] = {}
        for name in sorted(set(derived) - set(routed_as)):
            groups.setdefault(derived[name].original, []).append(name)
        for first, *others in groups.values():
            routed_as.update((other, first) for other in others)
        return _around_refused(routed_as, refused)

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

    def _weights_size(self, directory: Path) -> int | None:
        for stat in _signature(directory, WEIGHT_FILES):
            if stat is not None:
                return stat[0]
        return None

    def _checksum(self, directory: Path, budget: list[int] | None = None) -> str | None:
        """Its weight file's checksum, from the cache while the file is unchanged; else hashed,
        if `budget` (files left to hash in this call) allows, else None for now."""
        signature = _signature(directory, WEIGHT_FILES)
        cached = self._checksums.get(directory)
        if cached is None or cached[0] != signature:
            if budget is not None:
                if budget[0] <= 0:
                    return None
                budget[0] -= 1
            cached = (signature, weights_checksum(directory))
            self._checksums[directory] = cached
        return cached[1]


def _around_refused(routed_as: dict[str, str], refused: Callable[[str], bool]) -> dict[str, str]:
    """`routed_as` with each refused original replaced, as its group's representative, by its
    first version that is not refused (the original then routed as that version)."""
    groups: dict[str, list[str]] = {}
    for version, original in sorted(routed_as.items()):
        groups.setdefault(original, []).append(version)
    result = dict(routed_as)
    for original, versions in groups.items():
        servable = [v for v in versions if not refused(v)]
        if not servable or not refused(original):
            continue
        stand_in = servable[0]
        del result[stand_in]
        result[original] = stand_in
        result.update((v, stand_in) for v in versions if v != stand_in)
    return result


def _signature(directory: Path, names: tuple[str, ...]) -> Signature:
    """(size, mtime, inode) of each of `names` in `directory`, None where absent."""
    return tuple(file_stat(directory / name) for name in names)
