"""The thread governor against a scripted CPU pressure: one thread while the CPUs are contended,
all of them when quiet, longer holds for a neighbour that makes it flip, nothing without PSI."""

from __future__ import annotations

from pathlib import Path

from server.engine.threads import ThreadGovernor, read_cpu_stall_us


class Scripted:
    """A clock and a PSI counter: each `window(share)` advances 0.25 s with that share stalled."""

    def __init__(self) -> None:
        self.now = 0.0
        self.stall_us = 0
        self.threads: list[int] = []

    def window(self, share: float, seconds: float = 0.25) -> None:
        self.now += seconds
        self.stall_us += int(share * seconds * 1e6)

    def governor(self, threads: int = 2) -> ThreadGovernor:
        return ThreadGovernor(threads, self.threads.append, lambda: self.stall_us, lambda: self.now)


def test_contention_drops_to_one_thread_and_quiet_restores_them() -> None:
    s = Scripted()
    governor = s.governor()
    for share in (0.05, 0.2, 0.1):  # our own threads on a quiet machine
        s.window(share)
        governor.tick()
    assert s.threads == [] and not governor.reduced
    s.window(0.95)  # a neighbour on every core
    governor.tick()
    assert s.threads == [1] and governor.reduced
    for _ in range(8):  # still busy (one engine thread + the neighbour: still contended)
        s.window(0.9)
        governor.tick()
    assert s.threads == [1]
    s.window(0.02)  # the neighbour left
    governor.tick()
    assert s.threads == [1, 2] and not governor.reduced


def test_a_neighbour_on_some_cores_backs_the_probes_off() -> None:
    s = Scripted()
    governor = s.governor()
    flips = []
    for step in range(400):  # 100 s: contended with all threads, quiet with one
        s.window(0.9 if not governor.reduced else 0.05)
        before = len(s.threads)
        governor.tick()
        if len(s.threads) > before and s.threads[-1] == 2:
            flips.append(step)
    gaps = [b - a for a, b in zip(flips, flips[1:], strict=False)]
    assert len(flips) < 12 and gaps == sorted(gaps)  # each hold twice the last, up to a minute


def test_windows_shorter_than_the_window_do_nothing() -> None:
    s = Scripted()
    governor = s.governor()
    s.window(1.0, seconds=0.1)
    governor.tick()
    assert s.threads == []


def test_nothing_to_govern_without_psi_or_with_one_thread(tmp_path: Path) -> None:
    s = Scripted()
    assert not ThreadGovernor(2, s.threads.append, lambda: None, lambda: s.now).active
    assert not s.governor(threads=1).active
    assert read_cpu_stall_us(tmp_path / "missing") is None
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=1.31 avg60=2.83 avg300=2.38 total=2552911622\nfull avg10=0.00 total=0\n")
    assert read_cpu_stall_us(psi) == 2552911622
