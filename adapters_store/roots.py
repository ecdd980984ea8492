"""Adapter roots: the only directories adapters are read from (`--adapter-root DIR`, repeatable).

Each subdirectory of a root that holds an adapter is an adapter named after the subdirectory.
A path in a load request is resolved inside a root: after `os.path.realpath` (symlinks followed)
it must lie strictly below that root; `..` components, absolute paths elsewhere and symlinks
pointing out of the root are refused, and so is an adapter directory whose files link out of it.
Earlier roots win when two hold the same name. Messages, which clients see, name a directory
relative to its root (`team/sql`) and quote at most a bounded prefix of a given path; they
never show a root's absolute path or where a symlink points (the server log does). This module
knows paths and names, not formats' contents; whoever can write into a root is trusted (the
checks run before reading, not atomically).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePath

from adapters_store.errors import SHOWN_CHARS, AdapterError, AdapterNotFound, shown
from adapters_store.formats import is_adapter_dir
from adapters_store.names import check_adapter_name, is_adapter_name

log = logging.getLogger(__name__)


class AdapterRoots:
    """The configured adapter roots (real paths), in precedence order."""

    def __init__(self, directories: Sequence[str | os.PathLike[str]]) -> None:
        roots: list[Path] = []
        for directory in directories:
            real = Path(os.path.realpath(directory))
            if not real.is_dir():
                raise AdapterError(f"adapter root {os.fspath(directory)!r} is not a directory")
            if real not in roots:
                roots.append(real)
        self.roots: tuple[Path, ...] = tuple(roots)

    def list(self) -> dict[str, Path]:
        """Every adapter on disk: name -> its real directory (first root wins), sorted by name."""
        found: dict[str, Path] = {}
        for root in self.roots:
            try:
                entries = sorted(os.scandir(root), key=lambda e: e.name)
            except OSError as exc:
                log.warning("cannot list adapter root %s: %s", root, exc)
                continue
            for entry in entries:
                if entry.name in found or entry.name.startswith(".") or not _is_dir(entry):
                    continue
                if not is_adapter_name(entry.name):
                    log.warning("skipping %s: %r is not a valid adapter name", entry.path, entry.name)
                    continue
                try:
                    directory = self._inside(root, Path(entry.path), entry.name)
                except AdapterError as exc:
                    log.warning("skipping %s: %s", entry.path, exc)
                    continue
                if is_adapter_dir(directory):
                    found[entry.name] = directory
        return dict(sorted(found.items()))

    def resolve(self, name: str) -> Path:
        """The real directory of adapter `name` in the first root that has it; AdapterNotFound if none."""
        check_adapter_name(name)
        for root in self.roots:
            candidate = root / name
            if candidate.is_dir() and is_adapter_dir(candidate):
                return self._inside(root, candidate, name)
        raise AdapterNotFound(f"no adapter named {shown(name)} in the adapter roots")

    def resolve_path(self, path: str) -> Path:
        """The real directory a load request's `path` names, which must lie inside an adapter root.

        A relative path is looked up in each root in order; an absolute one must already be inside one.
        """
        if not self.roots:
            raise AdapterError("no adapter roots are configured; start the server with --adapter-root DIR")
        if not path or "\x00" in path:
            raise AdapterError(f"adapter path {shown(path)} is empty or malformed")
        if ".." in PurePath(path).parts:
            raise AdapterError(
                f"adapter path {shown(path)} must not contain '..': give a directory inside an adapter root"
            )
        if os.path.isabs(path):
            real = Path(os.path.realpath(path))
            for root in self.roots:
                if _is_below(root, real):
                    return self._checked(root, Path(path), path)
            raise AdapterError(
                f"adapter path {shown(path)} is outside the adapter roots: loramux reads adapters "
                "only from inside a configured --adapter-root"
            )
        for root in self.roots:
            candidate = root / path
            if os.path.lexists(candidate):
                return self._checked(root, candidate, path)
        raise AdapterNotFound(f"adapter path {shown(path)} does not exist in the adapter roots")

    def relative(self, directory: Path) -> str:
        """`directory` (a real path) as clients may see it: relative to the first root that holds it
        ("team/sql"); its last component alone if no root does."""
        for root in self.roots:
            if _is_below(root, directory):
                return directory.relative_to(root).as_posix()
        return directory.name

    def _checked(self, root: Path, candidate: Path, given: str) -> Path:
        directory = self._inside(root, candidate, given)
        if not directory.is_dir():
            raise AdapterError(f"adapter path {shown(given)} is not a directory")
        return directory

    def _inside(self, root: Path, candidate: Path, given: str) -> Path:
        """Real path of `candidate` if it, and every entry directly in it, stays strictly below `root`."""
        real = Path(os.path.realpath(candidate))
        if not _is_below(root, real):
            log.warning("refused adapter path %r: it resolves to %s, outside its root %s", given, real, root)
            raise AdapterError(
                f"adapter path {shown(given)} resolves outside its adapter root "
                "(symlinks may not point out of the root)"
            )
        try:
            entries = list(os.scandir(real)) if real.is_dir() else []
        except OSError as exc:
            raise AdapterError(
                f"cannot read adapter path {shown(given)}: {exc.strerror or type(exc).__name__}"
            ) from None
        for entry in entries:
            if entry.is_symlink() and not _is_below(root, Path(os.path.realpath(entry.path))):
                raise AdapterError(
                    f"adapter path {shown(given)}: {entry.name[:SHOWN_CHARS]} is a symlink out of the adapter root"
                )
        return real


def _is_below(root: Path, real: Path) -> bool:
    return real != root and real.is_relative_to(root)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
