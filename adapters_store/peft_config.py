"""Reading a PEFT `adapter_config.json` for LoRA, and deciding what it adapts the way PEFT does.

Which modules an adapter targets and with which rank and alpha follows PEFT (peft 0.21):
`check_target_module_exists` (tuners_utils.py) for `target_modules`, `exclude_modules`,
`layers_to_transform` and `layers_pattern`; `get_pattern_key` (utils/other.py) for
`rank_pattern` / `alpha_pattern`; `LoraLayer.update_layer` for the scale (alpha / r, or
alpha / sqrt(r) with `use_rslora`). Fields that change the forward pass beyond plain LoRA, or
that need something besides the LoRA factors, are refused by name. This module reads JSON
only; the weight file is `peft_lora.py`'s business.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.errors import AdapterError
from adapters_store.spec import PROJECTIONS, BaseModelSpec

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND

# Config fields whose truthy value selects a LoRA variant or extra trainable parts that a plain
# `y += scale * B(Ax)` cannot serve, with what to tell the user.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA adapters need a magnitude vector per module; merge the adapter or retrain without DoRA",
    "modules_to_save": "it replaces whole base-model modules (e.g. lm_head); retrain without modules_to_save",
    "lora_bias": "it adds a bias to lora_B; retrain with lora_bias=False",
    "trainable_token_indices": "it retrains embedding rows; retrain without it",
    "layer_replication": "it duplicates base-model layers; retrain without it",
    "target_parameters": "it adapts raw parameters (e.g. MoE experts), not linear modules",
    "use_qalora": "QA-LoRA pools the input of lora_A; merge the adapter instead",
    "alora_invocation_tokens": "activated LoRA (aLoRA) switches on mid-sequence; retrain as a plain LoRA",
    "velora_config": "VeLoRA changes the forward pass; retrain as a plain LoRA",
    "monteclora_config": "MonteCLoRA changes the forward pass; retrain as a plain LoRA",
    "use_bdlora": "block-diagonal LoRA is not supported; retrain as a plain LoRA",
    "arrow_config": "Arrow routing is not supported; load the experts as separate adapters",
    "kasa_config": "KaSA changes the forward pass; retrain as a plain LoRA",
}
# init_lora_weights values whose saved factors only work on base weights PEFT modified in place.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass(frozen=True)
class PeftLoraConfig:
    """The fields of a PEFT LoRA config that decide what the adapter computes (PEFT's defaults when absent)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    base_model_name_or_path: str | None


@dataclass(frozen=True)
class ModulePlan:
    """What the config says one targeted module holds: its rank, alpha, scale, and where the rank came from."""

    layer: int
    projection: str
    rank: int
    alpha: float
    scale: float
    rank_field: str  # "r" or "rank_pattern['<key>']", for error messages


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a missing, oversized or malformed file is an AdapterError."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(
                f"{path} is {size} bytes; an adapter config is at most {MAX_CONFIG_BYTES} bytes"
            )
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise AdapterError(f"{path} is missing: an adapter directory needs its {path.name}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc}); re-save the adapter") from exc
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def parse_peft_lora_config(raw: Mapping[str, Any], source: str) -> PeftLoraConfig:
    """Check a config dict for what loramux can serve; `source` names the file in messages."""

    def fail(field: str, problem: str) -> AdapterError:
        return AdapterError(f"{source}: {field} {problem}")

    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise fail("peft_type", f"is {peft_type!r}; loramux serves only LORA adapters of this format")
    for field, why in _UNSUPPORTED_FIELDS.items():
        value = raw.get(field)
        if value:
            raise fail(field, f"= {value!r} is not supported: {why}")
    if raw.get("fan_in_fan_out"):
        raise fail(
            "fan_in_fan_out",
            "= true is not supported: it is for Conv1D models (GPT-2); Llama projections are nn.Linear",
        )
    bias = raw.get("bias", "none")
    if bias != "none":
        raise fail(
            "bias", f"= {bias!r} is not supported: it trains base-model biases; retrain with bias='none'"
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise fail(
            "init_lora_weights",
            f"= {init!r}: these factors only work on base weights that {init} modified; convert the adapter "
            "to plain LoRA with save_pretrained(..., path_initial_model_for_weight_conversion=...)",
        )

    r = _positive_int(raw.get("r", 8), lambda problem: fail("r", problem))
    lora_alpha = _finite_number(raw.get("lora_alpha", 8), lambda problem: fail("lora_alpha", problem))
    rank_pattern = _pattern_dict(raw.get("rank_pattern"), "rank_pattern", fail, _positive_int)
    alpha_pattern = _pattern_dict(raw.get("alpha_pattern"), "alpha_pattern", fail, _finite_number)

    target_modules = _str_or_strs(raw.get("target_modules"), "target_modules", fail)
    if target_modules is None:
        raise fail("target_modules", "is missing; say which projections the adapter adapts")
    exclude_modules = _str_or_strs(raw.get("exclude_modules"), "exclude_modules", fail)
    layers_pattern = _str_or_strs(raw.get("layers_pattern"), "layers_pattern", fail)
    layers_to_transform = _layers(raw.get("layers_to_transform"), fail)
    if isinstance(target_modules, str) and (layers_to_transform is not None or layers_pattern is not None):
        raise fail("layers_to_transform", "cannot be used when target_modules is a string (as in PEFT)")
    name_or_path = raw.get("base_model_name_or_path")
    return PeftLoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=(layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern,
        base_model_name_or_path=name_or_path if isinstance(name_or_path, str) else None,
    )


def plan_modules(config: PeftLoraConfig, spec: BaseModelSpec, source: str) -> dict[str, ModulePlan]:
    """PEFT module name -> plan for every base-model module the config targets (as PEFT would adapt them)."""
    modules = spec.module_names()
    plans: dict[str, ModulePlan] = {}
    for key, (layer, projection) in modules.items():
        if not _is_targeted(config, key, source):
            continue
        r_key = _pattern_key(config.rank_pattern, key, "rank_pattern", source)
        alpha_key = _pattern_key(config.alpha_pattern, key, "alpha_pattern", source)
        rank = config.rank_pattern[r_key] if r_key is not None else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
        rank_field = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
        if rank > spec.max_rank:
            raise AdapterError(
                f"{source}: {rank_field} = {rank} (for {key}) exceeds the server's max rank {spec.max_rank}; "
                "restart the server with a larger --max-rank or use a lower-rank adapter"
            )
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        plans[key] = ModulePlan(layer, projection, rank, alpha, scale, rank_field)
    if isinstance(config.target_modules, tuple):
        for entry in config.target_modules:
            if not any(key == entry or key.endswith(f".{entry}") for key in modules):
                raise AdapterError(
                    f"{source}: target_modules entry {entry!r} matches no adaptable module of the base model; "
                    f"loramux adapts {', '.join(PROJECTIONS)} in model.layers.0-{spec.num_layers - 1}"
                )
    if not plans:
        raise AdapterError(
            f"{source}: target_modules {_show(config.target_modules)} selects no module of the base model "
            f"(after exclude_modules / layers_to_transform); loramux adapts {', '.join(PROJECTIONS)}"
        )
    return plans


def _is_targeted(config: PeftLoraConfig, key: str, source: str) -> bool:
    """PEFT's check_target_module_exists for one module name (modules_to_save is refused earlier)."""
    exclude = config.exclude_modules
    if isinstance(exclude, str):
        if _fullmatch(exclude, key, "exclude_modules", source):
            return False
    elif exclude and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        # "all-linear" means every nn.Linear but the output head: all of our projections.
        return targets.lower() == ALL_LINEAR or _fullmatch(targets, key, "target_modules", source)
    if key in targets:  # an exact module name is taken as is, without the layer filter (as PEFT does)
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or wanted == ():
        return True
    layer_index = _layer_index(key, config.layers_pattern)
    if layer_index is None:
        return False
    return layer_index == wanted if isinstance(wanted, int) else layer_index in wanted


def _layer_index(key: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    # The first numbered segment (PEFT's lazy match), or the number after one of `layers_pattern`.
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_key(patterns: Mapping[str, Any], key: str, field: str, source: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches a dot-bounded suffix of `key`."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return pattern
        except re.error as exc:
            raise AdapterError(
                f"{source}: {field} key {pattern!r} is not a valid regular expression ({exc})"
            ) from exc
    return None


def _fullmatch(pattern: str, key: str, field: str, source: str) -> bool:
    try:
        return re.fullmatch(pattern, key) is not None
    except re.error as exc:
        raise AdapterError(
            f"{source}: {field} {pattern!r} is not a valid regular expression ({exc})"
        ) from exc


def _positive_int(value: Any, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"must be an integer >= 1, got {value!r}")
    return value


def _finite_number(value: Any, fail: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(f"must be a finite number, got {value!r}")
    return float(value)


def _pattern_dict(value: Any, field: str, fail: Any, check: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(field, f"must be an object of module pattern -> value, got {type(value).__name__}")
    return {str(k): check(v, lambda problem, k=k: fail(f"{field}[{k!r}]", problem)) for k, v in value.items()}


def _str_or_strs(value: Any, field: str, fail: Any) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise fail(field, f"must be a string or a list of strings, got {value!r}")


def _layers(value: Any, fail: Any) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise fail("layers_to_transform", f"must be an integer or a list of integers, got {value!r}")


def _show(targets: str | tuple[str, ...]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))
