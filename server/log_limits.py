"""Rate-limit repeated log lines, so that a flood of one event cannot fill the disk.

`RepeatFilter` (a `logging.Filter` for handlers) lets the first `burst` records of one message
template (logger, level and the unformatted `msg`, so "closed %s" counts as one whatever its
arguments) through per `interval_s`, and drops the rest. The first record of that template
after the interval carries "[suppressed K similar lines in the last N s]", so nothing is
dropped silently. It remembers at most `max_templates` templates (the oldest are forgotten).

`install(handler)` adds one to a handler (`configure_logging` does, for the root handlers).
This module knows nothing about what is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

BURST = 10
INTERVAL_S = 60.0
MAX_TEMPLATES = 1024


@dataclass
class _Window:
    started: float
    passed: int = 0
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    def __init__(
        self,
        burst: int = BURST,
        interval_s: float = INTERVAL_S,
        max_templates: int = MAX_TEMPLATES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.max_templates = max_templates
        self._clock = clock
        self._windows: OrderedDict[tuple[str, int, str], _Window] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.started >= self.interval_s:
                suppressed = window.suppressed if window is not None else 0
                self._windows[key] = window = _Window(started=now)
                self._windows.move_to_end(key)
                while len(self._windows) > self.max_templates:
                    self._windows.popitem(last=False)
                if suppressed:
                    _append(
                        record, f"[suppressed {suppressed} similar lines in the last {self.interval_s:g} s]"
                    )
            if window.passed < self.burst:
                window.passed += 1
                if window.passed == self.burst:
                    _append(record, f"[more like this in the next {self.interval_s:g} s are suppressed]")
                return True
            window.suppressed += 1
            return False


def _append(record: logging.LogRecord, note: str) -> None:
    """Add `note` to the record's message (formatted now, so its arguments stay intact)."""
    record.msg = f"{record.getMessage()} {note}"
    record.args = None


def install(handler: logging.Handler) -> RepeatFilter:
    """Add a RepeatFilter with the default limits to `handler` (once) and return it."""
    for existing in handler.filters:
        if isinstance(existing, RepeatFilter):
            return existing
    repeat = RepeatFilter()
    handler.addFilter(repeat)
    return repeat
