"""The engine's thread count (affinity capped by the cgroup CPU quota), `--threads`, and the OpenMP
environment defaults that `serve` and `bench` set without overriding a user's own."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from server import cli
from server.config import ServerConfig
from server.cpus import cgroup_cpu_quota, default_threads, usable_cpus
from server.runtime import build_engine


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def _cpus(root: Path, affinity: int) -> int:
    return usable_cpus(root, affinity=lambda: affinity)


# ---- usable_cpus -------------------------------------------------------------------------------


def test_without_a_quota_every_cpu_of_the_affinity_mask_is_used(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert _cpus(tmp_path, 6) == 6


def test_the_default_is_this_process_affinity_mask() -> None:
    assert usable_cpus(Path("/nonexistent")) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("6400000 100000", 8)],
)
def test_a_cgroup_v2_quota_caps_the_cpus_rounded_up(tmp_path: Path, cpu_max: str, expected: int) -> None:
    assert _cpus(_cgroup(tmp_path, {"cpu.max": cpu_max}), 8) == expected


def test_cgroup_v2_max_is_no_quota(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"cpu.max": "max 100000"})
    assert cgroup_cpu_quota(root) is None
    assert _cpus(root, 64) == 64


@pytest.mark.parametrize("controller", ["cpu", "cpu,cpuacct"])
def test_a_cgroup_v1_quota_caps_the_cpus(tmp_path: Path, controller: str) -> None:
    root = _cgroup(
        tmp_path, {f"{controller}/cpu.cfs_quota_us": "200000", f"{controller}/cpu.cfs_period_us": "100000"}
    )
    assert cgroup_cpu_quota(root) == 2.0
    assert _cpus(root, 64) == 2


def test_cgroup_v1_quota_minus_one_is_no_quota(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert _cpus(root, 4) == 4


@pytest.mark.parametrize(
    "files",
    [
        {"cpu.max": "lots 100000"},
        {"cpu.max": "100000 0"},
        {"cpu.max": ""},
        {"cpu/cpu.cfs_quota_us": "100000"},  # no period
        {"cpu/cpu.cfs_quota_us": "x", "cpu/cpu.cfs_period_us": "100000"},
    ],
)
def test_garbled_cgroup_files_mean_no_quota(tmp_path: Path, files: dict[str, str]) -> None:
    assert _cpus(_cgroup(tmp_path, files), 3) == 3


def test_unreadable_cgroup_files_mean_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").mkdir()  # reading it raises IsADirectoryError, as an unreadable file would
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_bytes(b"\xff\xfe")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _cpus(tmp_path, 3) == 3


def test_a_quota_above_the_affinity_mask_leaves_the_mask(tmp_path: Path) -> None:
    assert _cpus(_cgroup(tmp_path, {"cpu.max": "800000 100000"}), 2) == 2


def test_at_least_one_cpu(tmp_path: Path) -> None:
    assert _cpus(tmp_path, 0) == 1


@pytest.mark.parametrize(("environ", "expected"), [({"OMP_NUM_THREADS": "3"}, 3), ({}, 5)])
def test_a_users_omp_num_threads_is_the_default(environ: dict[str, str], expected: int) -> None:
    assert default_threads(environ, cpus=lambda: 5) == expected


@pytest.mark.parametrize("value", ["", "0", "4,2", "x"])
def test_an_omp_num_threads_that_is_not_a_count_is_ignored(value: str) -> None:
    assert default_threads({"OMP_NUM_THREADS": value}, cpus=lambda: 5) == 5


# ---- --threads ---------------------------------------------------------------------------------


def _serve_config(*flags: str) -> ServerConfig:
    return cli.server_config(cli.build_parser().parse_args(["serve", *flags]))


def test_the_threads_flag_reaches_the_server_config() -> None:
    assert _serve_config("--threads", "3").threads == 3
    assert _serve_config().threads is None  # auto: usable_cpus() when the engine is built


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_threads_flag_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _serve_config("--threads", value)
    assert "--threads" in capsys.readouterr().err


def test_server_config_refuses_zero_threads() -> None:
    with pytest.raises(ValueError, match="threads"):
        ServerConfig(threads=0)


def test_the_engine_thread_runs_with_the_threads_asked_for(
    make_tiny_model, caplog: pytest.LogCaptureFixture
) -> None:
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO):
            engine = build_engine(ServerConfig(model=str(make_tiny_model()), device="cpu", threads=1))
            engine.start()
            engine.shutdown()
        assert "engine thread: 1 intra-op threads" in caplog.text  # read on the engine thread
    finally:
        torch.set_num_threads(before)


# ---- the thread governor ------------------------------------------------------------------------


def test_the_governor_runs_only_where_the_thread_count_is_ours_to_change(make_tiny_model: Any) -> None:
    before = torch.get_num_threads()
    try:
        for threads, governed in ((None, True), (2, False)):
            config = ServerConfig(model=str(make_tiny_model()), device="cpu", threads=threads)
            engine = build_engine(config)
            assert (engine.governor is not None) is governed
            if governed:
                assert engine.governor is not None and engine.governor.threads == default_threads(os.environ)
    finally:
        torch.set_num_threads(before)
