"""The router: `auto` requests get the adapter(s) that fit their prompt (router.py has the whole story)."""

from server.router.router import (
    AdapterSource,
    Candidate,
    ReconcileReport,
    RouteDecision,
    Router,
    RouterConfig,
)

__all__ = ["AdapterSource", "Candidate", "ReconcileReport", "RouteDecision", "Router", "RouterConfig"]
