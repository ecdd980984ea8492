"""Send a plan to the server: open loop at the planned times, or a closed loop of N clients.

Open loop: each request goes out at its planned time whatever is still in flight, and its
latencies count from that planned time; when the client itself falls behind (the event loop is
busy), the lateness is recorded rather than hidden (no coordinated omission). If more than
`max_in_flight` requests are unanswered the server is over-saturated: sending stops and the run
says `saturated` (the sweep stops there too).

Closed loop: `concurrency` clients each send their next request as soon as their previous one is
answered; a request's planned time is when it was sent.

The server's /metrics is scraped for the run's length when a scraper factory is given (it gets
the run's start as a monotonic time, so the series share the records' clock).

A run is bounded by the plan's length and by `duration_s` (no request is sent after it; those in
flight are waited for, each up to the clients' own timeout). A progress bar (tqdm) counts answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from bench.loadtest.clients import Client, RunClock
from bench.loadtest.records import CANARY, ERR_OTHER, PlannedRequest, RequestRecord


class Scraper(Protocol):
    """What the runner needs from scrape.Scraper: polling for the run's length."""

    failures: int

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def result(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RunOptions:
    concurrency: int | None = (
        None  # closed loop with this many clients; None = open loop at the planned times
    )
    duration_s: float | None = None  # send nothing after this many seconds
    max_in_flight: int = 4096  # more unanswered requests than this: over-saturated, stop sending
    progress: bool = True
    label: str = "load"


@dataclass
class RunResult:
    records: list[RequestRecord]
    saturated: bool = False
    not_sent: int = 0  # planned requests left unsent (duration bound or saturation)
    server_metrics: dict[str, Any] = field(default_factory=lambda: {"t_s": [], "series": {}})


async def run_plan(
    client: Client,
    plan: list[PlannedRequest],
    options: RunOptions,
    clock: RunClock,
    make_scraper: Callable[[float], Scraper] | None = None,
) -> RunResult:
    """Send `plan` (see the module docstring); the records in plan order."""
    bar = tqdm(total=len(plan), desc=options.label, unit="req", disable=not options.progress, leave=False)
    result = RunResult(records=[])
    clock.restart()
    scraper = make_scraper(clock.start_s) if make_scraper is not None else None
    if scraper is not None:
        scraper.start()
    try:
        if options.concurrency is None:
            await _open_loop(client, plan, options, clock, result, bar)
        else:
            await _closed_loop(client, plan, options, clock, result, bar)
    finally:
        bar.close()
        if scraper is not None:
            await scraper.stop()
            result.server_metrics = {**scraper.result(), "failures": scraper.failures}
    result.records.sort(key=lambda r: r.index)
    return result


def _record(planned: PlannedRequest, planned_s: float) -> RequestRecord:
    return RequestRecord(
        index=planned.index,
        adapter=planned.adapter,
        kind=planned.kind,
        planned_s=planned_s,
        sent_s=planned_s,
        prompt_tokens=len(planned.prompt_token_ids),
        max_tokens=planned.max_tokens,
    )


def _sender(
    client: Client, clock: RunClock, bar: Any
) -> Callable[[PlannedRequest, RequestRecord], Awaitable[None]]:
    async def send(planned: PlannedRequest, record: RequestRecord) -> None:
        record.sent_s = clock()
        try:
            await client.send(planned, record, greedy=planned.kind == CANARY)
        except Exception as exc:  # one request's surprise must not end the run: it is that request's error
            record.error, record.error_detail = ERR_OTHER, f"{type(exc).__name__}: {exc}"[:200]
            record.end_s = clock()
        finally:
            bar.update(1)

    return send


async def _open_loop(
    client: Client,
    plan: list[PlannedRequest],
    options: RunOptions,
    clock: RunClock,
    result: RunResult,
    bar: Any,
) -> None:
    send = _sender(client, clock, bar)
    in_flight: set[asyncio.Task[None]] = set()
    for position, planned in enumerate(plan):
        assert planned.at_s is not None, "an open-loop plan has a time for every request"
        if options.duration_s is not None and planned.at_s > options.duration_s:
            result.not_sent = len(plan) - position
            break
        delay = planned.at_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= options.max_in_flight:
            result.saturated = True
            result.not_sent = len(plan) - position
            break
        record = _record(planned, planned.at_s)
        result.records.append(record)
        task = asyncio.create_task(send(planned, record))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)


async def _closed_loop(
    client: Client,
    plan: list[PlannedRequest],
    options: RunOptions,
    clock: RunClock,
    result: RunResult,
    bar: Any,
) -> None:
    send = _sender(client, clock, bar)
    queue = iter(plan)

    async def worker() -> None:
        for planned in queue:  # one shared iterator: each request goes to exactly one worker
            now = clock()
            if options.duration_s is not None and now > options.duration_s:
                return
            record = _record(planned, now)
            result.records.append(record)
            await send(planned, record)

    assert options.concurrency is not None and options.concurrency > 0
    await asyncio.gather(*(worker() for _ in range(options.concurrency)))
    result.not_sent = len(plan) - len(result.records)
