"""What the router answers: the candidates, best first, and whether `auto` falls back to the base model.

Plain frozen dataclasses that import nothing of the server, so the engine's request contract
(server.engine.request) can carry a decision without depending on the router.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SHARE = 0.01  # of a mixture: candidates with less are left out


@dataclass(frozen=True)
class Candidate:
    adapter: str
    score: float  # calibrated, in [0, 1]
    by: str  # "examples" | "weights"


@dataclass(frozen=True)
class RouteDecision:
    candidates: tuple[Candidate, ...]  # every routable adapter, best first
    fallback: bool  # True: `auto` runs on the base model
    reason: str  # why it falls back: "" | "no routable adapter" | "below threshold" | "out of domain"
    seconds: float  # time spent routing

    def mixture(self, top_k: int) -> tuple[tuple[str, float], ...]:
        """The (adapter, weight) pairs `auto` serves: () for the base model, else the top_k candidates
        with their scores renormalized to sum to 1, leaving out those under MIN_SHARE of the top_k's
        total (a device slot and a pass of the kernels for a term that changes nothing)."""
        if self.fallback:
            return ()
        top = self.candidates[:top_k]
        total = sum(c.score for c in top)
        kept = [c for i, c in enumerate(top) if i == 0 or c.score >= MIN_SHARE * total]
        total = sum(c.score for c in kept)
        return tuple((c.adapter, c.score / total) for c in kept)
