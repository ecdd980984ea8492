"""PNG plots of load reports: one run, a rate sweep, a scaling study over adapter counts, two runs.

Each function takes report dicts (report.py's layout, as built or as read back from JSON) and an
output folder or path, writes small PNGs and returns the paths it wrote. A part a report lacks
(no tiers, no scraped metrics, percentiles None) leaves its panel blank or its figure out;
nothing here raises on it.

Latency distributions are drawn from `report["quantiles"][metric]` when a report carries it
(`[[percentile 0..100, seconds], ...]`: a CDF at any size of run), else from the summary's
p50/p90/p99/max, the upper half of the CDF.

Figures are matplotlib `Figure`s on the Agg canvas: no pyplot, so no global figure state, no
screen, and safe from any thread. Nothing here knows how a run was sent or scraped beyond the
series names scrape.py defines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.loadtest import scrape

Report = dict[str, Any]

DPI = 100
MAX_ADAPTER_BARS = 30  # per-adapter bars beyond this are unreadable: the busiest adapters are shown
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency"))
TIER_COLORS = {"device": "tab:green", "host": "tab:orange", "disk": "tab:red", "unknown": "tab:gray"}


# -- reading reports ---------------------------------------------------------------------------


def _num(value: Any) -> float:
    """A number to draw: None (or anything else not a finite number) -> NaN, which draws nothing."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _get(report: Report, *keys: str) -> Any:
    """report[k1][k2]..., None where any level is missing."""
    value: Any = report
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def distribution(report: Report, metric: str) -> list[tuple[float, float]]:
    """(seconds, fraction of requests at or below) points of `metric`'s CDF, ascending; [] if none."""
    quantiles = _get(report, "quantiles", metric)
    if quantiles:
        points = [(_num(seconds), _num(q) / 100.0) for q, seconds in quantiles]
    else:
        summary = _get(report, metric) or {}
        points = [
            (_num(summary.get(key)), q)
            for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        ]
    return sorted((x, p) for x, p in points if not (math.isnan(x) or math.isnan(p)))


def top_adapters(per_adapter: dict[str, Any], limit: int = MAX_ADAPTER_BARS) -> list[str]:
    """The `limit` adapters with the most requests, busiest first (ties by name)."""
    ranked = sorted(per_adapter, key=lambda name: (-_num(per_adapter[name].get("requests")), name))
    return ranked[:limit]


def counter_rates(t_s: Sequence[float], values: Sequence[float | None]) -> list[float]:
    """Per-second increase of a counter between consecutive scrapes, aligned with t_s (NaN where
    unknown: the first scrape, a missing value, a counter reset)."""
    rates = [math.nan] * len(t_s)
    for i in range(1, len(t_s)):
        before, after, dt = values[i - 1], values[i], t_s[i] - t_s[i - 1]
        if before is not None and after is not None and dt > 0 and after >= before:
            rates[i] = (after - before) / dt
    return rates


def mean_step_ms(
    t_s: Sequence[float], seconds: Sequence[float | None], steps: Sequence[float | None]
) -> list[float]:
    """Mean engine step time (ms) between consecutive scrapes, from the step histogram's sum and
    count, aligned with t_s (NaN where unknown or no step ran)."""
    sum_rates, count_rates = counter_rates(t_s, seconds), counter_rates(t_s, steps)
    return [
        1000 * total / count if count > 0 else math.nan
        for total, count in zip(sum_rates, count_rates, strict=True)
    ]


def _objective(report: Report) -> dict[str, Any]:
    return _get(report, "goodput", "objective") or {}


# -- drawing helpers ---------------------------------------------------------------------------


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def _no_data(ax: Axes, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="gray")


def _bound(ax: Axes, value: Any, label: str, horizontal: bool = True) -> None:
    """The objective's bound as a dashed line (nothing when there is no bound)."""
    if not math.isnan(_num(value)):
        line = ax.axhline if horizontal else ax.axvline
        line(_num(value), color="black", linestyle="--", linewidth=1, label=label)


def _draw_cdf(ax: Axes, points: list[tuple[float, float]], label: str) -> None:
    xs, ps = [x for x, _ in points], [p for _, p in points]
    ax.step(xs, ps, where="post", marker="." if len(points) <= 8 else None, label=label)


def _bar_labels(ax: Axes, names: list[str], rotate: bool) -> None:
    ax.set_xticks(range(len(names)))
    short = [n if len(n) <= 24 else n[:21] + "..." for n in names]
    ax.set_xticklabels(short, rotation=90 if rotate else 0, fontsize=7 if rotate else 9)


# -- one run -----------------------------------------------------------------------------------


def plot_report(report: Report, out_dir: str | Path) -> list[Path]:
    """The figures of one run in `out_dir`: latency CDFs, per adapter, by tier, the server's series."""
    out = Path(out_dir)
    drawn = [
        _plot_latencies(report, out / "latency_cdf.png"),
        _plot_per_adapter(report, out / "per_adapter.png"),
        _plot_tiers(report, out / "ttft_by_tier.png"),
        _plot_server_metrics(report, out / "server_metrics.png"),
    ]
    return [path for path in drawn if path is not None]


def _plot_latencies(report: Report, path: Path) -> Path | None:
    distributions = {metric: distribution(report, metric) for metric, _ in LATENCIES}
    if not any(distributions.values()):
        return None
    bounds = {"ttft": ("ttft_p99_s", "p99 bound"), "tpot": ("tpot_mean_s", "mean bound")}
    figure = Figure(figsize=(10, 7), layout="constrained")
    axes = figure.subplots(2, 2).flatten()
    for ax, (metric, title) in zip(axes, LATENCIES, strict=True):
        count = _get(report, metric, "count") or 0
        ax.set_title(f"{title} (n={count})")
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        points = distributions[metric]
        if not points:
            _no_data(ax)
            continue
        _draw_cdf(ax, points, "CDF" if _get(report, "quantiles", metric) else "p50/p90/p99/max")
        if metric in bounds:
            key, label = bounds[metric]
            _bound(ax, _objective(report).get(key), label, horizontal=False)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    figure.suptitle("Latency distributions (from the planned send time)")
    return _save(figure, path)


def _plot_per_adapter(report: Report, path: Path) -> Path | None:
    per_adapter: dict[str, Any] = report.get("per_adapter") or {}
    if not per_adapter:
        return None
    names = top_adapters(per_adapter)
    rows = [per_adapter[name] for name in names]
    figure = Figure(figsize=(max(6.0, 0.3 * len(names) + 2), 7), layout="constrained")
    requests_ax, ttft_ax = figure.subplots(2, 1, sharex=True)
    x = range(len(names))
    completed = [_num(row.get("completed")) for row in rows]
    failed = [_num(row.get("requests")) - c for row, c in zip(rows, completed, strict=True)]
    requests_ax.bar(x, completed, label="completed", color="tab:blue")
    requests_ax.bar(x, failed, bottom=completed, label="not completed", color="tab:red")
    requests_ax.set_ylabel("requests")
    requests_ax.set_title("Requests per adapter")
    requests_ax.legend(fontsize=8)
    ttft_ax.bar(x, [_num(_get(row, "ttft", "p99")) for row in rows], color="tab:purple")
    _bound(ttft_ax, _objective(report).get("ttft_p99_s"), "p99 TTFT bound")
    ttft_ax.set_ylabel("p99 TTFT (s)")
    ttft_ax.set_title("p99 time to first token per adapter")
    if ttft_ax.get_legend_handles_labels()[0]:
        ttft_ax.legend(fontsize=8)
    _bar_labels(ttft_ax, names, rotate=len(names) > 6)
    shown = (
        f"the {len(names)} busiest of {len(per_adapter)} adapters" if len(names) < len(per_adapter) else None
    )
    figure.suptitle("Per adapter" + (f" ({shown})" if shown else ""))
    return _save(figure, path)


def _plot_tiers(report: Report, path: Path) -> Path | None:
    by_tier: dict[str, Any] = report.get("by_tier") or {}
    tiers = [t for t, row in by_tier.items() if _get(row, "ttft", "p50") is not None]
    if not tiers:
        return None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    width = 0.38
    for offset, (key, shade) in zip((-width / 2, width / 2), (("p50", 0.55), ("p99", 1.0)), strict=True):
        heights = [_num(_get(by_tier[t], "ttft", key)) for t in tiers]
        colors = [TIER_COLORS.get(t, "tab:gray") for t in tiers]
        bars = ax.bar([i + offset for i in range(len(tiers))], heights, width, color=colors, alpha=shade)
        ax.bar_label(bars, labels=[key] * len(tiers), fontsize=7)
    _bound(ax, _objective(report).get("ttft_p99_s"), "p99 TTFT bound")
    ax.set_xticks(range(len(tiers)))
    ax.set_xticklabels([f"{t}\n(n={by_tier[t].get('requests', 0)})" for t in tiers])
    ax.set_xlabel("tier of the adapter when the request arrived")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("Cold vs warm: TTFT p50 / p99 by adapter tier")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(figure, path)


def _plot_server_metrics(report: Report, path: Path) -> Path | None:
    t_s: list[float] = _get(report, "server_metrics", "t_s") or []
    series: dict[str, list[float | None]] = _get(report, "server_metrics", "series") or {}
    if not t_s or not series:
        return None

    def values(name: str) -> list[float]:
        return [_num(v) for v in series[name]]

    def rates(name: str) -> list[float]:
        return counter_rates(t_s, series[name])

    def step_ms(name: str) -> list[float]:
        return mean_step_ms(t_s, series[name], series.get(scrape.ENGINE_STEPS_TOTAL) or [None] * len(t_s))

    # panel title, y label, [(series name, legend label, values of it)]
    panels: list[tuple[str, str, list[tuple[str, str, Any]]]] = [
        ("Requests in the server", "requests",
         [(scrape.QUEUE_DEPTH, "queued", values), (scrape.RUNNING, "running", values)]),
        ("KV cache use", "fraction in use", [(scrape.KV_USAGE, "KV use", values)]),
        ("Adapters by tier", "adapters",
         [(scrape.ADAPTERS + t, t, values) for t in scrape.TIERS]
         + [(scrape.ADAPTER_SLOTS, "device slots", values)]),
        ("Adapter loads and evictions", "per second",
         [(scrape.ADAPTER_LOADS + t, f"loads into {t}", rates) for t in ("host", "device")]
         + [(scrape.ADAPTER_EVICTIONS + t, f"evictions from {t}", rates) for t in ("host", "device")]),
        ("Server's token throughput", "tokens per second",
         [(scrape.GENERATION_TOKENS_TOTAL, "generated", rates), (scrape.PROMPT_TOKENS_TOTAL, "prompt", rates)]),
        ("Engine steps", "ms per step / threads",
         [(scrape.ENGINE_STEP_SECONDS_TOTAL, "mean step (ms)", step_ms),
          (scrape.ENGINE_THREADS, "intra-op threads", values)]),
        ("Requests the server counted, by outcome", "per second",
         [(name, name.removeprefix(scrape.REQUESTS), rates) for name in sorted(series)
          if name.startswith(scrape.REQUESTS) and name != scrape.REQUESTS_TOTAL]),
    ]  # fmt: skip
    present = [(title, unit, [line for line in lines if line[0] in series]) for title, unit, lines in panels]
    present = [panel for panel in present if panel[2]]
    if not present:
        return None
    columns = 2 if len(present) > 1 else 1
    rows = math.ceil(len(present) / columns)
    figure = Figure(figsize=(11, 3 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, sharex=True, squeeze=False).flatten()
    for ax, (title, unit, lines) in zip(axes, present, strict=False):
        for name, label, read in lines:
            style = "--" if name == scrape.ADAPTER_SLOTS else "-"
            ax.plot(t_s, read(name), style, label=label, marker="." if len(t_s) < 30 else None)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(present) :]:
        ax.set_visible(False)
    figure.supxlabel("seconds since the run's start")
    figure.suptitle(f"Server metrics ({len(t_s)} scrapes)")
    return _save(figure, path)


# -- a rate sweep ------------------------------------------------------------------------------


_MEETS: dict[str, Any] = {"color": "tab:blue", "label": "meets objective"}
_MISSES: dict[str, Any] = {"facecolors": "none", "edgecolors": "tab:red", "label": "misses objective"}


def plot_sweep(sweep: dict[str, Any], out_path: str | Path) -> list[Path]:
    """Throughput, p99 TTFT and mean TPOT against the offered rate, the objective's bounds dashed and
    the best rate (the highest meeting the objective) marked; filled markers meet the objective."""
    points = sorted(
        (p for p in sweep.get("points") or [] if not math.isnan(_num(p.get("rate")))), key=lambda p: p["rate"]
    )
    if not points:
        return []
    objective = sweep.get("objective") or {}
    rates = [_num(p["rate"]) for p in points]
    met = [bool(p.get("meets_objective")) for p in points]
    panels = (
        ("Throughput", "output tokens/s", ("throughput", "output_tokens_per_s"), None),
        ("p99 time to first token", "p99 TTFT (s)", ("ttft", "p99"), objective.get("ttft_p99_s")),
        ("Mean time per output token", "mean TPOT (s)", ("tpot", "mean"), objective.get("tpot_mean_s")),
    )
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    axes = figure.subplots(1, 3, sharex=True)
    best = _num(sweep.get("best_rate"))
    for ax, (title, unit, keys, bound) in zip(axes, panels, strict=True):
        ys = [_num(_get(p.get("report") or {}, *keys)) for p in points]
        ax.plot(rates, ys, color="tab:blue", linewidth=1)
        for meets, style in ((True, _MEETS), (False, _MISSES)):
            chosen = [(r, y) for r, y, m in zip(rates, ys, met, strict=True) if m == meets]
            if chosen:
                ax.scatter([r for r, _ in chosen], [y for _, y in chosen], **style)
        _bound(ax, bound, "objective")
        if not math.isnan(best):
            ax.axvline(best, color="tab:green", linestyle=":", linewidth=1.5, label=f"best {best:g} req/s")
        ax.set_title(title)
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    early = " (stopped early)" if sweep.get("stopped_early") else ""
    figure.suptitle(f"Rate sweep{early}")
    return [_save(figure, Path(out_path))]


# -- the scaling study -------------------------------------------------------------------------


def plot_scaling(reports_by_count: dict[Any, Report], out_path: str | Path) -> list[Path]:
    """Throughput and p50/p99 TTFT against the number of adapters (log scale); the keys are adapter
    counts (ints, or their strings as JSON gives them back)."""
    runs = sorted((int(count), report) for count, report in reports_by_count.items())
    runs = [(count, report) for count, report in runs if count > 0]
    if not runs:
        return []
    counts = [count for count, _ in runs]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    throughput_ax, ttft_ax = figure.subplots(1, 2, sharex=True)
    throughput_ax.plot(counts, [_num(_get(r, "throughput", "output_tokens_per_s")) for _, r in runs], "o-")
    throughput_ax.set_title("Throughput")
    throughput_ax.set_ylabel("output tokens/s")
    for key in ("p50", "p99"):
        ttft_ax.plot(counts, [_num(_get(r, "ttft", key)) for _, r in runs], "o-", label=f"{key} TTFT")
    _bound(ttft_ax, _objective(runs[0][1]).get("ttft_p99_s"), "p99 TTFT bound")
    ttft_ax.set_title("Time to first token")
    ttft_ax.set_ylabel("TTFT (s)")
    ttft_ax.legend(fontsize=8)
    for ax in (throughput_ax, ttft_ax):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("adapters served (log scale)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    figure.suptitle("Scaling with the number of adapters")
    return [_save(figure, Path(out_path))]


# -- two runs ----------------------------------------------------------------------------------


def plot_compare(
    report_a: Report, report_b: Report, labels: Sequence[str], out_path: str | Path
) -> list[Path]:
    """Two runs side by side (`loramux bench load --compare A.json B.json`): throughput, p50/p99 of
    TTFT, TPOT and E2E as bars, and their TTFT CDFs overlaid."""
    if len(labels) != 2:
        raise ValueError(f"plot_compare needs two labels, one per report, got {list(labels)}")
    reports = (report_a, report_b)
    figure = Figure(figsize=(12, 7.5), layout="constrained")
    axes = figure.subplot_mosaic([["throughput", "cdf", "cdf"], ["ttft", "tpot", "e2e"]])
    colors = ("tab:blue", "tab:orange")

    ax = axes["throughput"]
    heights = [_num(_get(r, "throughput", "output_tokens_per_s")) for r in reports]
    bars = ax.bar(range(2), heights, color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    _bar_labels(ax, list(labels), rotate=False)
    ax.set_title("Throughput")
    ax.set_ylabel("output tokens/s")

    width = 0.38
    for metric, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E latency")):
        ax = axes[metric]
        for i, (report, label, color) in enumerate(zip(reports, labels, colors, strict=True)):
            heights = [_num(_get(report, metric, key)) for key in ("p50", "p99")]
            ax.bar([k + (i - 0.5) * width for k in range(2)], heights, width, color=color, label=label)
        ax.set_xticks(range(2), ["p50", "p99"])
        ax.set_title(title)
        ax.set_ylabel(f"{title} (s)")
        ax.legend(fontsize=8)

    ax = axes["cdf"]
    for report, label in zip(reports, labels, strict=True):
        points = distribution(report, "ttft")
        if points:
            _draw_cdf(ax, points, label)
    ax.set_title("TTFT distribution")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    else:
        _no_data(ax)
    figure.suptitle(f"{labels[0]} vs {labels[1]}")
    return [_save(figure, Path(out_path))]
