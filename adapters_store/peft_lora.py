"""Loading a Hugging Face PEFT LoRA directory (`peft-lora`) into a validated, fp32 host-form adapter.

Reads `adapter_config.json` (see peft_config.py) and `adapter_model.safetensors`, never the
pickled `adapter_model.bin`. Every tensor is checked before anything is returned: key names,
that each targeted module has exactly one A and one B, shapes against the base model, float
dtype, finite values. A refused adapter raises AdapterError naming the field, tensor or file,
and leaves no trace. This module knows the PEFT file layout; it knows no caches or roots.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import safetensors.torch
import torch

from adapters_store.adapter import LoraAdapter, LoraWeights, ModuleKey
from adapters_store.errors import AdapterError
from adapters_store.peft_config import (
    CONFIG_FILE,
    ModulePlan,
    parse_peft_lora_config,
    plan_modules,
    read_config_json,
)
from adapters_store.spec import BaseModelSpec, projection_block

FORMAT = "peft-lora"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight
_KEY = re.compile(
    r"base_model\.model\.(?P<module>model\.layers\.(?P<layer>\d+)\.\w+\.\w+)\.lora_(?P<ab>[AB])\.weight"
)
_EXPECTED_KEY = "base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight"


def load_peft_lora(directory: Path | str, spec: BaseModelSpec, name: str) -> LoraAdapter:
    """Load and validate the PEFT LoRA adapter in `directory` against `spec`, registered as `name`.

    Returns A [rank, in] and B [out, rank] in fp32 and PEFT's scale for every targeted module.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = parse_peft_lora_config(read_config_json(config_path), str(config_path))
    weights_path = directory / WEIGHTS_FILE
    plans = plan_modules(config, spec, str(config_path))  # also enforces max_rank

    data = _read_weights(weights_path)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and a few builtins) on bad input
        raise AdapterError(
            f"{weights_path} is not a valid safetensors file ({exc}); it may be truncated or corrupt: "
            "copy or save the adapter again"
        ) from exc
    del data

    factors = _group_by_module(tensors, plans, spec, weights_path)
    modules: dict[ModuleKey, LoraWeights] = {}
    for key, plan in plans.items():
        a, b = factors[key]
        modules[(plan.layer, plan.projection)] = _check_module(key, plan, a, b, spec, weights_path)
    return LoraAdapter(
        name=name,
        format=FORMAT,
        source=directory,
        checksum=checksum,
        nbytes=sum(m.nbytes for m in modules.values()),
        rank=max(m.rank for m in modules.values()),
        target_modules=tuple(p for p in spec.projections if any(proj == p for _, proj in modules)),
        modules=modules,
    )


def _read_weights(path: Path) -> bytes:
    if not path.is_file():
        pickled = path.with_name(PICKLE_WEIGHTS_FILE)
        if pickled.exists():
            raise AdapterError(
                f"{path.parent} holds only {PICKLE_WEIGHTS_FILE}, a pickle, which loramux never reads; "
                f"re-save the adapter with save_pretrained(..., safe_serialization=True) to get {WEIGHTS_FILE}"
            )
        raise AdapterError(
            f"{path} is missing: a PEFT LoRA directory needs {WEIGHTS_FILE} beside {CONFIG_FILE}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _group_by_module(
    tensors: dict[str, torch.Tensor], plans: dict[str, ModulePlan], spec: BaseModelSpec, path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT module name -> (lora_A, lora_B); any key that is not a targeted module's A or B is refused."""
    a_of: dict[str, torch.Tensor] = {}
    b_of: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(
                f"{path}: unexpected tensor {key!r}; loramux reads only LoRA factors named {_EXPECTED_KEY} "
                "(no DoRA magnitudes, biases, embeddings or saved modules)"
            )
        module = match["module"]
        if module not in plans:
            raise AdapterError(f"{path}: tensor {key!r} is for {_why_not_targeted(module, spec)}")
        (a_of if match["ab"] == "A" else b_of)[module] = tensors[key]
    for module in plans:
        for ab, found in (("A", a_of), ("B", b_of)):
            if module not in found:
                raise AdapterError(
                    f"{path}: missing tensor base_model.model.{module}.lora_{ab}.weight; the config targets "
                    f"{module}, so the file must hold its lora_A and lora_B (the file is incomplete)"
                )
    return {module: (a_of[module], b_of[module]) for module in plans}


def _why_not_targeted(module: str, spec: BaseModelSpec) -> str:
    layer_text, block, projection = module.split(".")[2:5]
    layer = int(layer_text)
    if projection not in spec.features:
        return f"unknown module {module}: loramux adapts only {', '.join(spec.projections)}"
    if layer >= spec.num_layers:
        return f"layer {layer}, but the base model has {spec.num_layers} layers: a different base model?"
    if block != projection_block(projection):
        return f"unknown module {module}: {projection} lives under {projection_block(projection)}"
    return f"{module}, which target_modules does not select; fix adapter_config.json or the file"


def _check_module(
    key: str, plan: ModulePlan, a: torch.Tensor, b: torch.Tensor, spec: BaseModelSpec, path: Path
) -> LoraWeights:
    in_features, out_features = spec.features[plan.projection]
    for ab, tensor, expected in (
        ("A", a, (plan.rank, in_features)),
        ("B", b, (out_features, plan.rank)),
    ):
        where = f"{path}: tensor base_model.model.{key}.lora_{ab}.weight"
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{where} has dtype {tensor.dtype}; expected float32, float16 or bfloat16")
        if tuple(tensor.shape) != expected:
            raise AdapterError(
                f"{where} has shape {list(tensor.shape)}, expected {list(expected)} "
                f"(rank {plan.rank} from {plan.rank_field}, {plan.projection} is {in_features} -> {out_features} "
                "in the base model): was the adapter trained for another base model?"
            )
    # Upcast at once: fp32 is the host form (and bf16 is computed wrongly by some CPU paths).
    a32 = a.to(torch.float32).contiguous()
    b32 = b.to(torch.float32).contiguous()
    for ab, tensor in (("A", a32), ("B", b32)):
        # One sum is finite when every value is (fp32 cannot overflow on adapter-sized values; if
        # it did, the exact check below runs and passes): ~10x cheaper than isfinite().all() per tensor.
        if bool(torch.isfinite(tensor.sum())):
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(
                f"{path}: tensor base_model.model.{key}.lora_{ab}.weight holds {bad} non-finite values (NaN or inf)"
            )
    return LoraWeights(A=a32, B=b32, scale=plan.scale)
