"""What the router holds, as one value: the selector, the prototypes, and what each adapter was learned from.

`route` reads the current `Tables`; learning copies them, changes the copy and publishes it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.router.prototypes import AdapterPrototypes
from server.router.selector import Selector


@dataclass(frozen=True)
class Known:
    """What the router holds about one adapter."""

    examples_digest: str = ""  # of its examples.jsonl when learned ("" = none)
    runtime_prompts: tuple[str, ...] = ()  # examples registered at run time (kept to relearn)
    checksum: str = ""  # of the weights its prototypes come from ("" = none)


@dataclass
class Tables:
    """Everything `route` reads; replaced as a whole (never mutated while published)."""

    selector: Selector
    prototypes: dict[str, AdapterPrototypes] = field(default_factory=dict)
    known: dict[str, Known] = field(default_factory=dict)

    def copy(self) -> Tables:
        return Tables(self.selector.copy(), dict(self.prototypes), dict(self.known))
