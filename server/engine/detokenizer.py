"""Incremental detokenization and stop strings for streaming.

Text is released only when it is final: a token that ends in an incomplete UTF-8 sequence
(rendered as U+FFFD) waits for the next one, and text that could still become a stop string
is held back until it cannot.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # A few prompt tokens give the first output tokens their left context (leading spaces).
        self._context = list(prompt_ids[-4:])
        self._prefix_offset = 0
        self._read_offset = len(self._context)
        self._stop = stop
        self.text = ""  # all final text so far
        self._emitted = 0  # characters of self.text already released
        self.stopped = False

    def add(self, token_id: int, check_stop: bool = True) -> None:
        """Append one generated token; sets `stopped` if a stop string appeared (text cut before it).
        `check_stop=False` (before min_tokens) looks for none in the new text."""
        all_ids = self._context + self._ids + [token_id]
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(all_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(all_ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return
        before = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(all_ids)
        if self._stop and check_stop:
            self._check_stop(before)

    def _check_stop(self, before: int) -> None:
        longest = max(len(s) for s in self._stop)
        search_from = max(0, before - longest + 1)
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """The text not released yet, minus a tail that may still grow into a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        new = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return new

    def _held_back(self) -> int:
        for length in range(min(len(self.text), max((len(s) for s in self._stop), default=0)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
