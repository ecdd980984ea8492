"""PEFT's module-name matching (peft 0.21), run on RE2 so that no pattern can stall the process.

A PEFT config may hold regular expressions: `target_modules` / `exclude_modules` as a string
(full match), `rank_pattern` / `alpha_pattern` keys (a dot-bounded suffix match) and
`layers_pattern` (the name before the layer number). Python's `re` backtracks, holding the GIL,
so one crafted pattern froze every thread for seconds to hours. Here every user pattern is
compiled once by RE2 (google-re2), which matches in time linear in the name, with a bounded
pattern size and compile memory; patterns RE2 cannot run (backreferences, lookaround) are
refused by field. On the patterns PEFT's configs use (names, `.*`, classes, groups,
alternation) RE2 and `re` agree; module names are ASCII, where `\\d`, `\\w` and `$` mean the
same in both. This module knows names and patterns, not configs or files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import re2

from adapters_store.errors import AdapterError, shown
from adapters_store.limits import MAX_PATTERN_CHARS, MAX_PATTERN_MEMORY

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is the user's error, reported to them, not logged by RE2
_OPTIONS.max_mem = MAX_PATTERN_MEMORY

Regex = Any  # re2's compiled pattern (the package ships no type information)


def compile_pattern(pattern: str, field: str, source: str) -> Regex:
    """RE2's compiled `pattern`; AdapterError naming `field` (and `source`) when it is refused."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(
            f"{source}: {field} {shown(pattern)} is longer than {MAX_PATTERN_CHARS} characters; "
            "name the modules or use a shorter regular expression"
        )
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raise AdapterError(
            f"{source}: {field} {shown(pattern)} is not a regular expression loramux can run "
            f"({_reason(exc)}); loramux matches patterns in linear time (RE2 syntax), so backreferences "
            "and lookaround are refused: rewrite it without them or list the module names"
        ) from None


def fullmatches(regex: Regex, name: str) -> bool:
    """`re.fullmatch(pattern, name)` as PEFT calls it for a string target_modules / exclude_modules."""
    return regex.fullmatch(name) is not None


def suffix_pattern(pattern: str, field: str, source: str) -> Regex:
    """PEFT's get_pattern_key test for one key: `re.match(rf"(.*\\.)?({pattern})$", name)`."""
    compile_pattern(pattern, field, source)  # refuses the pattern as the user wrote it, by field
    return compile_pattern(rf"(.*\.)?({pattern})$", field, source)


def first_matching(patterns: Sequence[tuple[str, Regex]], name: str) -> str | None:
    """The first key whose suffix pattern matches `name` (PEFT's get_pattern_key), or None."""
    for key, regex in patterns:
        if regex.match(name) is not None:
            return key
    return None


def layer_patterns(layers_pattern: Sequence[str] | None, source: str) -> tuple[Regex, ...]:
    """PEFT's layer-index patterns: the first numbered segment, or the number after a layers_pattern."""
    if not layers_pattern:
        return (re2.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.", _OPTIONS),)
    for pattern in layers_pattern:
        compile_pattern(pattern, "layers_pattern", source)
    return tuple(
        compile_pattern(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", "layers_pattern", source)
        for pattern in layers_pattern
    )


def layer_index(regexes: Sequence[Regex], name: str) -> int | None:
    """The layer number in `name` (one of the base model's own names) by the first regex that matches."""
    for regex in regexes:
        match = regex.match(name)
        if match is not None:
            digits = match.group("idx")  # None when a '|' in the pattern matched without it (as in PEFT)
            return int(digits) if digits is not None else None
    return None


def _reason(exc: Exception) -> str:
    reason = exc.args[0] if exc.args else exc
    text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    return text[:200]
