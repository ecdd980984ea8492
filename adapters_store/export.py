"""Writing any loaded adapter as a standard PEFT LoRA directory (`loramux export --to peft-lora`).

The adapter's `lora_weights()` (A [rank, in], B [out, rank] and scale per module) become
`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
`base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`. PEFT computes each
module's scale as lora_alpha / r, so r is the module's rank and lora_alpha is chosen so that
alpha / r gives back the adapter's scale bit for bit (see `exact_alpha`); the most common (rank, alpha) pair is the
config's `r` / `lora_alpha` and the others go to `rank_pattern` / `alpha_pattern`. The directory
is written beside its destination and renamed into place, so a failed export leaves nothing.
It also records the adapter it came from (`source.json`, adapters_store/lineage.py). This module
knows the PEFT layout; it knows no formats' files, flags or models.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from adapters_store.adapter import LoadedAdapter, LoraWeights, ModuleKey
from adapters_store.lineage import write_source
from adapters_store.peft_config import CONFIG_FILE
from adapters_store.peft_lora import WEIGHTS_FILE
from adapters_store.spec import PROJECTIONS, BaseModelSpec, module_name

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export_peft_lora(
    adapter: LoadedAdapter,
    spec: BaseModelSpec,
    directory: Path | str,
    *,
    dtype: torch.dtype = torch.float32,
    base_model: str | None = None,
) -> Path:
    """Write `adapter` as a PEFT LoRA directory at `directory` (which must not exist, or be empty).

    spec: the base model (its layer count decides whether a projection is adapted everywhere);
    dtype: of the saved factors; base_model: written as base_model_name_or_path.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} already exists and is not an empty directory; choose a new one")
    weights = adapter.lora_weights()
    config = peft_lora_config(weights, spec, base_model)
    tensors = {}
    for (layer, projection), module in sorted(weights.items(), key=_module_order):
        prefix = f"base_model.model.{module_name(layer, projection)}"
        tensors[f"{prefix}.lora_A.weight"] = module.A.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = module.B.to(dtype).contiguous()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        # The files get the umask's mode (save() + write_bytes: save_file's is 0600) and the
        # directory the same with x where r is (mkdtemp's is 0700), so a server running as
        # another user can read the export.
        (staging / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        write_source(staging, adapter)  # a version of `adapter`: the router routes them as one
        mode = (staging / CONFIG_FILE).stat().st_mode & 0o777
        staging.chmod(mode | (mode & 0o444) >> 2)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def peft_lora_config(
    weights: Mapping[ModuleKey, LoraWeights], spec: BaseModelSpec, base_model: str | None
) -> dict[str, Any]:
    """The adapter_config.json that makes PEFT rebuild exactly these modules' ranks and scales."""
    plans = {key: (w.rank, exact_alpha(w.scale, w.rank)) for key, w in weights.items()}
    (rank, alpha), _ = Counter(plans.values()).most_common(1)[0]
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for projection in PROJECTIONS:
        keys = sorted(key for key in plans if key[1] == projection)
        if not keys:
            continue
        everywhere = len(keys) == spec.num_layers
        uniform = len({plans[key] for key in keys}) == 1
        targets += [projection] if everywhere else [module_name(*key) for key in keys]
        # One pattern key for the whole projection when its modules agree, else one per module.
        groups = [(projection, keys)] if uniform else [(re.escape(module_name(*key)), [key]) for key in keys]
        for pattern, members in groups:
            module_rank, module_alpha = plans[members[0]]
            if module_rank != rank:
                rank_pattern[pattern] = module_rank
            if module_alpha != alpha:
                alpha_pattern[pattern] = _plain(module_alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": _plain(alpha),
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def exact_alpha(scale: float, rank: int) -> float:
    """The alpha nearest scale * rank whose `alpha / rank` (PEFT's scaling) is closest to `scale`.

    Bit for bit equal whenever some float alpha gives it, which is always the case for a scale that
    was itself some alpha / rank (every plain PEFT LoRA and MoS adapter); otherwise (rsLoRA's
    alpha / sqrt(r) with a large rank can fall between two quotients) within one ulp of it.
    """
    alpha = scale * rank
    candidates = [alpha]
    up = down = alpha
    for _ in range(8):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return min(candidates, key=lambda a: abs(a / rank - scale))  # the first (nearest alpha) of equals


def _module_order(item: tuple[ModuleKey, LoraWeights]) -> tuple[int, int]:
    (layer, projection), _ = item
    return layer, PROJECTIONS.index(projection)


def _plain(value: float) -> float | int:
    """JSON numbers as people write them: 16, not 16.0."""
    return int(value) if float(value).is_integer() else value
