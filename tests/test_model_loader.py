"""Finding the model: leftovers of a first-start conversion killed midway are removed at the next start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from server.model.loader import STAGING_PREFIX, STALE_STAGING_S, convert_gguf, remove_stale_conversions


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _staging(models: Path, name: str) -> Path:
    folder = models / f"{STAGING_PREFIX}{name}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)  # a half-written checkpoint
    return folder


def test_a_conversion_whose_process_died_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    killed = _staging(tmp_path, f"{_dead_pid()}-abc123")
    running = _staging(tmp_path, f"{os.getpid()}-def456")
    assert remove_stale_conversions(tmp_path) == [killed]
    assert not killed.exists()
    assert running.is_dir()


def test_an_old_staging_folder_without_a_pid_is_removed_a_fresh_one_kept(tmp_path: Path) -> None:
    old = _staging(tmp_path, "x7y8z9")
    fresh = _staging(tmp_path, "q1w2e3")
    long_ago = time.time() - STALE_STAGING_S - 60
    os.utime(old, (long_ago, long_ago))
    assert remove_stale_conversions(tmp_path) == [old]
    assert fresh.is_dir()


def test_a_start_with_the_model_already_converted_still_cleans_up(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "cache" / "models" / f"tiny-{gguf.stat().st_size}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    killed = _staging(target.parent, f"{_dead_pid()}-abc123")
    assert convert_gguf(gguf, tmp_path / "cache") == target
    assert not killed.exists()
