"""Fewer intra-op threads while other processes keep the CPUs busy, all of them otherwise.

The engine's OpenMP threads meet at the end of every parallel region, hundreds of times a step.
On cores nobody else wants, libgomp's short spin keeps each meeting in microseconds (sleeping
instead, OMP_WAIT_POLICY=PASSIVE, made batch-1 decode 2x slower here). When another process
keeps the cores busy, one of our threads is often descheduled and its partner spins away the
time slice the other one needs: a 64-token request took 35-50x its quiet time. A `ThreadGovernor`
watches the kernel's CPU pressure (PSI, /proc/pressure/cpu: the share of wall time in which some
runnable task waited for a CPU) and runs the engine on one thread, which meets nobody, while the
pressure stays high; when it falls it gives the engine all its threads back.

It runs on the engine thread (thread counts are per thread in libgomp) and costs one small procfs
read per window. Where the kernel has no PSI it does nothing. It knows nothing of the model.

Helper threads that run torch beside the engine (adapter loads, preparation, the router) run it on
one thread each: `one_intra_op_thread` as their executor's initializer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def one_intra_op_thread() -> None:
    """Run the calling helper thread's torch ops on that thread alone (a ThreadPoolExecutor initializer).

    libgomp keeps an OpenMP worker pool for every thread that ran parallel torch code, and once
    the pools hold more threads than there are CPUs the engine's threads stop spin-waiting between
    parallel regions: every engine step is slower from then on (server/runtime.py). One MoS adapter
    prepared on a loader thread with two intra-op threads made each later decode step of a batch of
    32 about 1.35x slower on 2 cores (bench/RESULTS.md, "Helper threads").

    Thread counts are per thread in libgomp, but torch.set_num_threads also sets the process-wide
    count that a thread takes on its first parallel call in each library (torch, the fused
    kernels). So the count is taken in both first (kernels.cpu_extension.take_intra_op_threads),
    and only then set: a later call into either library cannot change it back. The engine thread
    does the same with its own count before Engine.start() returns, so no helper reaches it."""
    import torch

    from kernels.cpu_extension import take_intra_op_threads

    take_intra_op_threads()
    torch.set_num_threads(1)


CPU_PRESSURE = Path("/proc/pressure/cpu")


def read_cpu_stall_us(path: Path = CPU_PRESSURE) -> int | None:
    """Microseconds in which some runnable task waited for a CPU, since boot ("some ... total=")."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("some "):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class ThreadGovernor:
    """Call `tick()` after every engine step; it sets the thread count through `set_threads`.

    Contended: some task waited for a CPU in more than `high` of a window (our own threads keep
    a quiet machine well below it; a busy neighbour on every core keeps it near 1). Quiet again:
    below `low` while the engine runs on one thread. A neighbour that takes only some of the cores
    would make it flip back and forth (all threads: contended; one: quiet), so after each return
    that is contended again at once, it stays on one thread twice as long before the next try.
    """

    def __init__(
        self,
        threads: int,
        set_threads: Callable[[int], None],
        read_stall_us: Callable[[], int | None] = read_cpu_stall_us,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 0.25,
        high: float = 0.6,
        low: float = 0.15,
        hold_s: tuple[float, float] = (1.0, 60.0),  # least time on one thread: first, at most
    ) -> None:
        self.threads = threads
        self._set_threads = set_threads
        self._read = read_stall_us
        self._clock = clock
        self._window_s = window_s
        self._high, self._low = high, low
        self._min_hold, self._max_hold = hold_s
        self._hold = self._min_hold
        self.reduced = False
        self._reduced_at = self._restored_at = -float("inf")
        self._since = clock()
        self._stall = read_stall_us()

    @property
    def current(self) -> int:
        """The engine's thread count now."""
        return 1 if self.reduced else self.threads

    @property
    def active(self) -> bool:
        """False where there is nothing to govern (one thread, or no PSI)."""
        return self.threads > 1 and self._stall is not None

    def tick(self) -> None:
        if not self.active:
            return
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self._window_s:
            return
        stall = self._read()
        if stall is None or self._stall is None:
            return
        share = (stall - self._stall) / (elapsed * 1e6)
        self._since, self._stall = now, stall
        if not self.reduced and share > self._high:
            # contended again right after a return: wait longer before the next one
            recent = now - self._restored_at < 2 * self._window_s + 1e-9
            self._hold = min(2 * self._hold, self._max_hold) if recent else self._min_hold
            self.reduced, self._reduced_at = True, now
            self._set_threads(1)
            log.info("CPUs contended (%.0f%% stalled): the engine runs on 1 thread", 100 * share)
        elif self.reduced and share < self._low and now - self._reduced_at >= self._hold:
            self.reduced, self._restored_at = False, now
            self._set_threads(self.threads)
            log.info("CPUs quiet again: the engine runs on %d threads", self.threads)
