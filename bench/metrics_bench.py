"""`loramux bench metrics`: what a /metrics scrape costs as adapter labels grow, capped and not.

For each count of distinct adapter labels (`--labels`), two requests per label are recorded into
a fresh `Metrics` with no cap (every label its own series) and one with `--cap` (the server's
`--metrics-max-adapters`; later labels go to `<other>`), side by side; then each is scraped
`--repeats` times: the exposition's bytes, lines, and the median seconds of one scrape (pure
Python, under the GIL: the engine's Python waits that long). No engine, no server; seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from server.engine.events import FinishedRequest
from server.metrics import MAX_ADAPTER_LABELS, Metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", default="10,100,1000,5000", help="(default: %(default)s)")
    parser.add_argument("--cap", type=int, default=MAX_ADAPTER_LABELS, help="(default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="scrapes timed per case (default: %(default)s)"
    )
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")


def scrape_cost(labels: int, cap: int | None, repeats: int) -> dict[str, float | int | str]:
    """Bytes, lines and median scrape seconds after two finished requests for each of `labels` adapters."""
    # No cap: room for every label.
    metrics = Metrics(process_metrics=False, max_adapter_labels=labels if cap is None else cap)
    for i in range(labels):
        for _ in range(2):
            metrics.request_finished(
                FinishedRequest(f"adapter-{i:05d}", "stop", 64, 32, 0.0, 0.05, 1.0, "device")
            )
    seconds, body = [], b""
    for _ in range(repeats):
        start = time.perf_counter()
        body = metrics.exposition()
        seconds.append(time.perf_counter() - start)
    return {
        "labels": labels,
        "cap": "none" if cap is None else cap,
        "bytes": len(body),
        "lines": body.count(b"\n"),
        "scrape_s": round(statistics.median(seconds), 4),
    }


def main(args: argparse.Namespace) -> int:
    rows = []
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| adapter labels | cap | bytes | lines | one scrape |")
    print("|---:|---:|---:|---:|---:|")
    for labels in (int(n) for n in args.labels.split(",") if n):
        for cap in (None, args.cap):
            row = scrape_cost(labels, cap, args.repeats)
            rows.append(row)
            print(
                f"| {labels:,} | {row['cap']} | {row['bytes']:,} | {row['lines']:,} | "
                f"{float(row['scrape_s']) * 1e3:.1f} ms |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
