"""One loramux replica as the simulation sees it: loader threads, a host tier, device slots and a
continuously batched engine, modelled on what `server/engine` does.

1) A request is accepted: its adapter's load starts on one of `loader_threads` (FIFO; a load of
   the same adapter still in flight is joined, as `AdapterManager.prefetch`): `disk_to_host_s`
   when the adapter is not in the host tier (it is then put there, the least recently used one
   evicted past `host_adapters`), `host_hit_s` when it is. Every request goes through the loader,
   a slot-resident adapter too: loramux reads the host tier and prepares the device form for each.
2) Each step starts with admission, oldest first (`Scheduler._admit`): while fewer than
   `max_running` run, a request whose load is done gets a device slot: its adapter's slot if
   resident (pinned while requests use it), else an empty slot, else the least recently released
   unpinned one (evicted); the copy into it (`host_to_device_s`) adds to this step. One that is
   not loaded yet, or finds every slot pinned, waits without holding back those behind it.
3) The step: one decode token for every prefilled sequence and prompt chunks, oldest first, in
   the rest of `max_batched_tokens`; its time is `Costs`' (batch, distinct adapters, prompt
   tokens, slot copies). A sequence whose prompt completes gets its first token at the step's
   end; one with max_tokens tokens finishes and unpins its slot (idle, most recently released).
4) With nothing running and nothing loaded the replica sleeps until the next load is done.

Deliberately not modelled: KV-cache memory (a sequence holds one of `max_running` KV slots, as
in loramux), the queue limit (`max_queue`: nothing is refused), stop tokens (every request
generates its max_tokens), mixtures and the base model (one adapter per request), network time.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from bench.clustersim.costs import Costs
from bench.clustersim.state import RESIDENT, RUNS, WAITS, FleetState

DEVICE, HOST, DISK = 0, 1, 2  # where a request found its adapter (RequestTable.tier)
STEP_END, WAKE = 0, 1  # replica events


@dataclass(frozen=True)
class ReplicaShape:
    """One replica's capacities (loramux's flags in brackets)."""

    slots: int  # device slots [--max-slots], also max_lora for the llm-d scorer
    host_adapters: int  # host tier, in adapters [--host-cache-mb / one adapter's bytes]
    max_running: int = 32  # [EngineConfig.max_running]
    max_batched_tokens: int = 512  # [EngineConfig.max_batched_tokens]
    loader_threads: int = 2  # [AdapterManager's loader pool]

    def __post_init__(self) -> None:
        if self.slots < 1 or self.host_adapters < 1 or self.loader_threads < 1:
            raise ValueError("a replica needs >= 1 device slot, host tier place and loader thread")
        if not 1 <= self.max_running <= self.max_batched_tokens:
            raise ValueError("a replica needs 1 <= max_running <= max_batched_tokens")


class RequestTable:
    """Every request's inputs and what happened to it (plain lists: scalar access is the hot path)."""

    def __init__(self, adapters: list[int], prompt_tokens: list[int], max_tokens: list[int]) -> None:
        n = len(adapters)
        self.adapter = adapters
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.replica = [-1] * n
        self.tier = [-1] * n
        self.sent_s = [float("nan")] * n  # reached its replica (after any time held at the router)
        self.ready_s = [0.0] * n  # its adapter's load is done
        self.first_token_s = [float("nan")] * n
        self.finish_s = [float("nan")] * n
        self.finishes = [0] * n  # how often it finished (exactly once, in a sound run)


class LoadLog:
    """When each cold load started: disk -> host (loader) and host -> device (slot copies)."""

    def __init__(self) -> None:
        self.disk_s: list[float] = []
        self.device_s: list[float] = []


class Replica:
    def __init__(
        self,
        index: int,
        shape: ReplicaShape,
        costs: Costs,
        shared: tuple[RequestTable, FleetState, LoadLog],
        schedule: Callable[[float, int, int], None],
    ) -> None:
        self.index = index
        self.shape = shape
        self.costs = costs
        self.table = costs.step_table(shape.max_running)
        self.requests, self.state, self.log = shared
        self.schedule = schedule  # (time, replica, event kind) -> queued
        self.waiting: list[int] = []
        self.prefilling: deque[list[int]] = deque()  # [request, prompt tokens left], admission order
        self.running = 0
        self.run_counts: dict[int, int] = {}  # adapter -> running requests on it (its slot's pins)
        self.wait_counts: dict[int, int] = {}  # adapter -> waiting requests for it
        self.resident: set[int] = set()  # adapters in a device slot
        self.idle: OrderedDict[int, None] = OrderedDict()  # resident, unpinned, least recently released first
        self.empty_slots = shape.slots
        self.host: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.loaders = [0.0] * shape.loader_threads  # when each loader thread is free
        self.in_flight: dict[int, tuple[float, bool]] = {}  # adapter -> (load done, from disk)
        self.finishing: dict[int, list[int]] = {}  # step number -> requests that finish at its end
        self.steps = 0
        self.stepping = False
        self.wake_s = float("inf")
        self.step_started_s = 0.0
        self.completing: list[int] = []  # requests whose prompt completes in the step in flight
        self.busy_s = 0.0
        self.sequence_steps = 0  # sum over steps of the sequences in them (mean batch = this / steps)

    # -- arrivals --------------------------------------------------------------------------------

    def where_is(self, adapter: int, now: float) -> int:
        """DEVICE, HOST or DISK: where a request for `adapter` finds it now (loramux's adapter_tier:
        a read from disk still in flight counts as disk)."""
        if adapter in self.resident:
            return DEVICE
        loading = self.in_flight.get(adapter)
        if loading is not None and loading[0] > now and loading[1]:
            return DISK
        return HOST if adapter in self.host else DISK

    def accept(self, request: int, now: float) -> None:
        """Queue `request` and start its adapter's load (step 1 of the module docstring)."""
        adapter = self.requests.adapter[request]
        ready = self._load(adapter, now)
        self.requests.ready_s[request] = ready
        self.waiting.append(request)
        count = self.wait_counts.get(adapter, 0)
        self.wait_counts[adapter] = count + 1
        if not count:
            self.state.add(WAITS, adapter, self.index)
        self.state.waiting[self.index] += 1
        self.state.ongoing[self.index] += 1
        if not self.stepping and ready < self.wake_s:
            self.wake_s = ready
            self.schedule(ready, self.index, WAKE)

    def _load(self, adapter: int, now: float) -> float:
        loading = self.in_flight.get(adapter)
        if loading is not None and loading[0] > now:
            return loading[0]  # join the load in flight
        thread = min(range(len(self.loaders)), key=self.loaders.__getitem__)
        start = max(now, self.loaders[thread])
        # The host tier changes only here, in loader order, so deciding at acceptance what the
        # loader will find when it starts is exact.
        cold = adapter not in self.host
        if cold:
            self.host[adapter] = None
            if len(self.host) > self.shape.host_adapters:
                self.host.popitem(last=False)
            self.log.disk_s.append(start)
        else:
            self.host.move_to_end(adapter)
        ready = start + (self.costs.disk_to_host_s if cold else self.costs.host_hit_s)
        self.loaders[thread] = ready
        self.in_flight[adapter] = (ready, cold)
        return ready

    # -- steps -----------------------------------------------------------------------------------

    def wake(self, now: float) -> None:
        if self.stepping or now != self.wake_s:
            return  # superseded: already stepping, or woken for an earlier load
        self.wake_s = float("inf")
        self.start_step(now)

    def start_step(self, now: float) -> None:
        """Admit, plan and run one step (steps 2-3), or sleep until the next load is done (step 4)."""
        fills = self._admit(now) if self.waiting else 0
        if not self.running:
            self.stepping = False
            if self.waiting:  # none is loaded yet (with nothing running, no slot is pinned)
                self.wake_s = min(self.requests.ready_s[r] for r in self.waiting)
                self.schedule(self.wake_s, self.index, WAKE)
            return
        decodes = self.running - len(self.prefilling)
        budget = self.shape.max_batched_tokens - decodes
        prompt_tokens = chunks = 0
        self.completing = []
        for entry in self.prefilling:
            if budget <= 0:
                break
            chunk = min(budget, entry[1])
            entry[1] -= chunk
            budget -= chunk
            prompt_tokens += chunk
            chunks += 1
            if not entry[1]:
                self.completing.append(entry[0])
        batch = decodes + chunks
        seconds = self.table[batch][min(len(self.run_counts), batch)]
        seconds += prompt_tokens * self.costs.prefill_per_token_s + fills * self.costs.host_to_device_s
        self.stepping = True
        self.step_started_s = now
        self.sequence_steps += batch
        self.schedule(now + seconds, self.index, STEP_END)

    def end_step(self, now: float) -> int:
        """The step in flight ends: first tokens, finished requests. Returns how many finished."""
        self.busy_s += now - self.step_started_s
        step = self.steps
        self.steps += 1
        requests = self.requests
        finished = 0
        for request in self.completing:
            self.prefilling.popleft()  # the completed prompts are the oldest ones
            requests.first_token_s[request] = now
            last_step = step + requests.max_tokens[request] - 1
            if last_step == step:
                self._finish(request, now)
                finished += 1
            else:
                self.finishing.setdefault(last_step, []).append(request)
        for request in self.finishing.pop(step, ()):
            self._finish(request, now)
            finished += 1
        return finished

    def _admit(self, now: float) -> int:
        """Step 2: admit what can run; returns the slot copies it made."""
        requests, state, r = self.requests, self.state, self.index
        fills = 0
        keep: list[int] = []
        for position, request in enumerate(self.waiting):
            if self.running >= self.shape.max_running:
                keep.extend(self.waiting[position:])
                break
            if requests.ready_s[request] > now:
                keep.append(request)
                continue
            adapter = requests.adapter[request]
            if adapter in self.resident:
                if adapter not in self.run_counts:
                    del self.idle[adapter]  # pinned from now on
            elif not self._fill_slot(adapter, now):
                keep.append(request)  # every slot is pinned
                continue
            else:
                fills += 1
            count = self.run_counts.get(adapter, 0)
            self.run_counts[adapter] = count + 1
            if not count:
                state.add(RUNS, adapter, r)
            count = self.wait_counts[adapter] - 1
            if count:
                self.wait_counts[adapter] = count
            else:
                del self.wait_counts[adapter]
                state.remove(WAITS, adapter, r)
            self.running += 1
            self.prefilling.append([request, requests.prompt_tokens[request]])
        self.waiting = keep
        admitted = state.waiting[r] - len(keep)
        state.waiting[r] = len(keep)
        state.running[r] += admitted
        return fills

    def _fill_slot(self, adapter: int, now: float) -> bool:
        if self.empty_slots:
            self.empty_slots -= 1
        elif self.idle:
            evicted, _ = self.idle.popitem(last=False)
            self.resident.discard(evicted)
            self.state.remove(RESIDENT, evicted, self.index)
        else:
            return False
        self.resident.add(adapter)
        self.state.add(RESIDENT, adapter, self.index)
        self.log.device_s.append(now)
        return True

    def _finish(self, request: int, now: float) -> None:
        requests = self.requests
        requests.finish_s[request] = now
        requests.finishes[request] += 1
        adapter = requests.adapter[request]
        count = self.run_counts[adapter] - 1
        if count:
            self.run_counts[adapter] = count
        else:
            del self.run_counts[adapter]
            self.idle[adapter] = None  # unpinned: the most recently released
            self.state.remove(RUNS, adapter, self.index)
        self.running -= 1
        self.state.running[self.index] -= 1
        self.state.ongoing[self.index] -= 1
