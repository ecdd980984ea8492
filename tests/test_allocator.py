"""server/allocator.py: glibc malloc keeps memory it will be asked for again, unless the user chose."""

from __future__ import annotations

import platform

import pytest

from server.allocator import USER_SETTINGS, keep_freed_memory


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_glibc_accepts_both_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory.__wrapped__() is True  # mallopt returned 1 for each (0: a value refused)


@pytest.mark.parametrize("name", [*USER_SETTINGS, "LORAMUX_MALLOC"])
def test_a_user_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "default" if name == "LORAMUX_MALLOC" else "1")
    assert keep_freed_memory.__wrapped__() is False


def test_elsewhere_than_linux_nothing_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "win32")  # ctypes.CDLL(None) raises TypeError there
    assert keep_freed_memory.__wrapped__() is False
