"""Reading a PEFT `adapter_config.json` for LoRA, and deciding what it adapts the way PEFT does.

Which modules an adapter targets and with which rank and alpha follows PEFT (peft 0.21):
`check_target_module_exists` (tuners_utils.py) for `target_modules`, `exclude_modules`,
`layers_to_transform` and `layers_pattern`; `get_pattern_key` (utils/other.py) for
`rank_pattern` / `alpha_pattern`; `LoraLayer.update_layer` for the scale (alpha / r, or
alpha / sqrt(r) with `use_rslora`). Its regular expressions run on RE2 (peft_patterns.py).
Fields that change the forward pass beyond plain LoRA, or that need something besides the
LoRA factors, are refused by name, and so are sizes and scales beyond adapters_store.limits.
This module reads JSON only; the weight file is `peft_lora.py`'s business. `source` in every
function is the config file as messages show it (relative to its adapter root).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store import peft_patterns as patterns
from adapters_store.errors import AdapterError, shown
from adapters_store.jsonfile import decode_object
from adapters_store.limits import MAX_ABS_SCALE, MAX_CONFIG_BYTES, MAX_CONFIG_ENTRIES
from adapters_store.spec import PROJECTIONS, BaseModelSpec

CONFIG_FILE = "adapter_config.json"
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


def read_config_json(path: Path, source: str | None = None) -> dict[str, Any]:
    """The JSON object in `path` (`source`: the path as messages show it); a missing, oversized or
    malformed file is an AdapterError."""
    source = source or path.name
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO would block the read
        raise AdapterError(f"{source} is not a regular file; it must be the adapter's JSON config file")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterError(f"{source} is missing: an adapter directory needs its {path.name}") from None
    except IsADirectoryError:
        raise AdapterError(f"{source} is a directory; it must be the adapter's JSON config file") from None
    except OSError as exc:
        raise AdapterError(f"cannot read {source}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{source} is over {MAX_CONFIG_BYTES} bytes; an adapter config is at most that")
    return decode_object(data, source)


def parse_peft_lora_config(raw: Mapping[str, Any], source: str) -> PeftLoraConfig:
    """Check a config dict for what loramux can serve; `source` names the file in messages."""

    def fail(field: str, problem: str) -> AdapterError:
        return AdapterError(f"{source}: {field} {problem}")

    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise fail("peft_type", f"is {shown(peft_type)}; loramux serves only LORA adapters of this format")
    for field, why in _UNSUPPORTED_FIELDS.items():
        value = raw.get(field)
        if value:
            raise fail(field, f"= {shown(value)} is not supported: {why}")
    if raw.get("fan_in_fan_out"):
        raise fail(
            "fan_in_fan_out",
            "= true is not supported: it is for Conv1D models (GPT-2); Llama projections are nn.Linear",
        )
    bias = raw.get("bias", "none")
    if bias != "none":
        raise fail(
            "bias", f"= {shown(bias)} is not supported: it trains base-model biases; retrain with bias='none'"
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise fail(
            "init_lora_weights",
            f"= {shown(init)}: these factors only work on base weights it modified; convert the adapter "
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
        use_rslora=_boolean(raw.get("use_rslora", False), lambda problem: fail("use_rslora", problem)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=(layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern,
        base_model_name_or_path=name_or_path if isinstance(name_or_path, str) else None,
    )


@dataclass(frozen=True)
class _Matchers:
    """The config's patterns compiled once by RE2 (PEFT compiles them per module name)."""

    target: patterns.Regex | None  # target_modules as a string (full match), else None
    exclude: patterns.Regex | None  # exclude_modules as a string (full match), else None
    rank_keys: tuple[tuple[str, patterns.Regex], ...]
    alpha_keys: tuple[tuple[str, patterns.Regex], ...]
    layers: tuple[patterns.Regex, ...]

    @classmethod
    def compile(cls, config: PeftLoraConfig, source: str) -> _Matchers:
        def full(value: Any, field: str) -> patterns.Regex | None:
            return patterns.compile_pattern(value, field, source) if isinstance(value, str) else None

        def keys(pattern_dict: Mapping[str, Any], field: str) -> tuple[tuple[str, patterns.Regex], ...]:
            return tuple((key, patterns.suffix_pattern(key, f"{field} key", source)) for key in pattern_dict)

        all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
        return cls(
            target=None if all_linear else full(config.target_modules, "target_modules"),
            exclude=full(config.exclude_modules, "exclude_modules"),
            rank_keys=keys(config.rank_pattern, "rank_pattern"),
            alpha_keys=keys(config.alpha_pattern, "alpha_pattern"),
            layers=patterns.layer_patterns(config.layers_pattern, source),
        )


def plan_modules(config: PeftLoraConfig, spec: BaseModelSpec, source: str) -> dict[str, ModulePlan]:
    """PEFT module name -> plan for every base-model module the config targets (as PEFT would adapt them)."""
    matchers = _Matchers.compile(config, source)
    modules = spec.module_names()
    plans: dict[str, ModulePlan] = {}
    for key in modules:
        if _is_targeted(config, matchers, key):
            plans[key] = _plan(config, matchers, spec, key, source)
    if isinstance(config.target_modules, tuple):
        for entry in config.target_modules:
            if not any(key == entry or key.endswith(f".{entry}") for key in modules):
                raise AdapterError(
                    f"{source}: target_modules entry {shown(entry)} matches no adaptable module of the base "
                    f"model; loramux adapts {', '.join(PROJECTIONS)} in model.layers.0-{spec.num_layers - 1}"
                )
    if not plans:
        raise AdapterError(
            f"{source}: target_modules {_show(config.target_modules)} selects no module of the base model "
            f"(after exclude_modules / layers_to_transform); loramux adapts {', '.join(PROJECTIONS)}"
        )
    return plans


def _plan(
    config: PeftLoraConfig, matchers: _Matchers, spec: BaseModelSpec, key: str, source: str
) -> ModulePlan:
    """One targeted module's rank, alpha and scale, checked against max_rank and MAX_ABS_SCALE."""
    layer, projection = _layer_and_projection(key)
    r_key = patterns.first_matching(matchers.rank_keys, key)
    alpha_key = patterns.first_matching(matchers.alpha_keys, key)
    rank = config.rank_pattern[r_key] if r_key is not None else config.r
    alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
    rank_field = f"rank_pattern[{shown(r_key)}]" if r_key is not None else "r"
    alpha_field = f"alpha_pattern[{shown(alpha_key)}]" if alpha_key is not None else "lora_alpha"
    if rank > spec.max_rank:
        raise AdapterError(
            f"{source}: {rank_field} = {shown(rank)} (for {key}) exceeds the server's max rank {spec.max_rank}; "
            "restart the server with a larger --max-rank or use a lower-rank adapter"
        )
    scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    if not abs(scale) <= MAX_ABS_SCALE:
        how = "sqrt(rank)" if config.use_rslora else "rank"
        raise AdapterError(
            f"{source}: {alpha_field} = {alpha:g} with {rank_field} = {rank} gives {key} a scale of "
            f"{scale:g} (alpha / {how}); loramux accepts |scale| <= {MAX_ABS_SCALE:g}, beyond which the "
            "adapter's output cannot stay finite: fix lora_alpha"
        )
    return ModulePlan(layer, projection, rank, alpha, scale, rank_field)


def _layer_and_projection(key: str) -> tuple[int, str]:
    # key is one of BaseModelSpec.module_names(): model.layers.{i}.{block}.{projection}
    parts = key.split(".")
    return int(parts[2]), parts[4]


def _is_targeted(config: PeftLoraConfig, matchers: _Matchers, key: str) -> bool:
    """PEFT's check_target_module_exists for one module name (modules_to_save is refused earlier)."""
    exclude = config.exclude_modules
    if matchers.exclude is not None:
        if patterns.fullmatches(matchers.exclude, key):
            return False
    elif exclude and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        # "all-linear" means every nn.Linear but the output head: all of our projections.
        return matchers.target is None or patterns.fullmatches(matchers.target, key)
    if key in targets:  # an exact module name is taken as is, without the layer filter (as PEFT does)
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or wanted == ():
        return True
    layer_index = patterns.layer_index(matchers.layers, key)
    if layer_index is None:
        return False
    return layer_index == wanted if isinstance(wanted, int) else layer_index in wanted


def _positive_int(value: Any, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"must be an integer >= 1, got {shown(value)}")
    return value


def _boolean(value: Any, fail: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(f"must be true or false, got {shown(value)}")
    return value


def _finite_number(value: Any, fail: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"must be a finite number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise fail(f"must be a finite number, got {shown(value)}")
    return number


def _pattern_dict(value: Any, field: str, fail: Any, check: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(field, f"must be an object of module pattern -> value, got {type(value).__name__}")
    _check_count(value, field, fail)
    return {
        str(k): check(v, lambda problem, k=k: fail(f"{field}[{shown(k)}]", problem)) for k, v in value.items()
    }


def _str_or_strs(value: Any, field: str, fail: Any) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        _check_count(value, field, fail)
        return tuple(value)
    raise fail(field, f"must be a string or a list of strings, got {shown(value)}")


def _layers(value: Any, fail: Any) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        _check_count(value, "layers_to_transform", fail)
        return tuple(value)
    raise fail("layers_to_transform", f"must be an integer or a list of integers, got {shown(value)}")


def _check_count(value: list[Any] | dict[str, Any], field: str, fail: Any) -> None:
    if len(value) > MAX_CONFIG_ENTRIES:
        raise fail(field, f"has {len(value)} entries; loramux reads at most {MAX_CONFIG_ENTRIES}")


def _show(targets: str | tuple[str, ...]) -> str:
    return shown(targets) if isinstance(targets, str) else shown(list(targets))
