"""Adapter names and roots: names are identifiers, and no path may lead out of a configured root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters_store import AdapterError, AdapterNotFound, AdapterRoots, check_adapter_name, is_adapter_name


def _fake_adapter(directory: Path) -> Path:
    """A directory that looks like an adapter (roots do not validate contents)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text("{}")
    return directory


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = Path(os.path.realpath(tmp_path)) / "root"
    _fake_adapter(root / "alpha")
    _fake_adapter(root / "team" / "beta")
    (root / "not-an-adapter").mkdir()
    (root / "notes.txt").write_text("hi")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return _fake_adapter(tmp_path / "elsewhere" / "evil")


@pytest.mark.parametrize("name", ["a", "llama-3.1_sql", "A" * 128, "0abc"])
def test_valid_names(name: str) -> None:
    assert is_adapter_name(name)
    check_adapter_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "reserved"),
        ("auto", "reserved"),
        ("..", "not a valid adapter name"),
        ("a/b", "not a valid adapter name"),
        ("/etc", "not a valid adapter name"),
        (".hidden", "not a valid adapter name"),
        ("a" * 129, "not a valid adapter name"),
        ("naïve", "not a valid adapter name"),
    ],
)
def test_invalid_and_reserved_names(name: str, message: str) -> None:
    assert not is_adapter_name(name)
    with pytest.raises(AdapterError, match=message):
        check_adapter_name(name)


def test_list_finds_adapter_subdirectories_and_first_root_wins(root: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    _fake_adapter(second / "alpha")
    _fake_adapter(second / "gamma")
    _fake_adapter(second / "bad name")
    roots = AdapterRoots([root, second])
    assert roots.list() == {"alpha": root / "alpha", "gamma": second / "gamma"}
    assert roots.resolve("alpha") == root / "alpha"
    assert roots.resolve("gamma") == second / "gamma"


def test_resolve_unknown_or_malformed_name(root: Path) -> None:
    roots = AdapterRoots([root])
    with pytest.raises(AdapterNotFound, match="no adapter named 'missing'"):
        roots.resolve("missing")
    with pytest.raises(AdapterNotFound):
        roots.resolve("not-an-adapter")
    with pytest.raises(AdapterError, match="not a valid adapter name"):
        roots.resolve("../elsewhere")


def test_resolve_path_inside_a_root(root: Path) -> None:
    roots = AdapterRoots([root])
    assert roots.resolve_path("alpha") == root / "alpha"
    assert roots.resolve_path("team/beta") == root / "team" / "beta"
    assert roots.resolve_path(str(root / "team" / "beta")) == root / "team" / "beta"


@pytest.mark.parametrize("path", ["../elsewhere/evil", "alpha/../alpha", "team/../../elsewhere/evil"])
def test_dot_dot_is_refused(root: Path, outside: Path, path: str) -> None:
    with pytest.raises(AdapterError, match=r"must not contain '\.\.'"):
        AdapterRoots([root]).resolve_path(path)


def test_absolute_path_elsewhere_is_refused(root: Path, outside: Path) -> None:
    roots = AdapterRoots([root])
    with pytest.raises(AdapterError, match="is outside the adapter roots"):
        roots.resolve_path(str(outside))
    with pytest.raises(AdapterError, match="is outside the adapter roots"):
        roots.resolve_path(str(root))  # the root itself is not an adapter directory


def test_symlink_out_of_the_root_is_refused(root: Path, outside: Path) -> None:
    (root / "sneaky").symlink_to(outside)
    roots = AdapterRoots([root])
    with pytest.raises(AdapterError, match="outside its adapter root"):
        roots.resolve_path("sneaky")
    with pytest.raises(AdapterError, match="outside its adapter root"):
        roots.resolve("sneaky")
    assert "sneaky" not in roots.list()


def test_symlinked_file_out_of_the_root_is_refused(root: Path, outside: Path) -> None:
    adapter = root / "linked-file"
    adapter.mkdir()
    (adapter / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    with pytest.raises(AdapterError, match="adapter_config.json is a symlink out of the adapter root"):
        AdapterRoots([root]).resolve_path("linked-file")


def test_symlink_within_the_root_is_followed(root: Path) -> None:
    (root / "alias").symlink_to(root / "team" / "beta")
    roots = AdapterRoots([root])
    assert roots.resolve_path("alias") == root / "team" / "beta"
    assert roots.resolve("alias") == root / "team" / "beta"


def test_missing_path_and_files_are_not_found_or_refused(root: Path) -> None:
    roots = AdapterRoots([root])
    with pytest.raises(AdapterNotFound, match="does not exist"):
        roots.resolve_path("nope")
    with pytest.raises(AdapterError, match="is not a directory"):
        roots.resolve_path("notes.txt")
    with pytest.raises(AdapterError, match="empty"):
        roots.resolve_path("")


def test_no_roots_and_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="--adapter-root"):
        AdapterRoots([]).resolve_path("alpha")
    assert AdapterRoots([]).list() == {}
    with pytest.raises(AdapterError, match="is not a directory"):
        AdapterRoots([tmp_path / "missing"])


def test_roots_are_real_paths(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "root-link"
    link.symlink_to(root)
    roots = AdapterRoots([link])
    assert roots.roots == (Path(os.path.realpath(root)),)
    assert roots.resolve_path(str(link / "alpha")) == root / "alpha"
