"""The router's tables on disk: a JSON header, one small safetensors file of what every adapter
shares, and one file per adapter (its example features, its prototypes, its run-time prompts).

    <path>.json                     version, key, classes, temperature, count, per adapter its
                                    digest / checksum and which file holds the rest
    <path>.safetensors              the head (weight [K, dim], bias) and the feature statistics
    <path>.adapters/<token>.safetensors   train, held ([n, dim]), prototypes ([modules, in]) with
                                    their (layer, projection) keys, mean and spread; run-time
                                    prompts in the file's metadata

An adapter's file is written once, under a fresh token, when what it holds changes; a save after
another adapter is added writes that adapter's file, the header and the shared file (K rows of
the head), not the features and prototypes of all K (about 0.9 MB per adapter on SmolLM2: the
whole tables at 1,000 adapters). What is unchanged is told by identity: the selector and the
prototypes replace an adapter's tensors when they change them and never modify them in place.

Saved after every change, each file written to a temporary name and renamed, the header last,
so a crash leaves the old tables or the new ones, never half of each; files the header no longer
names are deleted after it is renamed (only files this process wrote or read: two processes
saving to one path, replicas sharing a cache, each keep their own tables, the last header wins,
and one that names a file the other deleted is not read back, so that router relearns). At start the
tables are read back only if they were made for the same model and the same way of reading
prompts (`key`); anything else (missing, unreadable, another model) starts the router empty, and
`reconcile` learns what it needs again.

It knows the tables' fields and the files; nothing of routing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from server.router.prototypes import TAP_OF_PROJECTION, AdapterPrototypes
from server.router.selector import Selector
from server.router.tables import Known, Tables

log = logging.getLogger(__name__)

VERSION = 3  # 3: one file per adapter (2: everything in one file; relearned)
PROJECTIONS = tuple(TAP_OF_PROJECTION)  # a prototype's projection, stored as its index here


@dataclass(frozen=True)
class _Held:
    """What one adapter's file holds, by identity (tensors, prototypes) or value (prompts)."""

    train: torch.Tensor | None
    held: torch.Tensor | None
    prototypes: AdapterPrototypes | None
    runtime_prompts: tuple[str, ...]

    def same(self, other: _Held) -> bool:
        return (
            self.train is other.train
            and self.held is other.held
            and self.prototypes is other.prototypes
            and self.runtime_prompts == other.runtime_prompts
        )


class TableFiles:
    """The tables saved at `path` (a .safetensors path: the header and the adapters' folder go
    beside it). One per process and path: it remembers which adapter files are current."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header_path = path.with_suffix(".json")
        self.shared_path = path.with_suffix(".safetensors")
        self.folder = path.with_suffix(".adapters")
        self._files: dict[str, tuple[_Held, str]] = {}  # adapter -> what its file holds, its token
        self._lock = threading.Lock()

    def save(self, tables: Tables, key: dict[str, Any]) -> None:
        with self._lock:
            self._save(tables, key)

    def load(self, key: dict[str, Any], dim: int) -> Tables | None:
        """The saved tables, or None (with a log line saying why) when they cannot be reused."""
        with self._lock:
            return self._load(key, dim)

    # -- saving ------------------------------------------------------------------------------------

    def _save(self, tables: Tables, key: dict[str, Any]) -> None:
        selector = tables.selector
        self.folder.mkdir(parents=True, exist_ok=True)
        names = sorted({*selector.classes, *tables.prototypes, *tables.known})
        files: dict[str, tuple[_Held, str]] = {}
        for name in names:
            known = tables.known.get(name, Known())
            held = _Held(
                selector.train.get(name),
                selector.held.get(name),
                tables.prototypes.get(name),
                known.runtime_prompts,
            )
            previous = self._files.get(name)
            if previous is not None and previous[0].same(held):
                files[name] = previous
            else:
                files[name] = (held, self._write_adapter(held))
        shared = {"weight": selector.weight, "bias": selector.bias, "mean": selector.mean, "m2": selector.m2}
        header = {
            "version": VERSION,
            "key": key,
            "classes": selector.classes,
            "temperature": selector.temperature,
            "count": selector.count,
            "adapters": {
                name: {
                    "file": files[name][1],
                    "examples_digest": tables.known[name].examples_digest if name in tables.known else None,
                    "checksum": tables.known[name].checksum if name in tables.known else None,
                }
                for name in names
            },
        }
        _write(
            self.shared_path, lambda tmp: save_file({k: v.contiguous() for k, v in shared.items()}, str(tmp))
        )
        _write(self.header_path, lambda tmp: tmp.write_text(json.dumps(header)))
        current = {token for _, token in files.values()}
        for _, token in self._files.values():
            if token not in current:
                self._file(token).unlink(missing_ok=True)
        self._files = files

    def _write_adapter(self, held: _Held) -> str:
        tensors: dict[str, torch.Tensor] = {}
        if held.train is not None:
            tensors["train"] = held.train
        if held.held is not None:
            tensors["held"] = held.held
        if held.prototypes is not None:
            keys = sorted(held.prototypes.vectors)
            tensors["prototype_keys"] = torch.tensor(
                [[layer, PROJECTIONS.index(proj)] for layer, proj in keys], dtype=torch.int64
            ).reshape(len(keys), 2)
            tensors["prototype_mean"] = torch.tensor(
                [held.prototypes.mean[k] for k in keys], dtype=torch.float64
            )
            tensors["prototype_spread"] = torch.tensor(
                [held.prototypes.spread[k] for k in keys], dtype=torch.float64
            )
            if keys:
                tensors["prototypes"] = torch.stack([held.prototypes.vectors[k] for k in keys])
        metadata = {"runtime_prompts": json.dumps(list(held.runtime_prompts))}
        token = uuid.uuid4().hex
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        _write(self._file(token), lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))
        return token

    def _file(self, token: str) -> Path:
        return self.folder / f"{token}.safetensors"

    # -- loading -----------------------------------------------------------------------------------

    def _load(self, key: dict[str, Any], dim: int) -> Tables | None:
        if not self.header_path.exists():
            return None
        try:
            header = json.loads(self.header_path.read_text())
            if header.get("version") != VERSION or header.get("key") != key:
                log.info(
                    "router: the saved tables in %s were made for another model, setting or version; "
                    "starting afresh",
                    self.path,
                )
                return None
            shared = load_file(str(self.shared_path))
            selector = Selector(dim)
            selector.classes = list(header["classes"])
            selector.weight, selector.bias = shared["weight"], shared["bias"]
            selector.mean, selector.m2 = shared["mean"], shared["m2"]
            selector.temperature, selector.count = float(header["temperature"]), int(header["count"])
            prototypes: dict[str, AdapterPrototypes] = {}
            known: dict[str, Known] = {}
            files: dict[str, tuple[_Held, str]] = {}
            for name, entry in header["adapters"].items():
                token = str(entry["file"])
                held = _read_adapter(self._file(token))
                if held.train is not None and held.held is not None:
                    selector.train[name], selector.held[name] = held.train, held.held
                if held.prototypes is not None:
                    prototypes[name] = held.prototypes
                if entry["examples_digest"] is not None:
                    known[name] = Known(entry["examples_digest"], held.runtime_prompts, entry["checksum"])
                files[name] = (held, token)
            if any(name not in selector.train for name in selector.classes):
                raise ValueError("an adapter of the head has no examples in its file")
            selector.refresh()
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as exc:
            log.warning("router: cannot read the saved tables in %s (%s); starting afresh", self.path, exc)
            return None
        if selector.weight.shape != (len(selector.classes), dim):
            log.warning("router: the saved tables in %s do not match the model; starting afresh", self.path)
            return None
        self._files = files
        return Tables(selector, prototypes, known)


def _read_adapter(path: Path) -> _Held:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
        metadata = handle.metadata() or {}
    prompts = json.loads(metadata.get("runtime_prompts", "[]"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{path.name}: runtime_prompts is not a list of strings")
    prototypes = None
    if "prototype_keys" in tensors:
        keys = [(int(layer), PROJECTIONS[int(proj)]) for layer, proj in tensors["prototype_keys"].tolist()]
        vectors = tensors.get("prototypes", torch.zeros(0))
        mean, spread = tensors["prototype_mean"].tolist(), tensors["prototype_spread"].tolist()
        prototypes = AdapterPrototypes(
            {k: vectors[j] for j, k in enumerate(keys)},
            dict(zip(keys, mean, strict=True)),
            dict(zip(keys, spread, strict=True)),
        )
    return _Held(tensors.get("train"), tensors.get("held"), prototypes, tuple(prompts))


def _write(path: Path, write: Any) -> None:
    """`write(tmp)` then rename tmp to `path` (atomic on one file system)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
