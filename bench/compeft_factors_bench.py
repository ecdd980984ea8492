"""`loramux bench compeft-factors`: how well ComPEFT's signs approximate each factorization of an adapter.

For each demo LoRA (`adapters/<task>`, or `--adapters DIR,...`) and density, compresses it with each
`factors` choice of `compress_compeft` (as-trained: ComPEFT as published; balanced: A and B
rescaled to equal norms; svd: B A's canonical factors) and reports, over all its modules:

- kept A / kept B: the fraction of the A entries and of the B entries the one threshold kept;
- error: || g B^ A^ - B A ||^2 / || B A ||^2 summed over modules, g the one scale that fits best
  (alpha is tuned separately, by KL or a task metric, so each choice gets its best scale here);
- cosine: the mean over modules of the cosine between B^ A^ and B A (what no scale can fix);
- dead modules: modules whose B^ A^ is zero (one factor lost every entry);
- seconds: compress_compeft's time (the SVD's share shows as svd minus balanced).

Weights only: no model forward, no server; seconds per adapter.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from adapters_store import load_peft_lora
from adapters_store.compeft import compress_compeft
from adapters_store.compeft_config import FACTOR_FORMS
from tasks import TASK_NAMES

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapters",
        default=",".join(str(ADAPTERS / name) for name in TASK_NAMES),
        help="comma-separated PEFT LoRA directories (default: the five demo LoRAs)",
    )
    parser.add_argument("--densities", default="0.05,0.1,0.2", help="(default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")


def main(args: argparse.Namespace) -> int:
    from tasks.compeft_alpha import model_spec

    spec = model_spec()
    densities = [float(d) for d in args.densities.split(",")]
    rows = []
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| adapter | density | factors | kept A | kept B | error | cosine | dead modules | seconds |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for directory in (Path(p) for p in args.adapters.split(",") if p):
        adapter = load_peft_lora(directory, spec, directory.name)
        exact = {key: w.B.double() @ w.A.double() for key, w in adapter.lora_weights().items()}
        for density in densities:
            for factors in FACTOR_FORMS:
                start = time.perf_counter()
                codes = compress_compeft(adapter, density, 1.0, factors=factors)
                seconds = time.perf_counter() - start
                row = {"adapter": directory.name, "density": density, "factors": factors}
                row |= approximation(codes, exact) | {"seconds": round(seconds, 3)}
                rows.append(row)
                print(
                    f"| {row['adapter']} | {density:g} | {factors} | {row['kept_a']:.1%} | "
                    f"{row['kept_b']:.1%} | {row['error']:.3f} | {row['cosine']:.3f} | "
                    f"{row['dead']}/{len(exact)} | {seconds:.2f} |",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def approximation(codes: object, exact: dict) -> dict[str, float | int]:
    """Kept fractions, the best-scale relative error, the mean cosine and the dead modules of `codes`."""
    got = {key: w.B.double() @ w.A.double() for key, w in codes.lora_weights().items()}
    power = sum(float((got[k] ** 2).sum()) for k in exact)
    fit = sum(float((got[k] * exact[k]).sum()) for k in exact) / power if power > 0 else 0.0
    residual = sum(float(((fit * got[k] - exact[k]) ** 2).sum()) for k in exact)
    cosines = [
        float((got[k] * exact[k]).sum() / (got[k].norm() * exact[k].norm())) if got[k].any() else 0.0
        for k in exact
    ]
    kept_a, kept_b = codes.kept_fractions()
    return {
        "kept_a": kept_a,
        "kept_b": kept_b,
        "error": residual / sum(float((e**2).sum()) for e in exact.values()),
        "cosine": sum(cosines) / len(cosines),
        "dead": sum(1 for k in exact if not got[k].any()),
    }
