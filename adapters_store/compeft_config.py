"""`compeft_config.json`: what a ComPEFT directory's config holds, checked field by field before any code is read.

The fields (see adapters_store/compeft.py for the whole format):

    format            "compeft"
    version           1
    base_model        the model the source adapter was trained on (string, or null)
    density           the fraction of tau asked to be kept, in (0, 1]
    alpha             ComPEFT's alpha_c (> 0)
    sigma             std of tau (torch.std, Bessel-corrected: divides by n - 1), >= 0
    gamma             alpha * sigma, the magnitude of every kept entry, <= MAX_ABS_WEIGHT
    source_checksum   "sha256:<hex>" of the source adapter's weights file
    checksum          "sha256:<hex>" of compeft_model.safetensors; the loader compares the file as read
    rice_k            the Golomb-Rice parameter, 0 .. MAX_RICE_K
    total_elements    the length of tau: the sum of every module's rank * (in + out)
    kept              entries kept (nonzero in the reconstruction), 0 .. total_elements
    balanced          optional, default false: each module's A and B were rescaled to equal norms
                      before compressing (B A unchanged); informational, readers need not use it
    modules           one object per adapted module, sorted by PEFT key name, each with
                      layer, projection, rank, in_features, out_features, scale (the LoRA scale:
                      alpha/r, alpha/sqrt(r) with rslora, rank_pattern and alpha_pattern applied)
                      and offset (where its lora_A starts in tau; its lora_B follows at
                      offset + rank * in_features; offsets run contiguously from 0)

Other keys (e.g. "fidelity" and "alpha_search", written by `loramux compress`) are kept for
people and ignored by the loader. This module knows JSON and the base model spec; not bits or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adapters_store.compeft_codec import MAX_RICE_K
from adapters_store.errors import AdapterError, shown
from adapters_store.limits import MAX_ABS_SCALE, MAX_ABS_WEIGHT
from adapters_store.spec import BaseModelSpec, module_name

FORMAT = "compeft"
VERSION = 1
CONFIG_FILE = "compeft_config.json"
GAMMA_REL_TOL = 1e-9  # gamma is written as alpha * sigma; allow only float rounding


@dataclass(frozen=True)
class ModuleLayout:
    """Where one module's A [rank, in] and B [out, rank] sit in tau (row-major, A then B)."""

    layer: int
    projection: str
    rank: int
    in_features: int
    out_features: int
    scale: float
    offset: int  # of A; B starts at offset + rank * in_features

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def sort_key(self) -> str:
        """PEFT's module name: sorting by it sorts by the PEFT key names of its tensors."""
        return module_name(self.layer, self.projection)


@dataclass(frozen=True)
class CompeftConfig:
    base_model: str | None
    density: float
    alpha: float
    sigma: float
    gamma: float
    source_checksum: str
    checksum: str
    rice_k: int
    total_elements: int
    kept: int
    modules: tuple[ModuleLayout, ...]
    balanced: bool = False


def parse_compeft_config(raw: dict[str, Any], spec: BaseModelSpec, source: str) -> CompeftConfig:
    """Check every field of a decoded compeft_config.json; `source` names the file in messages."""

    def fail(field: str, problem: str) -> AdapterError:
        return AdapterError(f"{source}: {field} {problem}")

    if raw.get("format") != FORMAT:
        raise fail("format", f"is {shown(raw.get('format'))}, expected {FORMAT!r}")
    if raw.get("version") != VERSION:
        raise fail("version", f"is {shown(raw.get('version'))}; loramux reads version {VERSION}")
    base_model = raw.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise fail("base_model", f"must be a string or null, got {shown(base_model)}")
    density = _number(raw, "density", fail)
    if not 0 < density <= 1:
        raise fail("density", f"= {density!r} must be in (0, 1]")
    alpha = _number(raw, "alpha", fail)
    if not alpha > 0:
        raise fail("alpha", f"= {alpha!r} must be > 0")
    sigma = _number(raw, "sigma", fail)
    if not sigma >= 0:
        raise fail("sigma", f"= {sigma!r} must be >= 0")
    gamma = _number(raw, "gamma", fail)
    if not 0 <= gamma <= MAX_ABS_WEIGHT:
        raise fail(
            "gamma",
            f"= {gamma!r} is out of range: every kept entry is +-gamma, and loramux accepts "
            f"0 <= gamma <= {MAX_ABS_WEIGHT:g} (the float16 range)",
        )
    if not math.isclose(gamma, alpha * sigma, rel_tol=GAMMA_REL_TOL, abs_tol=0.0):
        raise fail("gamma", f"= {gamma!r} is not alpha * sigma = {alpha * sigma!r}")
    source_checksum, checksum = (_checksum(raw, field, fail) for field in ("source_checksum", "checksum"))
    rice_k = _count(raw, "rice_k", fail)
    if rice_k > MAX_RICE_K:
        raise fail("rice_k", f"= {rice_k} is above {MAX_RICE_K}")
    total = _count(raw, "total_elements", fail)
    kept = _count(raw, "kept", fail)
    if kept > total:
        raise fail("kept", f"= {kept} is more than total_elements = {total}")
    modules = _modules(raw.get("modules"), spec, fail)
    if total != sum(m.numel for m in modules):
        raise fail("total_elements", f"= {total}, but the modules hold {sum(m.numel for m in modules)}")
    balanced = raw.get("balanced", False)
    if not isinstance(balanced, bool):
        raise fail("balanced", f"must be true or false, got {shown(balanced)}")
    return CompeftConfig(
        base_model,
        density,
        alpha,
        sigma,
        gamma,
        source_checksum,
        checksum,
        rice_k,
        total,
        kept,
        modules,
        balanced,
    )


def config_json(config: CompeftConfig) -> dict[str, Any]:
    """The JSON object of `config` (the inverse of parse_compeft_config)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "base_model": config.base_model,
        "density": config.density,
        "alpha": config.alpha,
        "sigma": config.sigma,
        "sigma_estimator": "torch.std, Bessel-corrected (divides by n - 1)",
        "gamma": config.gamma,
        "source_checksum": config.source_checksum,
        "checksum": config.checksum,
        "rice_k": config.rice_k,
        "total_elements": config.total_elements,
        "kept": config.kept,
        "balanced": config.balanced,
        "modules": [
            {
                "layer": m.layer,
                "projection": m.projection,
                "rank": m.rank,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "scale": m.scale,
                "offset": m.offset,
            }
            for m in config.modules
        ],
    }


def _modules(value: Any, spec: BaseModelSpec, fail: Any) -> tuple[ModuleLayout, ...]:
    if not isinstance(value, list) or not value:
        raise fail("modules", "must be a non-empty list of module objects")
    if len(value) > spec.num_layers * len(spec.features):
        raise fail("modules", f"lists {len(value)} modules; the base model has {spec.num_layers} layers")
    modules: list[ModuleLayout] = []
    offset = 0
    for index, entry in enumerate(value):
        field = f"modules[{index}]"
        if not isinstance(entry, dict):
            raise fail(field, f"must be an object, got {shown(entry)}")
        projection = entry.get("projection")
        if not isinstance(projection, str) or projection not in spec.features:
            raise fail(
                f"{field}.projection",
                f"is {shown(projection)}; the base model adapts {', '.join(spec.projections)}",
            )
        layer = _count(entry, "layer", fail, field)
        if layer >= spec.num_layers:
            raise fail(f"{field}.layer", f"= {layer}, but the base model has {spec.num_layers} layers")
        rank = _count(entry, "rank", fail, field)
        if not 1 <= rank <= spec.max_rank:
            raise fail(f"{field}.rank", f"= {rank} must be in [1, {spec.max_rank}] (the server's --max-rank)")
        in_features, out_features = spec.features[projection]
        for name, expected in (("in_features", in_features), ("out_features", out_features)):
            got = _count(entry, name, fail, field)
            if got != expected:
                raise fail(
                    f"{field}.{name}",
                    f"= {got}, but {projection} is {in_features} -> {out_features} in the base model: "
                    "was the adapter compressed for another base model?",
                )
        scale = _number(entry, "scale", fail, field)
        if not abs(scale) <= MAX_ABS_SCALE:
            raise fail(f"{field}.scale", f"= {scale!r}; loramux accepts |scale| <= {MAX_ABS_SCALE:g}")
        given_offset = _count(entry, "offset", fail, field)
        if given_offset != offset:
            raise fail(
                f"{field}.offset", f"= {given_offset}, expected {offset} (modules lie end to end in tau)"
            )
        module = ModuleLayout(layer, projection, rank, in_features, out_features, scale, offset)
        if modules and not modules[-1].sort_key < module.sort_key:
            raise fail(
                field, f"({module.sort_key}) is out of order or repeated; modules are sorted by PEFT key"
            )
        modules.append(module)
        offset += module.numel
    return tuple(modules)


def _number(raw: dict[str, Any], key: str, fail: Any, parent: str = "") -> float:
    value = raw.get(key)
    field = f"{parent}.{key}" if parent else key
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(field, f"must be a number, got {shown(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise fail(field, "is too large") from None
    if not math.isfinite(value):
        raise fail(field, f"= {value!r} must be finite")
    return value


def _count(raw: dict[str, Any], key: str, fail: Any, parent: str = "") -> int:
    value = raw.get(key)
    field = f"{parent}.{key}" if parent else key
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise fail(field, f"must be a non-negative integer, got {shown(value)}")
    return value


def _checksum(raw: dict[str, Any], key: str, fail: Any) -> str:
    value = raw.get(key)
    if not (
        isinstance(value, str)
        and value.startswith("sha256:")
        and len(value) == 71
        and all(c in "0123456789abcdef" for c in value[7:])
    ):
        raise fail(key, f"must be 'sha256:' and 64 lowercase hex digits, got {shown(value)}")
    return value
