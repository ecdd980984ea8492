"""What one training run is asked to do, checked once: `TrainConfig`, and the error users can cause.

Every value a user gives is validated here (ranks, rates, the target projections, the saved
dtype) into a frozen TrainConfig the trainer trusts. This module knows no torch and no files;
importing it is cheap, so server/cli.py reads the flag defaults from TrainConfig's fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
SAVE_DTYPES = ("float16", "float32")
METHODS = ("lora", "mos")  # a PEFT LoRA directory, or a Mixture-of-Shards (`mos`) directory


class TrainingError(Exception):
    """Something the user can fix (a flag, a data row, the output directory); the message says what."""


@dataclass(frozen=True)
class TrainConfig:
    """One `loramux train` run. `targets` is "all-linear" or projections joined by commas."""

    data: Path
    out: Path
    model: str | None = None  # a Hugging Face directory or .gguf; None = the server's default model
    cache_dir: str | None = None
    rank: int = 8
    alpha: float = 16.0
    targets: str = ALL_LINEAR
    steps: int = 100
    lr: float = 5e-4
    batch_size: int = 8
    seed: int = 0
    max_length: int = 512
    dtype: str = "float16"  # of the saved weights; training runs in fp32
    threads: int | None = None  # torch's intra-op threads; None = server.cpus.default_threads
    warmup_fraction: float = 0.06
    max_grad_norm: float = 1.0
    method: str = "lora"
    # MoS only (training/mos.py): l, R and p; `rank` is the per-layer rank r, `alpha` its lora_alpha
    shards: int = 4
    equivalent_rank: float = 0.75
    private_rank: float = 0.25

    def __post_init__(self) -> None:
        for name, least in (("rank", 1), ("steps", 1), ("batch_size", 1), ("max_length", 2), ("seed", 0)):
            value = getattr(self, name)
            if value < least:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
        if self.threads is not None and self.threads < 1:
            raise TrainingError(f"--threads must be >= 1, got {self.threads}")
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise TrainingError(f"--{name} must be a positive number, got {value}")
        if self.dtype not in SAVE_DTYPES:
            raise TrainingError(f"--dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.dtype!r}")
        if self.method not in METHODS:
            raise TrainingError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.shards < 1:
            raise TrainingError(f"--shards must be >= 1, got {self.shards}")
        for name in ("equivalent_rank", "private_rank"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise TrainingError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.method == "mos" and not 0 <= self.private_rank <= self.equivalent_rank > 0:
            raise TrainingError(
                f"--private-rank ({self.private_rank}) must be at most --equivalent-rank "
                f"({self.equivalent_rank}), which must be positive"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise TrainingError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        self.target_modules  # noqa: B018 -- validates --targets now, not after the model is loaded

    @property
    def target_modules(self) -> str | list[str]:
        """`LoraConfig.target_modules`: "all-linear", or the projections in the order given."""
        from adapters_store.spec import PROJECTIONS  # here: adapters_store imports torch

        entries = [entry.strip() for entry in self.targets.split(",")]
        if entries == [ALL_LINEAR]:
            return ALL_LINEAR
        if ALL_LINEAR in entries:
            raise TrainingError(f"--targets {ALL_LINEAR} stands alone; got {self.targets!r}")
        if "" in entries:
            raise TrainingError(f"--targets {self.targets!r} has an empty entry; e.g. q_proj,v_proj")
        unknown = [entry for entry in entries if entry not in PROJECTIONS]
        if unknown:
            raise TrainingError(
                f"--targets: unknown projection {unknown[0]!r}; use {ALL_LINEAR} or a comma-separated "
                f"list of {', '.join(PROJECTIONS)}"
            )
        if len(set(entries)) != len(entries):
            raise TrainingError(f"--targets {self.targets!r} names a projection twice")
        return entries

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)
