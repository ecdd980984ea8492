"""Rows of the attack probe's report, the checks shared by its groups, and the markdown they print as.

A `Row` is one attack: what was sent, what a careful server answers, what this one answered, how
long it took, whether the server still served meanwhile (gRPC health, /health, a normal
completion) and a PASS/FAIL verdict. This module knows nothing about servers or attacks.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

MAX_MESSAGE_CHARS = 1000
# An absolute filesystem path of two or more components, as a leaked server path would look.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)+[\w.+-]*")


@dataclass
class Row:
    group: str
    attack: str
    expected: str
    got: str
    seconds: float
    meanwhile: str
    verdict: str  # PASS | FAIL | INFO
    notes: str = ""


def absolute_paths(text: str, known: tuple[str, ...] = ()) -> list[str]:
    """Absolute paths in `text`: the known server paths, and anything that looks like one."""
    found = [path for path in known if path and path in text]
    # A path-looking match counts when its first component is a directory here (so a gRPC method
    # name such as /loramux.v1.Inference/Generate does not).
    found += [
        m for m in _ABSOLUTE_PATH.findall(text) if m.count("/") >= 2 and os.path.isdir("/" + m.split("/")[1])
    ]
    return sorted(set(found))


def message_problems(message: str, known: tuple[str, ...] = ()) -> list[str]:
    """Why an error message is not clear and safe: empty, unbounded, or naming server paths."""
    problems = []
    if not message.strip():
        problems.append("empty message")
    if len(message) > MAX_MESSAGE_CHARS:
        problems.append(f"message of {len(message):,} chars")
    leaked = absolute_paths(message, known)
    if leaked:
        problems.append(f"reveals path {leaked[0][:80]}")
    return problems


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _cell(text: Any) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def markdown(rows: list[Row], title: str, preamble: list[str]) -> str:
    lines = [f"# {title}", "", *preamble, ""]
    groups = list(dict.fromkeys(row.group for row in rows))
    lines += ["## Summary", "", "| group | PASS | FAIL | INFO |", "|---|---:|---:|---:|"]
    for group in groups:
        mine = [row.verdict for row in rows if row.group == group]
        lines.append(f"| {group} | {mine.count('PASS')} | {mine.count('FAIL')} | {mine.count('INFO')} |")
    for group in groups:
        lines += ["", f"## {group}", "", "| attack | expected | got | time (s) | served meanwhile | verdict | notes |",
                  "|---|---|---|---:|---|---|---|"]  # fmt: skip
        for row in rows:
            if row.group == group:
                cells = [
                    row.attack,
                    row.expected,
                    row.got,
                    f"{row.seconds:.2f}",
                    row.meanwhile,
                    row.verdict,
                    row.notes,
                ]
                lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]
