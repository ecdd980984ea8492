"""Routing policies: which replica a request goes to, from what each router can see (`FleetState`).

- `random`: uniformly at random.
- `least-loaded`: fewest waiting + running requests (exact, live), ties at random.
- `ray`: Ray Serve model multiplexing, after ray-project/ray
  `serve/_private/request_router/request_router.py` (`MultiplexMixin.apply_multiplex_routing`) and
  `pow_2_router.py` (`PowerOfTwoChoicesRequestRouter`), and the docs' "Model Multiplexing" page:
  each replica keeps an LRU of the last `max_num_models_per_replica` (= slots) model ids it was
  sent (`@serve.multiplexed`), reported to the router. The candidates are first the replicas
  holding the request's model id (when none does: those with the fewest models loaded); two of
  them are drawn at random and the one with the shorter queue (ongoing requests) among those that
  accept (ongoing < `max_ongoing_requests`) gets it. When neither accepts, Ray backs off and
  retries with the fewest-models replicas, and after its matching timeout (1-2 s) with all
  replicas; modelled without the backoff as holders -> fewest models -> all replicas, each one
  power-of-two draw, and when all three fail the request waits at the router (FIFO) until a
  replica finishes one: that replica takes the first waiting request for a model it holds, else
  the oldest (`FIFOMixin._fulfill_next_pending_request`).
- `llm-d`: the Gateway API Inference Extension endpoint picker (kubernetes-sigs/
  gateway-api-inference-extension, `pkg/epp/scheduling/framework/plugins/scorer/`:
  `lora_affinity.go`, `queue.go`, `kvcache_utilization.go`; max-score picker, ties at random).
  Score = w_queue * queue + w_kv * kv + w_lora * lora, where queue = (max waiting - waiting) /
  (max - min) over the pods (1 when all equal), kv = 1 - KV-cache usage (here running / max_running:
  loramux gives each sequence one KV slot), lora = 1.0 when the adapter is in the pod's
  `running_lora_adapters`, else 0.8 when |running| + |waiting| adapters < max_lora (= slots),
  else 0.6 when it is in `waiting_lora_adapters`, else 0. Weights default to 1 each (the EPP's
  default when a profile gives none; the prefix-cache scorer is left out: these prompts share no
  prefix, so it scores every pod alike). The picker sees the pods' metrics as last scraped
  (`--refreshMetricsInterval`, 50 ms by default): every `scrape_s` the router refreshes its copy.
  Note what vLLM's metric says: an adapter in a slot but with no running request is not "active".
- `llm-d-resident` (not an EPP plugin today): the same score, where an adapter also counts as
  active on a pod that holds it in a device slot, as a load-state scorer could read from the
  residency gauge proposed to vLLM (`vllm:lora_adapter_loaded{level="gpu"}`, in loramux's metrics contract).

What it deliberately does not know: costs, time beyond "now", how a replica runs its requests.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from bench.clustersim.state import RESIDENT, RUNS, WAITS, FleetState

POLICIES = ("random", "least-loaded", "ray", "llm-d")
EXTRA_POLICIES = ("llm-d-resident",)


@dataclass(frozen=True)
class PolicySpec:
    """A policy and its knobs (each policy reads only its own)."""

    name: str
    ray_max_ongoing: int = 32  # Ray: max_ongoing_requests per replica (spill-over threshold)
    llmd_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # queue, kv-cache, lora-affinity
    scrape_s: float = 0.05  # llm-d: metrics refresh interval (0 = always current)

    def __post_init__(self) -> None:
        if self.name not in POLICIES + EXTRA_POLICIES:
            raise ValueError(f"policy {self.name!r} is not one of {', '.join(POLICIES + EXTRA_POLICIES)}")
        if self.ray_max_ongoing < 1 or self.scrape_s < 0 or min(self.llmd_weights) < 0:
            raise ValueError("policy: ray_max_ongoing >= 1, scrape_s >= 0 and weights >= 0")


class Router:
    """Base: `route` returns a replica, or None to hold the request at the router (`pending`)."""

    def __init__(self, state: FleetState, rng: random.Random) -> None:
        self.state = state
        self.rng = rng
        self.pending: deque[tuple[int, int]] = deque()  # (request, adapter) held at the router

    def route(self, adapter: int, now: float) -> int | None:
        raise NotImplementedError

    def sent(self, replica: int, adapter: int) -> None:
        """A request for `adapter` went to `replica`."""

    def take_pending(self, replica: int) -> tuple[int, int] | None:
        """A held request for `replica`, which has just finished one (None: none it may take)."""
        return None

    def _pick(self, candidates: np.ndarray) -> int:
        return int(candidates[self.rng.randrange(len(candidates))])


class RandomRouter(Router):
    def route(self, adapter: int, now: float) -> int | None:
        return self.rng.randrange(self.state.replicas)


class LeastLoadedRouter(Router):
    def route(self, adapter: int, now: float) -> int | None:
        ongoing = self.state.ongoing
        return self._pick(np.flatnonzero(ongoing == ongoing.min()))


class RayRouter(Router):
    def __init__(self, state: FleetState, rng: random.Random, slots: int, max_ongoing: int) -> None:
        super().__init__(state, rng)
        self.slots = slots
        self.max_ongoing = max_ongoing
        self.models: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(state.replicas)]
        self.holders: dict[int, set[int]] = {}  # model id -> replicas that hold it
        self.num_models = np.zeros(state.replicas, dtype=np.int64)
        self.everyone = tuple(range(state.replicas))

    def route(self, adapter: int, now: float) -> int | None:
        holders = self.holders.get(adapter)
        if holders:
            chosen = self._power_of_two(tuple(holders))
            if chosen is not None:
                return chosen
        fewest = np.flatnonzero(self.num_models == self.num_models.min())
        chosen = self._power_of_two(tuple(fewest.tolist()))
        if chosen is None and len(fewest) < self.state.replicas:
            chosen = self._power_of_two(self.everyone)
        return chosen

    def _power_of_two(self, candidates: tuple[int, ...]) -> int | None:
        if len(candidates) == 1:
            drawn: tuple[int, ...] = candidates
        else:
            first = self.rng.randrange(len(candidates))
            second = self.rng.randrange(len(candidates) - 1)
            second += second >= first
            drawn = (candidates[first], candidates[second])
        ongoing = self.state.ongoing
        accepting = [r for r in drawn if ongoing[r] < self.max_ongoing]
        return min(accepting, key=ongoing.__getitem__) if accepting else None

    def sent(self, replica: int, adapter: int) -> None:
        models = self.models[replica]
        if adapter in models:
            models.move_to_end(adapter)
            return
        models[adapter] = None
        self.holders.setdefault(adapter, set()).add(replica)
        self.num_models[replica] += 1
        if len(models) > self.slots:  # @serve.multiplexed's LRU unloads the oldest
            old, _ = models.popitem(last=False)
            self.holders[old].discard(replica)
            self.num_models[replica] -= 1

    def take_pending(self, replica: int) -> tuple[int, int] | None:
        if not self.pending or self.state.ongoing[replica] >= self.max_ongoing:
            return None
        models = self.models[replica]
        for position, (request, adapter) in enumerate(self.pending):
            if adapter in models:
                del self.pending[position]
                return request, adapter
        return self.pending.popleft()


class LlmdRouter(Router):
    def __init__(
        self, state: FleetState, rng: random.Random, pod_limits: tuple[int, int], spec: PolicySpec
    ) -> None:
        super().__init__(state, rng)
        self.max_lora, self.max_running = pod_limits
        self.weights = spec.llmd_weights
        self.scrape_s = spec.scrape_s
        self.next_scrape_s = -1.0
        # The scraped copy: per adapter, the pods it runs / waits on; per pod, the base score.
        self.runs: dict[int, set[int]] = {}
        self.waits: dict[int, set[int]] = {}
        self.resident: dict[int, set[int]] = {}
        self.use_residency = spec.name == "llm-d-resident"
        self.base = np.zeros(state.replicas)
        self.base_without_lora = np.zeros(state.replicas)
        self.has_room = np.ones(state.replicas, dtype=bool)

    def route(self, adapter: int, now: float) -> int | None:
        if now >= self.next_scrape_s:
            self._scrape(now)
        w_lora = self.weights[2]
        score = self.base.copy()  # the lora score in it: 0.8 with room, else 0
        waiting = self.waits.get(adapter)
        if waiting:
            pods = np.fromiter(waiting, dtype=np.int64, count=len(waiting))
            score[pods[~self.has_room[pods]]] += w_lora * 0.6
        active = self.runs.get(adapter, set())
        if self.use_residency:
            active = active | self.resident.get(adapter, set())
        if active:
            pods = np.fromiter(active, dtype=np.int64, count=len(active))
            score[pods] = self.base_without_lora[pods] + w_lora * 1.0
        return self._pick(np.flatnonzero(score >= score.max() - 1e-9))

    def _scrape(self, now: float) -> None:
        state = self.state
        changes = state.changes
        assert changes is not None, "the llm-d router needs FleetState(keep_changes=True)"
        copies = {RUNS: self.runs, WAITS: self.waits, RESIDENT: self.resident}
        for index, adapter, pod, added in changes:
            where = copies[index]
            if added:
                where.setdefault(adapter, set()).add(pod)
            else:
                where[adapter].discard(pod)
                if not where[adapter]:
                    del where[adapter]
        changes.clear()
        w_queue, w_kv, w_lora = self.weights
        waiting = state.waiting
        low, high = waiting.min(), waiting.max()
        queue = np.ones(state.replicas) if high == low else (high - waiting) / (high - low)
        kv = 1.0 - state.running / self.max_running
        self.has_room = state.num_lora < self.max_lora
        self.base_without_lora = w_queue * queue + w_kv * kv
        self.base = self.base_without_lora + w_lora * 0.8 * self.has_room
        # Scrapes run on a fixed tick: this copy serves every request until the next one.
        self.next_scrape_s = (np.floor(now / self.scrape_s) + 1) * self.scrape_s if self.scrape_s else now


def make_router(spec: PolicySpec, state: FleetState, slots: int, max_running: int, seed: int) -> Router:
    rng = random.Random(seed)
    if spec.name == "random":
        return RandomRouter(state, rng)
    if spec.name == "least-loaded":
        return LeastLoadedRouter(state, rng)
    if spec.name == "ray":
        return RayRouter(state, rng, slots, spec.ray_max_ongoing)
    return LlmdRouter(state, rng, (slots, max_running), spec)
