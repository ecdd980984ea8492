"""`loramux train`: the handler that turns parsed flags into a training run and reports it.

Returns the exit status: 0 trained and saved; 1 the run could not be done (bad data, a missing
model, an output directory that cannot be written; `error: ...` on stderr); 2 bad flag values.
The training package (and with it torch, transformers and PEFT) is imported inside the handler,
so `loramux --help` stays fast. This module does not build parsers (`server/cli.py` does) and
does not know how training works (`training/`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from training import TrainConfig, TrainingError

    try:
        config = TrainConfig(
            data=Path(args.data),
            out=Path(args.out),
            model=args.model,
            cache_dir=args.cache_dir,
            rank=args.rank,
            alpha=args.alpha,
            targets=args.targets,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            max_length=args.max_length,
            dtype=args.dtype,
            threads=args.threads,
            method=args.method,
            shards=args.shards,
            equivalent_rank=args.equivalent_rank,
            private_rank=args.private_rank,
        )
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from training.trainer import TRAINING_FILE, train

    try:
        result = train(config)
    except (TrainingError, OSError) as exc:  # OSError: ModelNotFound, the model cache
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {config.out} ({result.steps} steps in {result.seconds:.1f} s, loss "
        f"{result.losses[0]:.3f} -> {result.final_loss:.3f}; details in {config.out / TRAINING_FILE})"
    )
    return 0
