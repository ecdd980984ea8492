"""`compeft_config.json`: what a ComPEFT directory's config holds, checked field by field before any code is read.

The fields (see adapters_store/compeft.py for the whole format):

    format            "compeft"
    version           2
    base_model        the model the source adapter was trained on (string, or null)
    density           the fraction of tau asked to be kept, in (0, 1]
    alpha             ComPEFT's alpha_c (> 0)
    sigma             std of tau (torch.std, Bessel-corrected: divides by n - 1), >= 0
    gamma             alpha * sigma, the magnitude of every kept entry, <= MAX_ABS_WEIGHT
    source_checksum   "sha256:<hex>" of the source adapter's weights file
    checksum          "sha256:<hex>" of compeft_model.safetensors; the loader compares the file as read
    rice_k            the Golomb-Rice parameter, 0 .. MAX_RICE_K
    total_elements    the length of tau: the sum over the adapted modules of rank * (in + out)
    kept              entries kept (nonzero in the reconstruction), 0 .. total_elements
    factors           optional: how each module's A and B were re-factored before compressing, B A
                      unchanged (informational, readers need not use it): "as-trained" (ComPEFT as
                      published), "balanced" (A and B rescaled to equal norms) or "svd" (B A's
                      canonical factors, B = U sqrt(S), A = sqrt(S) V^T); absent: from "balanced"
    balanced          optional, default false: true when factors is "balanced" or "svd" (the older
                      field, still written for readers that know only it)
    modules           the adapted modules, a non-empty list of groups, one per (projection, rank, scale):
                          {"projection": "q_proj", "rank": 3, "scale": 2.0, "layers": [0, 1, 2]}
                      projection   one of the base model's projections (q_proj .. down_proj)
                      rank         the LoRA rank r of every module in the group, 1 .. the server's max rank
                      scale        their LoRA scale: alpha/r, alpha/sqrt(r) with rslora, rank_pattern
                                   and alpha_pattern applied; finite, |scale| <= MAX_ABS_SCALE
                      layers       non-empty list of layer indices, 0 .. num_layers - 1, any order
                                   (writers sort them)
                      A (layer, projection) is in at most one group; groups come in any order
                      (writers sort them by projection as listed above, then by first layer).

Nothing else about a module is stored; a reader derives it. A module's A is [rank, in_features]
and its B [out_features, rank], with in_features and out_features those of the projection in the
base model (a config for another base model fails on total_elements or on the code sizes).
Where each module sits in tau is fixed by its PEFT name (see adapters_store/compeft.py).

Version 1 (one object per module, with its in/out features and offset) was never released; this
loader refuses it and asks for the adapter to be compressed again. Other keys (e.g. "fidelity"
and "alpha_search", written by `loramux compress`; "alpha_source" and "alpha_validation", written
by tasks.compeft_alpha when it re-picks alpha by a task metric) are kept for people and ignored by
the loader.
This module knows JSON and the base model spec; not bits or files.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from adapters_store.compeft_codec import MAX_RICE_K
from adapters_store.errors import AdapterError, shown
from adapters_store.limits import MAX_ABS_SCALE, MAX_ABS_WEIGHT
from adapters_store.spec import PROJECTIONS, BaseModelSpec, module_name

FORMAT = "compeft"
VERSION = 2
FACTOR_FORMS = ("as-trained", "balanced", "svd")  # how A and B were re-factored before compressing
CONFIG_FILE = "compeft_config.json"
GAMMA_REL_TOL = 1e-9  # gamma is written as alpha * sigma; allow only float rounding


@dataclass(frozen=True)
class ModuleLayout:
    """Where one module's A [rank, in] and B [out, rank] sit in tau (row-major, A then B).

    Derived when a config is read, never stored: offsets run end to end in PEFT-name order."""

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
    modules: tuple[ModuleLayout, ...]  # sorted by PEFT name, end to end in tau from 0
    factors: str = "as-trained"  # one of FACTOR_FORMS


def parse_compeft_config(raw: dict[str, Any], spec: BaseModelSpec, source: str) -> CompeftConfig:
    """Check every field of a decoded compeft_config.json; `source` names the file in messages."""

    def fail(field: str, problem: str) -> AdapterError:
        return AdapterError(f"{source}: {field} {problem}")

    if raw.get("format") != FORMAT:
        raise fail("format", f"is {shown(raw.get('format'))}, expected {FORMAT!r}")
    version = raw.get("version")
    if version != VERSION:
        again = "; it was written by an older loramux: run `loramux compress` on the source adapter again"
        raise fail(
            "version", f"is {shown(version)}; loramux reads version {VERSION}{again if version == 1 else ''}"
        )
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
        raise fail(
            "total_elements",
            f"= {total}, but the modules hold {sum(m.numel for m in modules)} with the base model's "
            "projection sizes: was the adapter compressed for another base model?",
        )
    balanced = raw.get("balanced", False)
    if not isinstance(balanced, bool):
        raise fail("balanced", f"must be true or false, got {shown(balanced)}")
    factors = raw.get("factors", "balanced" if balanced else "as-trained")
    if factors not in FACTOR_FORMS:
        raise fail("factors", f"is {shown(factors)}, expected one of {', '.join(map(repr, FACTOR_FORMS))}")
    if balanced != (factors != "as-trained"):
        raise fail("balanced", f"= {balanced} contradicts factors = {factors!r}")
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
        factors,
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
        "factors": config.factors,
        "balanced": config.factors != "as-trained",
        "modules": module_groups(config.modules),
    }


def module_groups(modules: tuple[ModuleLayout, ...]) -> list[dict[str, Any]]:
    """`modules` as the config's groups: one per (projection, rank, scale), layers sorted; groups
    sorted by projection (in PROJECTIONS order), then by first layer."""
    layers: dict[tuple[str, int, float], list[int]] = {}
    for m in modules:
        layers.setdefault((m.projection, m.rank, m.scale), []).append(m.layer)
    groups = [
        {"projection": projection, "rank": rank, "scale": scale, "layers": sorted(group)}
        for (projection, rank, scale), group in layers.items()
    ]
    return sorted(groups, key=lambda g: (PROJECTIONS.index(g["projection"]), g["layers"][0]))


def config_text(document: dict[str, Any]) -> str:
    """`document` as the text of compeft_config.json: indented by 2, except that a list or object
    of plain values (or of lists of plain values), e.g. a module group, is written on one line."""
    return _json_text(document, "") + "\n"


def _json_text(value: Any, indent: str) -> str:
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not any(isinstance(item, dict) or _nested_list(item) for item in items):
        return json.dumps(value)
    inner = indent + "  "
    if isinstance(value, dict):
        lines = [f"{inner}{json.dumps(key)}: {_json_text(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(lines) + f"\n{indent}}}"
    lines = [inner + _json_text(item, inner) for item in value]
    return "[\n" + ",\n".join(lines) + f"\n{indent}]"


def _nested_list(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(item, dict | list) for item in value)


def _modules(value: Any, spec: BaseModelSpec, fail: Any) -> tuple[ModuleLayout, ...]:
    """The groups of `value` checked, then expanded into every module's layout in tau."""
    most = spec.num_layers * len(spec.features)  # each group holds at least one distinct module
    if not isinstance(value, list) or not value:
        raise fail("modules", "must be a non-empty list of module groups")
    if len(value) > most:
        raise fail("modules", f"lists {len(value)} groups; the base model has only {most} modules to adapt")
    seen: dict[tuple[int, str], int] = {}  # (layer, projection) -> the group that lists it
    modules = []
    for index, group in enumerate(value):
        field = f"modules[{index}]"
        if not isinstance(group, dict):
            raise fail(field, f"must be an object, got {shown(group)}")
        projection = group.get("projection")
        if not isinstance(projection, str) or projection not in spec.features:
            raise fail(
                f"{field}.projection",
                f"is {shown(projection)}; the base model adapts {', '.join(spec.projections)}",
            )
        rank = _count(group, "rank", fail, field)
        if not 1 <= rank <= spec.max_rank:
            raise fail(f"{field}.rank", f"= {rank} must be in [1, {spec.max_rank}] (the server's --max-rank)")
        scale = _number(group, "scale", fail, field)
        if not abs(scale) <= MAX_ABS_SCALE:
            raise fail(f"{field}.scale", f"= {scale!r}; loramux accepts |scale| <= {MAX_ABS_SCALE:g}")
        layers = group.get("layers")
        if not isinstance(layers, list) or not layers:
            raise fail(f"{field}.layers", f"must be a non-empty list of layer indices, got {shown(layers)}")
        if len(layers) > spec.num_layers:
            raise fail(f"{field}.layers", f"lists {len(layers)} layers; the base model has {spec.num_layers}")
        in_features, out_features = spec.features[projection]
        for position, layer in enumerate(layers):
            where = f"{field}.layers[{position}]"
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.num_layers:
                raise fail(
                    where, f"is {shown(layer)}; layers run 0 .. {spec.num_layers - 1} in the base model"
                )
            if (layer, projection) in seen:
                raise fail(
                    where,
                    f"= {layer}: layer {layer} {projection} is already in modules[{seen[layer, projection]}]; "
                    "a module is in one group only",
                )
            seen[layer, projection] = index
            modules.append(ModuleLayout(layer, projection, rank, in_features, out_features, scale, 0))
    modules.sort(key=lambda m: m.sort_key)
    offsets = itertools.accumulate((m.numel for m in modules[:-1]), initial=0)
    return tuple(replace(m, offset=offset) for m, offset in zip(modules, offsets, strict=True))


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
