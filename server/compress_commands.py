"""`loramux compress`: the handler that turns parsed flags into a compression run and reports it.

Prints what was written, its size against the source file and against the source in fp16, the
alpha used (and how it was chosen), and the fidelity against the uncompressed adapter on the
report prompts. Returns the exit status: 0 written; 1 the run could not be done (a bad source
adapter, prompts file or DST, a missing model; `error: ...` on stderr); 2 bad flag values.
torch, transformers and the adapter store are imported inside the handler. This module does not
build parsers (`server/cli.py` does) and does not compress or evaluate (`training/fidelity.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_compress(args: argparse.Namespace, extra: list[str]) -> int:
    from training.fidelity import CompressConfig, CompressError

    try:
        config = CompressConfig(
            source=Path(args.src),
            out=Path(args.dst),
            density=args.density,
            alpha=args.alpha,
            model=args.model,
            cache_dir=args.cache_dir,
            prompts=None if args.prompts is None else Path(args.prompts),
            method=args.method,
            factors=args.factors or "svd",
        )
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from training.fidelity import compress

    try:
        result = compress(config)
    except (CompressError, OSError) as exc:  # OSError: ModelNotFound, the model cache, DST
        print(f"error: {exc}", file=sys.stderr)
        return 1
    codes = result.codes
    how = f"auto, least mean KL over {len(result.alpha_trials)} trials" if result.alpha_auto else "given"
    print(
        f"wrote {result.out} (compeft of the {codes.factors} factors: density {codes.density:g}, kept {codes.rice.kept:,} of "
        f"{codes.total_elements:,} elements, alpha {codes.alpha:.4g} ({how}), gamma {codes.gamma:.4g})"
    )
    print(
        f"size: {_bytes(result.compeft_bytes)}; source {_bytes(result.source_bytes)} "
        f"({result.source_bytes / result.compeft_bytes:.1f}x smaller); as fp16 {_bytes(result.fp16_bytes)} "
        f"({result.fp16_bytes / result.compeft_bytes:.1f}x smaller)"
    )
    kept_a, kept_b = codes.kept_fractions()
    print(f"kept {kept_a:.1%} of the lora_A entries and {kept_b:.1%} of the lora_B entries", end="")
    lopsided = not codes.balanced and min(kept_a, kept_b) < 0.1 * max(kept_a, kept_b)
    print("; one factor kept almost nothing: try --factors svd" if lopsided else "")
    ours, base = result.fidelity, result.base_fidelity
    print(
        f"fidelity vs the uncompressed adapter on its answers to {ours.prompts} held-out prompts ({ours.positions} positions, "
        f"{result.prompts_from}): top-1 agreement {ours.top1_agreement:.1%}, mean KL {ours.mean_kl:.4g} nats "
        f"(base model alone: {base.top1_agreement:.1%}, {base.mean_kl:.4g} nats)"
    )
    return 0


def _bytes(count: int) -> str:
    return f"{count:,} bytes" if count < 10_000 else f"{count / 1024:,.1f} KiB"
