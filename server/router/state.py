"""The router's tables on disk: one safetensors file (tensors) and a JSON file beside it (the rest).

Saved after every change, written to temporary files and renamed, so a crash leaves the old
tables or the new ones, never half of each. At start the tables are read back only if they were
made for the same model and the same way of reading prompts (`key`); anything else (missing,
unreadable, another model) starts the router empty, and `reconcile` learns what it needs again.

It knows the tables' fields and the files; nothing of routing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from server.router.prototypes import AdapterPrototypes
from server.router.selector import Selector
from server.router.tables import Known, Tables

log = logging.getLogger(__name__)

VERSION = 2  # 2: the head became the LDA discriminant + a correction (version 1 tables are relearned)


def save_tables(path: Path, tables: Tables, key: dict[str, Any]) -> None:
    selector = tables.selector
    tensors = {
        "weight": selector.weight,
        "bias": selector.bias,
        "mean": selector.mean,
        "m2": selector.m2,
    }
    for i, name in enumerate(selector.classes):
        tensors[f"train.{i}"] = selector.train[name]
        tensors[f"held.{i}"] = selector.held[name]
    prototypes: dict[str, list[list[Any]]] = {}  # name -> [layer, projection, mean, spread] per module
    for i, (name, adapter) in enumerate(sorted(tables.prototypes.items())):
        keys = sorted(adapter.vectors)
        prototypes[name] = [
            [layer, proj, adapter.mean[(layer, proj)], adapter.spread[(layer, proj)]] for layer, proj in keys
        ]
        if keys:
            tensors[f"prototypes.{i}"] = torch.stack([adapter.vectors[k] for k in keys])
    header = {
        "version": VERSION,
        "key": key,
        "classes": selector.classes,
        "temperature": selector.temperature,
        "count": selector.count,
        "prototypes": prototypes,
        "known": {
            name: {
                "examples_digest": k.examples_digest,
                "runtime_prompts": list(k.runtime_prompts),
                "checksum": k.checksum,
            }
            for name, k in sorted(tables.known.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors_tmp, header_tmp = path.with_suffix(".safetensors.tmp"), path.with_suffix(".json.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensors_tmp))
    header_tmp.write_text(json.dumps(header))
    os.replace(tensors_tmp, path.with_suffix(".safetensors"))
    os.replace(header_tmp, path.with_suffix(".json"))


def load_tables(path: Path, key: dict[str, Any], dim: int) -> Tables | None:
    """The saved tables, or None (with a log line saying why) when they cannot be reused."""
    header_path, tensors_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not header_path.exists():
        return None
    try:
        header = json.loads(header_path.read_text())
        if header.get("version") != VERSION or header.get("key") != key:
            log.info(
                "router: the saved tables in %s were made for another model or setting; starting afresh", path
            )
            return None
        tensors = load_file(str(tensors_path))
        selector = Selector(dim)
        selector.classes = list(header["classes"])
        selector.weight, selector.bias = tensors["weight"], tensors["bias"]
        selector.mean, selector.m2 = tensors["mean"], tensors["m2"]
        selector.temperature, selector.count = float(header["temperature"]), int(header["count"])
        for i, name in enumerate(selector.classes):
            selector.train[name], selector.held[name] = tensors[f"train.{i}"], tensors[f"held.{i}"]
        selector.refresh()
        prototypes = {}
        for i, (name, rows) in enumerate(sorted(header["prototypes"].items())):
            stacked = tensors[f"prototypes.{i}"] if rows else torch.zeros(0)
            keys = [(int(row[0]), str(row[1])) for row in rows]
            prototypes[name] = AdapterPrototypes(
                {k: stacked[j] for j, k in enumerate(keys)},
                {k: float(row[2]) for k, row in zip(keys, rows, strict=True)},
                {k: float(row[3]) for k, row in zip(keys, rows, strict=True)},
            )
        known = {
            name: Known(k["examples_digest"], tuple(k["runtime_prompts"]), k["checksum"])
            for name, k in header["known"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as exc:
        log.warning("router: cannot read the saved tables in %s (%s); starting afresh", path, exc)
        return None
    if selector.weight.shape != (len(selector.classes), dim):
        log.warning("router: the saved tables in %s do not match the model; starting afresh", path)
        return None
    return Tables(selector, prototypes, known)
