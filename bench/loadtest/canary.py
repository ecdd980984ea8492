"""Canaries: is each adapter's answer still its own under load?

Before the load, each canary adapter's greedy answer to `CANARY_PROMPT` is recorded with nothing
else running. Canary requests (the same prompt, greedy) are then mixed into the load, each next to
a load request for the same adapter, so it shares batches with the traffic. An answer that differs
from the one recorded is an error of its own kind (records.ERR_CANARY): tokens served with another
adapter's weights, or a stale slot, is the worst bug a multi-adapter server can have.

The answers can be saved (`--canary-save`) and checked on a later run or another server
(`--canary-load`): a server started with two adapters' directories swapped answers each canary
with the other adapter's tokens.

Greedy decoding is compared token for token (gRPC) or text for text (HTTP, which returns no ids).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from bench.loadtest.clients import Client
from bench.loadtest.records import CANARY, ERR_CANARY, PlannedRequest, RequestRecord

CANARY_PROMPT = "Here is a short story about a lighthouse keeper and a storm:"


@dataclass(frozen=True)
class Expected:
    adapter: str
    token_ids: tuple[int, ...]
    text: str

    def differs(self, record: RequestRecord) -> str | None:
        """Why `record` is not this answer (None when it is the same)."""
        if self.token_ids and record.token_ids:
            got = tuple(record.token_ids)
            if got == self.token_ids:
                return None
            at = next((i for i, (a, b) in enumerate(zip(self.token_ids, got, strict=False)) if a != b), None)
            at = min(len(got), len(self.token_ids)) if at is None else at
            return f"token {at} differs: expected {list(self.token_ids[: at + 3])}..., got {list(got[: at + 3])}..."
        if record.text == self.text:
            return None
        return f"expected {self.text[:80]!r}, got {record.text[:80]!r}"


def save(expected: dict[str, Expected], max_tokens: int, path: Path) -> None:
    """Write the recorded answers (JSON), for `load` against another server or a later run."""
    rows = {name: {"token_ids": list(e.token_ids), "text": e.text} for name, e in sorted(expected.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"prompt": CANARY_PROMPT, "max_tokens": max_tokens, "answers": rows}
    path.write_text(json.dumps(body, indent=1) + "\n")


def load(path: Path) -> tuple[dict[str, Expected], int]:
    """(answers, the max tokens they were generated with) as `save` wrote them; ValueError naming
    what is wrong with the file."""
    try:
        data = json.loads(path.read_text())
        if data.get("prompt") != CANARY_PROMPT:
            raise ValueError(f"{path}: recorded with another canary prompt")
        answers = {
            str(name): Expected(str(name), tuple(int(t) for t in row["token_ids"]), str(row["text"]))
            for name, row in data["answers"].items()
        }
        return answers, int(data["max_tokens"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a canary file written by --canary-save ({exc})") from None


def pick_adapters(plan: list[PlannedRequest], count: int) -> list[str]:
    """`count` adapters of the plan spread over its popularity ranks (most popular first, the
    rarely used -- the ones that go cold -- included)."""
    ranked = [name for name, _ in Counter(p.adapter for p in plan).most_common()]
    if count <= 0 or not ranked:
        return []
    if count >= len(ranked):
        return ranked
    step = (len(ranked) - 1) / max(count - 1, 1)
    return list(dict.fromkeys(ranked[round(i * step)] for i in range(count)))


async def record_expected(
    client: Client, adapters: list[str], max_tokens: int
) -> tuple[dict[str, Expected], list[RequestRecord]]:
    """Each adapter's greedy canary answer, one at a time with nothing else running; the records
    of canaries that failed (errors of the run; their adapters are left out of the check).
    Recording requests have negative indices."""
    expected: dict[str, Expected] = {}
    failed: list[RequestRecord] = []
    for i, adapter in enumerate(adapters):
        planned = canary_request(-1 - i, adapter, max_tokens, at_s=0.0)
        record = RequestRecord(
            index=planned.index,
            adapter=adapter,
            kind=CANARY,
            planned_s=0.0,
            sent_s=0.0,
            prompt_tokens=0,
            max_tokens=max_tokens,
        )
        await client.send(planned, record, greedy=True)
        if record.ok and (record.token_ids or record.text):
            expected[adapter] = Expected(adapter, tuple(record.token_ids), record.text)
        elif not record.ok:
            failed.append(record)
        # An answer with no text (EOS at once) checks nothing: that adapter goes without a canary.
    return expected, failed


def canary_request(index: int, adapter: str, max_tokens: int, at_s: float | None) -> PlannedRequest:
    return PlannedRequest(
        index=index,
        adapter=adapter,
        prompt_token_ids=(),
        max_tokens=max_tokens,
        at_s=at_s,
        kind=CANARY,
        prompt_text=CANARY_PROMPT,
    )


def mix_in(
    plan: list[PlannedRequest], expected: dict[str, Expected], every: int, max_tokens: int
) -> list[PlannedRequest]:
    """The plan with a canary beside every `every`-th load request whose adapter has a canary
    (sent at the same moment, same adapter); indices renumbered in order."""
    mixed: list[PlannedRequest] = []
    since = 0
    for planned in plan:
        mixed.append(planned)
        since += 1
        if every > 0 and since >= every and planned.adapter in expected:
            mixed.append(canary_request(0, planned.adapter, max_tokens, planned.at_s))
            since = 0
    return [replace(p, index=i) for i, p in enumerate(mixed)]


def check(records: list[RequestRecord], expected: dict[str, Expected]) -> int:
    """Mark answered canaries that differ from their adapter's recorded answer; returns how many."""
    mismatches = 0
    for record in records:
        if record.kind != CANARY or not record.ok or record.adapter not in expected:
            continue
        why = expected[record.adapter].differs(record)
        if why is not None:
            record.error, record.error_detail = ERR_CANARY, why
            mismatches += 1
    return mismatches
