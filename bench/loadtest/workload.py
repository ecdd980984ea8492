"""The workload planner: a `WorkloadConfig` and its seed -> the list of `PlannedRequest`s to send.

Everything is decided before the run starts, from the seed alone, so two runs of one config send
the same requests at the same planned times (numpy + stdlib only; no torch, no tokenizer, no server).

    plan(config)                  -> [PlannedRequest(index 0..n-1, adapter, prompt ids, max_tokens, at_s)]
    expected_frequencies(config)  -> {adapter: probability} of the popularity model without churn

Who (adapter popularity over `config.adapters`, Punica's four patterns; `parse_popularity`):
- `distinct`: the list in a seeded shuffled order, request i gets order[i % n_adapters] (each adapter
  once per cycle of n_adapters requests, the same order every cycle);
- `uniform`: each request picks uniformly from the list;
- `zipf:ALPHA` (ALPHA > 0): the adapter at rank k (1-based, in a seeded permutation of the list) has
  probability k^-ALPHA / sum_j j^-ALPHA;
- `identical`: every request uses the first adapter of the list.
Churn (`config.churn`, zipf and identical only) makes the popular set drift while keeping its shape:
`churn` is the fraction of the ranking that turns over per 100 requests. Request i sees the ranking
rotated by shift(i) = floor(i * churn * n_adapters / 100) places; each place, the least popular
adapter becomes the most popular and every other adapter moves down one rank (a cold adapter
turning hot is what stresses the adapter tiers). `churn=1` with 10 adapters: one place every 10
requests, the whole ranking after 100. It counts requests, not seconds, so it means the same in a
closed loop; open-loop at rate R it is churn * R / 100 of the ranking per second.

When (`config.arrival`):
- `poisson` at `rate` req/s: exponential gaps of mean 1/rate;
- `gamma` at `rate` with `burstiness` b, vLLM's `--burstiness` convention exactly: gaps ~
  Gamma(shape=b, scale=1/(rate*b)), mean 1/rate, coefficient of variation 1/sqrt(b), so b=1 is
  Poisson (the same times as `poisson`), b<1 burstier, b>1 more regular;
- `closed`: no times (at_s=None); the runner sends each request when a client is free;
- `trace`: replay `trace_path`, JSON lines `{"timestamp": s, "adapter": name, "prompt_tokens": n,
  "output_tokens": m}`; timestamps (relative or absolute) must not decrease and are shifted so the
  first is 0; a line's adapter and token counts replace the popularity model and the length specs
  (a line may leave any of them out, and then it is drawn as for a synthetic request).
Open-loop plans start at 0.0 (the first request goes out at once, then the first gap: as vLLM) and
stop at whichever comes first: `num_requests`, or the first planned time past `duration_s` (not
planned). A closed loop needs `num_requests`; its `duration_s` is for the runner to apply.

How long (`parse_length`, prompt tokens and max tokens separately): `128` (fixed), `uniform:LO-HI`
(integers, both ends included), `normal:MEAN,STD` and `lognormal:MEDIAN,SIGMA` (SIGMA of the log),
rounded to integers and clipped to >= 1.

Prompts: each request its own seeded random token ids from [low, high) (`config.token_ids`; the
caller picks the range, e.g. to stay clear of special tokens), exactly its prompt length long.

Each aspect (ranking, adapter draws, times, prompt lengths, max tokens, token ids) has its own
random stream spawned from the seed, so changing one option leaves the others' draws as they were.
What it deliberately does not know: the server, its adapters, its tokenizer and context length
(a prompt plus its max tokens is not checked against any context), and the clock.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.loadtest.records import PlannedRequest

# Popularity patterns.
DISTINCT = "distinct"
UNIFORM = "uniform"
ZIPF = "zipf"
IDENTICAL = "identical"
POPULARITY_PATTERNS = (DISTINCT, UNIFORM, ZIPF, IDENTICAL)

# Arrival kinds.
POISSON = "poisson"
GAMMA = "gamma"
CLOSED = "closed"
TRACE = "trace"
ARRIVALS = (POISSON, GAMMA, CLOSED, TRACE)

# Length distributions.
FIXED = "fixed"
LENGTH_KINDS = (FIXED, UNIFORM, "normal", "lognormal")

# A guard against a typo (`--duration 36000 --rate 1000`) planning more than memory holds.
MAX_PLANNED_REQUESTS = 1_000_000


@dataclass(frozen=True)
class Popularity:
    """A parsed popularity spec: the pattern and, for zipf, its exponent."""

    pattern: str
    alpha: float = 0.0

    def rank_probabilities(self, n_adapters: int) -> np.ndarray:
        """P(rank k) for k = 0..n_adapters-1, for the patterns drawn by rank (zipf, identical)."""
        if self.pattern == IDENTICAL:
            return np.eye(n_adapters)[0]
        weights = np.arange(1, n_adapters + 1, dtype=np.float64) ** -self.alpha
        return weights / weights.sum()


def parse_popularity(spec: str) -> Popularity:
    """`distinct` | `uniform` | `zipf:ALPHA` (ALPHA > 0) | `identical` -> Popularity."""
    name, sep, arg = spec.strip().partition(":")
    if name == ZIPF:
        alpha = _number(arg, f"popularity {spec!r}: zipf needs an exponent, e.g. zipf:1.0")
        if not alpha > 0:
            raise ValueError(f"popularity {spec!r}: the zipf exponent must be > 0")
        return Popularity(ZIPF, alpha)
    if name in (DISTINCT, UNIFORM, IDENTICAL) and not sep:
        return Popularity(name)
    raise ValueError(
        f"popularity {spec!r} is not one of distinct, uniform, zipf:ALPHA (e.g. zipf:1.0), identical"
    )


@dataclass(frozen=True)
class LengthSpec:
    """A parsed length spec. `fixed`: (n,); `uniform`: (lo, hi); `normal`: (mean, std);
    `lognormal`: (median, sigma of the log)."""

    kind: str
    params: tuple[float, ...]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n lengths (int64, each >= 1)."""
        if self.kind == FIXED:
            return np.full(n, int(self.params[0]), dtype=np.int64)
        if self.kind == UNIFORM:
            low, high = self.params
            return rng.integers(int(low), int(high), endpoint=True, size=n)
        if self.kind == "normal":
            draws = rng.normal(self.params[0], self.params[1], size=n)
        else:  # lognormal: the median is exp(mu)
            draws = rng.lognormal(math.log(self.params[0]), self.params[1], size=n)
        return np.maximum(np.rint(draws), 1).astype(np.int64)


def parse_length(spec: str) -> LengthSpec:
    """`N` | `uniform:LO-HI` | `normal:MEAN,STD` | `lognormal:MEDIAN,SIGMA` -> LengthSpec (see module doc)."""
    text = spec.strip()
    name, sep, arg = text.partition(":")
    usage = "a length is N, uniform:LO-HI, normal:MEAN,STD or lognormal:MEDIAN,SIGMA (e.g. uniform:64-256)"
    if not sep:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"length {spec!r}: {usage}; a fixed length is an integer >= 1")
        return LengthSpec(FIXED, (int(text),))
    if name == UNIFORM:
        low_text, dash, high_text = arg.partition("-")
        if not (dash and low_text.strip().isdigit() and high_text.strip().isdigit()):
            raise ValueError(f"length {spec!r}: uniform needs two integers LO-HI, e.g. uniform:64-256")
        low, high = int(low_text), int(high_text)
        if not 1 <= low <= high:
            raise ValueError(f"length {spec!r}: uniform needs 1 <= LO <= HI")
        return LengthSpec(UNIFORM, (low, high))
    if name in ("normal", "lognormal"):
        parts = arg.split(",")
        if len(parts) != 2:
            raise ValueError(f"length {spec!r}: {name} needs two numbers, e.g. {name}:128,32")
        center = _number(parts[0], f"length {spec!r}: {usage}")
        spread = _number(parts[1], f"length {spec!r}: {usage}")
        if not (center > 0 and spread >= 0):
            raise ValueError(f"length {spec!r}: {name} needs a center > 0 and a spread >= 0")
        return LengthSpec(name, (center, spread))
    raise ValueError(f"length {spec!r}: {usage}")


@dataclass(frozen=True)
class WorkloadConfig:
    """What to plan (see the module docstring for each option's meaning). Checked when built."""

    adapters: tuple[str, ...]  # "" = the base model; may be empty only for a trace that names them all
    token_ids: tuple[int, int]  # prompt token ids are drawn from [low, high)
    popularity: str = UNIFORM
    churn: float = 0.0  # fraction of the popularity ranking that turns over per 100 requests
    arrival: str = POISSON
    rate: float | None = None  # requests per second (poisson, gamma)
    burstiness: float = 1.0  # gamma only: vLLM's convention, < 1 burstier, > 1 more regular
    trace_path: str | None = None  # trace only
    num_requests: int | None = None
    duration_s: float | None = None
    prompt_tokens: str = "128"
    max_tokens: str = "128"
    seed: int = 0

    def __post_init__(self) -> None:
        popularity = parse_popularity(self.popularity)
        parse_length(self.prompt_tokens)
        parse_length(self.max_tokens)
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"adapters {self.adapters!r}: an adapter is listed twice")
        if not self.adapters and self.arrival != TRACE:
            raise ValueError('no adapters to plan for: give at least one ("" is the base model)')
        low, high = self.token_ids
        if not 0 <= low < high:
            raise ValueError(f"token ids [{low}, {high}): need 0 <= low < high")
        if not (math.isfinite(self.churn) and self.churn >= 0):
            raise ValueError(f"churn {self.churn}: must be a number >= 0 (ranking turned per 100 requests)")
        if self.churn and popularity.pattern not in (ZIPF, IDENTICAL):
            raise ValueError(f"churn applies to zipf and identical popularity, not {self.popularity!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed {self.seed!r}: must be an integer >= 0")
        self._check_arrival()

    def _check_arrival(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival {self.arrival!r} is not one of {', '.join(ARRIVALS)}")
        if self.num_requests is not None and not 1 <= self.num_requests <= MAX_PLANNED_REQUESTS:
            raise ValueError(f"num_requests {self.num_requests}: must be from 1 to {MAX_PLANNED_REQUESTS}")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s {self.duration_s}: must be > 0")
        if (self.trace_path is not None) != (self.arrival == TRACE):
            raise ValueError("a trace_path goes with arrival='trace', and arrival='trace' needs one")
        if self.arrival == GAMMA and not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ValueError(f"burstiness {self.burstiness}: must be > 0 (1 is Poisson, < 1 burstier)")
        if self.arrival != GAMMA and self.burstiness != 1.0:
            raise ValueError(f"burstiness {self.burstiness} needs arrival='gamma' (not {self.arrival!r})")
        if self.arrival in (POISSON, GAMMA):
            if self.rate is None or not (math.isfinite(self.rate) and self.rate > 0):
                raise ValueError(f"rate {self.rate}: {self.arrival} arrivals need a rate > 0 (requests/s)")
            if self.num_requests is None and self.duration_s is None:
                raise ValueError("an open-loop plan needs num_requests or duration_s (or both)")
        elif self.rate is not None:
            raise ValueError(f"rate {self.rate}: arrival={self.arrival!r} takes no rate")
        if self.arrival == CLOSED and self.num_requests is None:
            raise ValueError("a closed loop needs num_requests (its duration_s is the runner's to apply)")


def plan(config: WorkloadConfig) -> list[PlannedRequest]:
    """The requests of `config`, indices 0..n-1, times non-decreasing from 0.0 (None in a closed loop)."""
    streams = _Streams(config.seed)
    trace: list[_TraceLine] = []
    # 1) when, and with it how many
    if config.arrival == TRACE:
        assert config.trace_path is not None
        trace = _bounded_trace(_read_trace(Path(config.trace_path), bool(config.adapters)), config)
        times: list[float | None] = [line.at_s for line in trace]
    elif config.arrival == CLOSED:
        assert config.num_requests is not None
        times = [None] * config.num_requests
    else:
        times = _open_loop_times(config, streams.arrivals).tolist()
    count = len(times)
    # 2) who (a trace with every adapter named has no list to draw from)
    adapters = [""] * count
    if config.adapters:
        drawn = _adapter_indices(config, streams, count)
        adapters = [config.adapters[i] for i in drawn.tolist()]
    # 3) how long
    prompt_lengths = parse_length(config.prompt_tokens).sample(streams.prompt_lengths, count).tolist()
    max_tokens = parse_length(config.max_tokens).sample(streams.max_tokens, count).tolist()
    for i, line in enumerate(trace):
        if line.adapter is not None:
            adapters[i] = line.adapter
        if line.prompt_tokens is not None:
            prompt_lengths[i] = line.prompt_tokens
        if line.output_tokens is not None:
            max_tokens[i] = line.output_tokens
    # 4) the prompts, one stretch of ids each
    low, high = config.token_ids
    ids = streams.token_ids.integers(low, high, size=sum(prompt_lengths)).tolist()
    starts = np.concatenate([[0], np.cumsum(prompt_lengths)]).tolist()
    return [
        PlannedRequest(
            index=i,
            adapter=adapters[i],
            prompt_token_ids=tuple(ids[starts[i] : starts[i + 1]]),
            max_tokens=max_tokens[i],
            at_s=times[i],
        )
        for i in range(count)
    ]


def expected_frequencies(config: WorkloadConfig) -> dict[str, float]:
    """P(adapter) under the popularity model without churn, in `config.adapters`' order.

    For `distinct` it is exact over whole cycles of len(adapters) requests. For a trace it is the
    share of each adapter in the planned requests (the trace's own, plus any drawn for lines without one).
    """
    if config.arrival == TRACE:
        names = [request.adapter for request in plan(config)]
        return {name: names.count(name) / len(names) for name in dict.fromkeys(names)}
    popularity = parse_popularity(config.popularity)
    n_adapters = len(config.adapters)
    if popularity.pattern in (DISTINCT, UNIFORM):
        return {name: 1.0 / n_adapters for name in config.adapters}
    ranking = _ranking(config, _Streams(config.seed).ranking)
    by_rank = popularity.rank_probabilities(n_adapters)
    probability = {config.adapters[adapter]: float(p) for adapter, p in zip(ranking, by_rank, strict=True)}
    return {name: probability[name] for name in config.adapters}


class _Streams:
    """One independent random stream per aspect of the plan, all spawned from the seed."""

    def __init__(self, seed: int) -> None:
        children = np.random.SeedSequence(seed).spawn(6)
        generators = [np.random.default_rng(child) for child in children]
        self.ranking, self.adapters, self.arrivals = generators[:3]
        self.prompt_lengths, self.max_tokens, self.token_ids = generators[3:]


def _ranking(config: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """Indices into config.adapters by rank (0 = most popular; distinct: the cycle's order)."""
    if parse_popularity(config.popularity).pattern == IDENTICAL:
        return np.arange(len(config.adapters))  # the first adapter of the list is the one
    return rng.permutation(len(config.adapters))


def _adapter_indices(config: WorkloadConfig, streams: _Streams, count: int) -> np.ndarray:
    """Index into config.adapters of each of `count` requests."""
    popularity = parse_popularity(config.popularity)
    n_adapters = len(config.adapters)
    if popularity.pattern == UNIFORM:
        return streams.adapters.integers(n_adapters, size=count)
    ranking = _ranking(config, streams.ranking)
    if popularity.pattern == DISTINCT:
        return ranking[np.arange(count) % n_adapters]
    ranks = streams.adapters.choice(n_adapters, size=count, p=popularity.rank_probabilities(n_adapters))
    # Churn: rotating the ranking by `shift` puts the adapter ranked n-shift at the top.
    shift = np.floor(np.arange(count) * (config.churn * n_adapters / 100.0)).astype(np.int64)
    return ranking[(ranks - shift) % n_adapters]


def _open_loop_times(config: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """Send times 0.0, then cumulative Gamma(b, 1/(rate*b)) gaps, up to num_requests or duration_s."""
    assert config.rate is not None
    shape, scale = config.burstiness, 1.0 / (config.rate * config.burstiness)
    limit = min(config.num_requests or MAX_PLANNED_REQUESTS + 1, MAX_PLANNED_REQUESTS + 1)
    horizon = math.inf if config.duration_s is None else config.duration_s
    # Draw in chunks of about what the duration needs (deterministic sizes, so the same plan each time).
    chunk = limit if horizon == math.inf else min(limit, math.ceil(horizon * config.rate * 1.2) + 64)
    pieces, last, total = [np.zeros(1)], 0.0, 1
    while total < limit and last <= horizon:
        more = last + np.cumsum(rng.gamma(shape, scale, size=min(chunk, limit - total)))
        pieces.append(more)
        last, total = float(more[-1]), total + len(more)
    planned = np.concatenate(pieces)[:limit]
    planned = planned[: np.searchsorted(planned, horizon, side="right")]
    if len(planned) > MAX_PLANNED_REQUESTS:
        raise ValueError(
            f"the plan would hold more than {MAX_PLANNED_REQUESTS} requests: lower the rate or duration_s"
        )
    return planned


@dataclass(frozen=True)
class _TraceLine:
    at_s: float  # already shifted so the first line is at 0
    adapter: str | None
    prompt_tokens: int | None
    output_tokens: int | None


def _read_trace(path: Path, has_adapters: bool) -> list[_TraceLine]:
    """The trace's lines, checked (errors name the file and line), times shifted to start at 0."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the trace {path}: {error}") from error
    lines: list[_TraceLine] = []
    first = previous = 0.0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"trace {path} line {number}"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error.msg})") from error
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object with timestamp, adapter, ...")
        timestamp = entry.get("timestamp")
        if (
            isinstance(timestamp, bool)
            or not isinstance(timestamp, (int, float))
            or not math.isfinite(timestamp)
        ):
            raise ValueError(f"{where}: needs a numeric timestamp (seconds), got {timestamp!r}")
        if lines and timestamp < previous:
            raise ValueError(f"{where}: timestamp {timestamp} is before the previous line's {previous}")
        if not lines:
            first = float(timestamp)
        previous = float(timestamp)
        adapter = entry.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"{where}: adapter must be a string, got {adapter!r}")
        if adapter is None and not has_adapters:
            raise ValueError(f"{where}: names no adapter, and no adapters were given to draw one from")
        prompt_tokens = _trace_count(entry, "prompt_tokens", where)
        output_tokens = _trace_count(entry, "output_tokens", where)
        lines.append(_TraceLine(float(timestamp) - first, adapter, prompt_tokens, output_tokens))
    if not lines:
        raise ValueError(f"trace {path} has no requests")
    return lines


def _trace_count(entry: dict[str, object], key: str, where: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def _bounded_trace(lines: list[_TraceLine], config: WorkloadConfig) -> list[_TraceLine]:
    """The trace's first num_requests lines, up to duration_s."""
    if config.num_requests is not None:
        lines = lines[: config.num_requests]
    if config.duration_s is not None:
        lines = [line for line in lines if line.at_s <= config.duration_s]
    return lines


def _number(text: str, message: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(message) from None
    if not math.isfinite(value):
        raise ValueError(message)
    return value
