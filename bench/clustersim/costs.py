"""What one replica's work costs in seconds: the measured figures the simulation runs on.

    step time (b sequences in the step, d distinct adapters among the running ones, p prompt
    tokens prefilled, f adapters copied into device slots at admission)
        = decode(b, d) + p * prefill_per_token_s + f * host_to_device_s
    decode(b, d) = same(b) + (distinct(b) - same(b)) * (d - 1) / (b - 1)

`same(b)` and `distinct(b)` are decode steps measured at a few batch sizes with every sequence on
one adapter and with every sequence on its own adapter; between measured sizes they are
interpolated linearly (and extrapolated from the last two past either end). A cold adapter costs
`disk_to_host_s` on a loader thread (read, validate, upcast, make device-ready), a warm one
`host_hit_s` there (every request goes through the loader, as in loramux); neither stalls the
running batch, only the copy into a device slot does.

`bench/cluster_costs.json` holds this machine's figures; `measure.py` regenerates them. The file
also keeps how and where they were measured (free-form `about`). This module knows no engine and
no event queue.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COSTS_PATH = Path(__file__).resolve().parent.parent / "cluster_costs.json"


@dataclass(frozen=True)
class Costs:
    batch_sizes: tuple[int, ...]  # increasing, >= 1
    same_adapter_s: tuple[float, ...]  # decode step, every sequence on one adapter
    distinct_adapters_s: tuple[float, ...]  # decode step, every sequence on its own adapter
    prefill_per_token_s: float
    disk_to_host_s: float
    host_hit_s: float
    host_to_device_s: float
    adapter_host_bytes: int  # one adapter in the host tier (sizes a host tier given in MiB)
    about: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        sizes = self.batch_sizes
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"costs: batch_sizes {sizes} must be increasing integers >= 1")
        if not len(self.same_adapter_s) == len(self.distinct_adapters_s) == len(sizes):
            raise ValueError("costs: one same_adapter_s and one distinct_adapters_s per batch size")
        figures = (*self.same_adapter_s, *self.distinct_adapters_s, self.prefill_per_token_s)
        loads = (self.disk_to_host_s, self.host_hit_s, self.host_to_device_s)
        if any(not value >= 0 for value in (*figures, *loads)):
            raise ValueError("costs: every time must be a number >= 0 (seconds)")
        if self.adapter_host_bytes < 1:
            raise ValueError("costs: adapter_host_bytes must be >= 1")

    def decode_s(self, batch: int, distinct: int) -> float:
        """One step's time for `batch` sequences with `distinct` adapters among them (no prefill)."""
        same = _interpolate(self.batch_sizes, self.same_adapter_s, batch)
        if batch <= 1 or distinct <= 1:
            return same
        spread = _interpolate(self.batch_sizes, self.distinct_adapters_s, batch) - same
        return same + spread * (min(distinct, batch) - 1) / (batch - 1)

    def step_table(self, max_batch: int) -> tuple[tuple[float, ...], ...]:
        """decode_s as a table: table[b][d] for 0 <= d <= b <= max_batch (b = 0: an empty step, 0 s).
        Built once per (costs, max_batch): every replica of a fleet reads the same one."""
        return _step_table(self, max_batch)

    def full_batch_s(self, batch: int, distinct: float, prompt_tokens: float, max_tokens: float) -> float:
        """Seconds for a replica to run `batch` requests start to end at a full batch: max_tokens
        decode steps plus every prompt's prefill (no cold loads)."""
        low, high = int(distinct), min(batch, int(distinct) + 1)
        weight = distinct - low
        decode = (1 - weight) * self.decode_s(batch, max(low, 1)) + weight * self.decode_s(batch, high)
        return max_tokens * decode + batch * prompt_tokens * self.prefill_per_token_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("batch_sizes", "same_adapter_s", "distinct_adapters_s"):
            data[key] = list(data[key])
        return data


def costs_from_json(data: dict[str, Any]) -> Costs:
    try:
        return Costs(
            batch_sizes=tuple(int(b) for b in data["batch_sizes"]),
            same_adapter_s=tuple(float(s) for s in data["same_adapter_s"]),
            distinct_adapters_s=tuple(float(s) for s in data["distinct_adapters_s"]),
            prefill_per_token_s=float(data["prefill_per_token_s"]),
            disk_to_host_s=float(data["disk_to_host_s"]),
            host_hit_s=float(data["host_hit_s"]),
            host_to_device_s=float(data["host_to_device_s"]),
            adapter_host_bytes=int(data["adapter_host_bytes"]),
            about=dict(data.get("about", {})),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"costs: not a costs file ({error!r}); regenerate it with --measure") from None


def read_costs(path: Path = COSTS_PATH) -> Costs:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the costs {path}: {error}; regenerate them with --measure") from None
    return costs_from_json(data)


def write_costs(costs: Costs, path: Path = COSTS_PATH) -> None:
    path.write_text(json.dumps(costs.to_json(), indent=2) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _step_table(costs: Costs, max_batch: int) -> tuple[tuple[float, ...], ...]:
    rows: list[tuple[float, ...]] = [(0.0,)]
    for batch in range(1, max_batch + 1):
        rows.append(tuple(max(0.0, costs.decode_s(batch, distinct)) for distinct in range(batch + 1)))
    return tuple(rows)


def _interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended past either end along the nearest segment."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]  # one point: proportional to the batch
    for i in range(1, len(xs) - 1):
        if x <= xs[i]:
            break
    else:
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
