"""What a router can see of the fleet, kept current by the replicas as their state changes.

Per replica (numpy arrays, index = replica): `ongoing` (waiting + running: Ray's queue length,
the least-loaded policy's load), `waiting`, `running`, and `num_lora` = |running adapters| +
|waiting adapters| (what vLLM's `lora_requests_info` lets the llm-d scorer count against max_lora).
Per adapter (inverted indexes, adapter -> set of replicas): where it `runs` (a running request
uses it), where it `waits` (a waiting request wants it), where it is `resident` (in a device slot).
A router that reads a scraped, late copy instead (llm-d) replays `changes`, the log of every
index change, when it refreshes its copy.

It knows nothing of time, costs or policies.
"""

from __future__ import annotations

import numpy as np

RUNS, WAITS, RESIDENT = 0, 1, 2  # which index a logged change is to


class FleetState:
    def __init__(self, replicas: int, keep_changes: bool = False) -> None:
        self.replicas = replicas
        self.ongoing = np.zeros(replicas, dtype=np.int64)
        self.waiting = np.zeros(replicas, dtype=np.int64)
        self.running = np.zeros(replicas, dtype=np.int64)
        self.num_lora = np.zeros(replicas, dtype=np.int64)
        self.where: tuple[dict[int, set[int]], dict[int, set[int]], dict[int, set[int]]] = ({}, {}, {})
        # (index, adapter, replica, added) per change, for a router that reads a late copy
        self.changes: list[tuple[int, int, int, bool]] | None = [] if keep_changes else None

    def add(self, index: int, adapter: int, replica: int) -> None:
        self.where[index].setdefault(adapter, set()).add(replica)
        if index != RESIDENT:
            self.num_lora[replica] += 1
        if self.changes is not None:
            self.changes.append((index, adapter, replica, True))

    def remove(self, index: int, adapter: int, replica: int) -> None:
        holders = self.where[index][adapter]
        holders.discard(replica)
        if not holders:
            del self.where[index][adapter]
        if index != RESIDENT:
            self.num_lora[replica] -= 1
        if self.changes is not None:
            self.changes.append((index, adapter, replica, False))
