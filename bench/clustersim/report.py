"""The sweep's rows as a markdown table, a fleet-sizing summary and a plot (matplotlib, Agg).

A row is a flat dict: the configuration (`slots`, `replicas`, `policy`, `rate_rps`) and the
`Summary` fields. This module knows nothing of how the rows were made.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    ("slots", "S", "{:d}"),
    ("replicas", "R", "{:d}"),
    ("policy", "policy", "{}"),
    ("slot_hit_rate", "slot hit", "{:.3f}"),
    ("host_rate", "host", "{:.3f}"),
    ("disk_rate", "disk", "{:.3f}"),
    ("disk_loads_per_s", "disk loads/s", "{:.2f}"),
    ("device_loads_per_s", "slot loads/s", "{:.2f}"),
    ("offered_rps", "offered req/s", "{:.1f}"),
    ("throughput_rps", "done req/s", "{:.1f}"),
    ("output_tok_s", "tok/s", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("mean_batch", "batch", "{:.1f}"),
)


def markdown_header() -> str:
    titles = [title for _, title, _ in COLUMNS]
    aligns = ["---" if key == "policy" else "---:" for key, _, _ in COLUMNS]
    return "| " + " | ".join(titles) + " |\n| " + " | ".join(aligns) + " |"


def markdown_row(row: dict[str, Any]) -> str:
    return "| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |"


def sizing(rows: Sequence[dict[str, Any]], target: float) -> list[str]:
    """Per policy: for each replica count, the fewest slots (of those swept) that reach `target`
    slot hit rate; and per slot count, the fewest replicas that do."""
    lines = []
    for policy in dict.fromkeys(row["policy"] for row in rows):
        mine = [row for row in rows if row["policy"] == policy]
        by_replicas = []
        for replicas in sorted({row["replicas"] for row in mine}):
            met = [r["slots"] for r in mine if r["replicas"] == replicas and r["slot_hit_rate"] >= target]
            by_replicas.append(f"R={replicas}: S>={min(met)}" if met else f"R={replicas}: none swept")
        by_slots = []
        for slots in sorted({row["slots"] for row in mine}):
            met = [r["replicas"] for r in mine if r["slots"] == slots and r["slot_hit_rate"] >= target]
            by_slots.append(f"S={slots}: R>={min(met)}" if met else f"S={slots}: none swept")
        lines.append(f"- {policy}: " + ", ".join(by_replicas) + "; " + ", ".join(by_slots))
    return lines


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("slot_hit_rate", "slot hit rate", False),
        ("device_loads_per_s", "slot loads / s per replica", True),
        ("ttft_p99_s", "TTFT p99 (s)", True),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    slot_counts = sorted({row["slots"] for row in rows})
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (key, label, log) in zip(axes, panels, strict=True):
        for p, policy in enumerate(policies):
            for s, slots in enumerate(slot_counts):
                mine = sorted(
                    (r for r in rows if r["policy"] == policy and r["slots"] == slots),
                    key=lambda r: r["replicas"],
                )
                xs = [r["replicas"] for r in mine]
                ys = [r[key] / (r["replicas"] if key == "device_loads_per_s" else 1) for r in mine]
                axis.plot(
                    xs,
                    ys,
                    styles[s % len(styles)],
                    color=colors[p % len(colors)],
                    marker="o",
                    ms=3,
                    label=f"{policy}, S={slots}",
                )
        axis.set_xscale("log", base=2)
        if log:
            axis.set_yscale("log")
        axis.set_xlabel("replicas")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
