"""`loramux export`: the handler that reads an adapter of any format and writes it in another.

Only `--to peft-lora` exists: the adapter is loaded as the server would load it (format detected,
validated against the base model), materialized through `lora_weights()` and written by
`adapters_store.export`. The base model's dims come from its config.json (`--model`, default the
server's default model); no weights are loaded. Returns the exit status: 0 written; 1 the export
could not be done (`error: ...` on stderr). This module does not build parsers (`server/cli.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # adapters_store imports torch: only when the command runs
    from adapters_store.spec import BaseModelSpec


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from adapters_store import AdapterError, load_adapter
    from adapters_store.export import EXPORT_DTYPES, export_peft_lora
    from server.model.arch import UnsupportedModel

    source = Path(args.src)
    try:
        model_name, spec = model_spec(args.model, args.cache_dir)
        label = str(source).rstrip("/") or str(source)
        adapter = load_adapter(source, spec, "export", label=label)
        export_peft_lora(adapter, spec, args.dst, dtype=EXPORT_DTYPES[args.dtype], base_model=model_name)
    except (AdapterError, UnsupportedModel, OSError) as exc:  # OSError: ModelNotFound, DST, the disk
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.dst} (peft-lora, {args.dtype}: {len(adapter.lora_weights())} modules of rank <= "
        f"{adapter.rank}) from the {adapter.format} adapter {source}"
    )
    return 0


def model_spec(model: str | None, cache_dir: str | None) -> tuple[str, BaseModelSpec]:
    """(display name, spec) of `--model` from its config.json; the rank limit is the widest dim."""
    from transformers import AutoConfig

    from server.model.arch import ModelArch
    from server.model.loader import resolve_model_dir

    name, directory = resolve_model_dir(model, cache_dir)
    arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(directory))
    widest = max(arch.hidden_size, arch.intermediate_size, arch.q_size, arch.kv_size)
    # no device slots to size: any rank a file can hold is exportable
    return name, arch.adapter_spec(max_rank=widest)
