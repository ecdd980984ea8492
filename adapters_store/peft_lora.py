"""Loading a Hugging Face PEFT LoRA directory (`peft-lora`) into a validated, fp32 host-form adapter.

Reads `adapter_config.json` (see peft_config.py) and `adapter_model.safetensors`, never the
pickled `adapter_model.bin`. The weight file's header is checked first (safetensors_header.py):
key names, that each targeted module has exactly one A and one B, float dtype and shapes
against the base model, and the host form's size against `max_bytes`, so a wrong or oversized
file is refused before its data is read. Then the data is read once and every value checked:
finite and within +-MAX_ABS_WEIGHT. A refused adapter raises AdapterError naming the field,
tensor or file (relative to its adapter root) and leaves no trace. This module knows the PEFT
file layout; it knows no caches or roots.
"""

from __future__ import annotations

import hashlib
import re
from io import BufferedReader
from pathlib import Path

from adapters_store.adapter import LoraAdapter, LoraWeights, ModuleKey
from adapters_store.errors import SHOWN_CHARS, AdapterError, AdapterTooLarge, shown
from adapters_store.peft_config import (
    CONFIG_FILE,
    ModulePlan,
    parse_peft_lora_config,
    plan_modules,
    read_config_json,
)
from adapters_store.safetensors_header import SafetensorsHeader, TensorEntry, read_header
from adapters_store.spec import BaseModelSpec, projection_block
from adapters_store.weights_file import FLOAT_DTYPES, float_tensor, read_data

FORMAT = "peft-lora"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
MiB = 1 << 20

# base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight
_KEY = re.compile(
    r"base_model\.model\.(?P<module>model\.layers\.(?P<layer>[0-9]+)\.\w+\.\w+)\.lora_(?P<ab>[AB])\.weight"
)
_EXPECTED_KEY = "base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight"


def load_peft_lora(
    directory: Path | str,
    spec: BaseModelSpec,
    name: str,
    *,
    label: str | None = None,
    max_bytes: int | None = None,
) -> LoraAdapter:
    """Load and validate the PEFT LoRA adapter in `directory` against `spec`, registered as `name`.

    Returns A [rank, in] and B [out, rank] in fp32 and PEFT's scale for every targeted module.
    label: the directory as messages name it (default its name); max_bytes: the most host memory
    (fp32 factors) the adapter may take, else AdapterTooLarge before its data is read.
    """
    directory = Path(directory)
    label = label or directory.name
    config_source = f"{label}/{CONFIG_FILE}"
    config = parse_peft_lora_config(read_config_json(directory / CONFIG_FILE, config_source), config_source)
    plans = plan_modules(config, spec, config_source)  # also enforces max_rank and the scale bound
    where = f"{label}/{WEIGHTS_FILE}"
    with _open_weights(directory / WEIGHTS_FILE, where) as file:
        header = read_header(file, where)
        entries = _group_by_module(header, plans, spec, where)
        for key, plan in plans.items():
            _check_entries(key, plan, entries[key], spec, where)
        nbytes = 4 * sum(entry.numel for pair in entries.values() for entry in pair)
        if max_bytes is not None and nbytes > max_bytes:
            raise AdapterTooLarge(
                f"{where}: the adapter needs {nbytes / MiB:.1f} MiB of host memory (fp32), more than the "
                f"{max_bytes / MiB:.1f} MiB one adapter may take; raise --max-adapter-mb (at most --host-cache-mb) or use a smaller adapter"
            )
        data = read_data(file, header, where)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    modules: dict[ModuleKey, LoraWeights] = {}
    for key, plan in plans.items():
        a, b = (float_tensor(data, header, entry, where) for entry in entries[key])
        modules[(plan.layer, plan.projection)] = LoraWeights(A=a, B=b, scale=plan.scale)
    del data
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


def _open_weights(path: Path, where: str) -> BufferedReader:
    if not path.is_file():
        pickled = path.with_name(PICKLE_WEIGHTS_FILE)
        if path.is_dir():
            raise AdapterError(f"{where} is a directory; it must be the adapter's safetensors file")
        if path.exists():  # a FIFO, a socket, a device: reading it could block or never end
            raise AdapterError(f"{where} is not a regular file; it must be the adapter's safetensors file")
        if pickled.exists():
            raise AdapterError(
                f"{where.rsplit('/', 1)[0]} holds only {PICKLE_WEIGHTS_FILE}, a pickle, which loramux never "
                f"reads; re-save the adapter with save_pretrained(..., safe_serialization=True) to get "
                f"{WEIGHTS_FILE}"
            )
        raise AdapterError(
            f"{where} is missing: a PEFT LoRA directory needs {WEIGHTS_FILE} beside {CONFIG_FILE}"
        )
    try:
        return path.open("rb")
    except OSError as exc:
        raise AdapterError(f"cannot read {where}: {exc.strerror or type(exc).__name__}") from None


def _group_by_module(
    header: SafetensorsHeader, plans: dict[str, ModulePlan], spec: BaseModelSpec, where: str
) -> dict[str, tuple[TensorEntry, TensorEntry]]:
    """PEFT module name -> (lora_A, lora_B); any key that is not a targeted module's A or B is refused."""
    a_of: dict[str, TensorEntry] = {}
    b_of: dict[str, TensorEntry] = {}
    for key in sorted(header.tensors):
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(
                f"{where}: unexpected tensor {shown(key)}; loramux reads only LoRA factors named {_EXPECTED_KEY} "
                "(no DoRA magnitudes, biases, embeddings or saved modules)"
            )
        module = match["module"]
        if module not in plans:
            raise AdapterError(f"{where}: tensor {shown(key)} is for {_why_not_targeted(module, spec)}")
        (a_of if match["ab"] == "A" else b_of)[module] = header.tensors[key]
    for module in plans:
        for ab, found in (("A", a_of), ("B", b_of)):
            if module not in found:
                raise AdapterError(
                    f"{where}: missing tensor base_model.model.{module}.lora_{ab}.weight; the config targets "
                    f"{module}, so the file must hold its lora_A and lora_B (the file is incomplete)"
                )
    return {module: (a_of[module], b_of[module]) for module in plans}


def _why_not_targeted(module: str, spec: BaseModelSpec) -> str:
    layer_text, block, projection = module.split(".")[2:5]
    module = module if len(module) <= SHOWN_CHARS else shown(module)  # names from the file: bounded
    if projection not in spec.features:
        return f"unknown module {module}: loramux adapts only {', '.join(spec.projections)}"
    if len(layer_text) > 9 or int(layer_text) >= spec.num_layers:
        layer = layer_text if len(layer_text) <= 9 else f"number of {len(layer_text)} digits"
        return f"layer {layer}, but the base model has {spec.num_layers} layers: a different base model?"
    if block != projection_block(projection):
        return f"unknown module {module}: {projection} lives under {projection_block(projection)}"
    return f"{module}, which target_modules does not select; fix adapter_config.json or the file"


def _check_entries(
    key: str, plan: ModulePlan, entries: tuple[TensorEntry, TensorEntry], spec: BaseModelSpec, where: str
) -> None:
    in_features, out_features = spec.features[plan.projection]
    for ab, entry, expected in (
        ("A", entries[0], (plan.rank, in_features)),
        ("B", entries[1], (out_features, plan.rank)),
    ):
        tensor = f"{where}: tensor base_model.model.{key}.lora_{ab}.weight"
        if entry.dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"{tensor} has dtype {entry.dtype}; expected F32, F16 or BF16 (a float tensor)"
            )
        if entry.shape != expected:
            raise AdapterError(
                f"{tensor} has shape {shown(list(entry.shape))}, expected {list(expected)} "
                f"(rank {plan.rank} from {plan.rank_field}, {plan.projection} is {in_features} -> {out_features} "
                "in the base model): was the adapter trained for another base model?"
            )
