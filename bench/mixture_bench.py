"""`loramux bench mixture`: what a weighted mixture of adapters costs at decode, against one adapter.

On the default model with the five demo LoRA adapters shipped in `adapters/` (sql, sentiment,
extract, arith, shout), for each B in `--batch`, a batch of B requests where every request runs
- `base`: no adapter;
- `single`: one adapter, request i the (i mod 5)-th;
- `mix2`: a mixture of the (i mod 5)-th and the next adapter, weights 0.6 / 0.4;
- `mix3`: a mixture of the (i mod 5)-th and the next two, weights 0.5 / 0.3 / 0.2.
Rotating the start spreads the adapters evenly over requests and over the k positions of a
mixture (the engine runs a k-mixture batch as k passes of the LoRA term, pass j holding every
request's j-th pair: kernels/metadata.py).

`tok_s` is decode throughput, B * (N - 1) / (T(N) - T(1)) as in `bench engine` (prefill, slot
loads and the first token cancel out; each T the best of `--repeats` after a warm-up run);
`vs_single` and `vs_base` divide it by the `single` and `base` rows of the same B in the same run.
Every row gets a fresh engine of one configuration (5 slots of rank <= 8: requests share the five
adapters, so even a 3-mixture batch fits; running = the largest B), the same prompts, and the four
rows of one B run back to back: in one engine, what ran later decoded slower whatever it ran
(see `bench formats`). An in-process benchmark: it drives the engine directly, not over the wire.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Any

from bench.adapters_bench import emit, engine_for, measure_engine
from bench.engine_bench import AdapterSpec, make_prompts
from bench.formats_bench import ADAPTERS, TASKS

WEIGHTS = {  # row -> the weights of each request's mixture, () = the base model
    "base": (),
    "single": (1.0,),
    "mix2": (0.6, 0.4),
    "mix3": (0.5, 0.3, 0.2),
}
MAX_RANK = 8  # the demo adapters are rank 3; as `bench formats` sizes its slots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="as `serve --threads`")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def choices(row: str, batch: int) -> list[AdapterSpec]:
    """What each of `batch` requests runs with in `row`: a name, "" (base) or a weighted mixture."""
    weights = WEIGHTS[row]
    if not weights:
        return [""] * batch
    if len(weights) == 1:
        return [TASKS[i % len(TASKS)] for i in range(batch)]
    return [
        tuple((TASKS[(i + j) % len(TASKS)], weight) for j, weight in enumerate(weights)) for i in range(batch)
    ]


def adapter_names(spec: AdapterSpec) -> tuple[str, ...]:
    if isinstance(spec, str):
        return (spec,) if spec else ()
    return tuple(name for name, _ in spec)


def measure_row(args: argparse.Namespace, max_running: int, row: str, batch: int) -> dict[str, Any]:
    """One row on a fresh engine: the decode throughput of `batch` requests as `row` says."""
    sized = argparse.Namespace(batch=max_running, threads=args.threads)
    engine = engine_for(sized, (str(ADAPTERS),), max_slots=len(TASKS), max_rank=MAX_RANK)
    try:
        prompts = make_prompts(engine.tokenizer, batch, args.prompt_tokens)
        specs = choices(row, batch)
        tok_s = measure_engine(args, engine, prompts, specs)
    finally:
        engine.shutdown()
    return {
        "batch": batch,
        "requests": row,
        "adapters_per_request": len(WEIGHTS[row]),
        "distinct_adapters": len({name for spec in specs for name in adapter_names(spec)}),
        "tok_s": tok_s,
    }


def main(args: argparse.Namespace) -> int:
    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        raise SystemExit(f"--batch takes comma-separated integers, got {args.batch!r}") from None
    if not batches or min(batches) < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        raise SystemExit(
            "bench mixture: need --batch sizes >= 1, --new-tokens >= 2, --prompt-tokens >= 1, --repeats >= 1"
        )
    missing = [task for task in TASKS if not (ADAPTERS / task).is_dir()]
    if missing:
        raise SystemExit(f"{ADAPTERS / missing[0]} is missing: run `make demo-adapters` first")
    machine = platform.processor() or platform.machine()
    for batch in batches:
        rows = {row: measure_row(args, max(batches), row, batch) for row in WEIGHTS}
        for row in rows.values():
            row["vs_single"] = round(row["tok_s"] / rows["single"]["tok_s"], 2)
            row["vs_base"] = round(row["tok_s"] / rows["base"]["tok_s"], 2)
            row["machine"] = machine
            emit(args, row)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
