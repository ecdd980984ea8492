"""Turn a ServerConfig into a ready (not yet started) Engine: device, dtype, model, tokenizer."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from server.config import ServerConfig
from server.engine.engine import Engine
from server.model.loader import load_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16/int8 matmuls are several times slower than fp32 on CPUs; fp32 is the CPU dtype.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def build_engine(config: ServerConfig) -> Engine:
    """Load the model and allocate the engine on a short-lived thread (see below)."""
    # Why a thread: libgomp keeps an OpenMP worker pool per thread that ran parallel torch code,
    # and once it manages more threads than there are CPUs it stops spin-waiting between parallel
    # regions. A pool left on the main thread by loading made every engine step ~1.7x slower on
    # 2 cores; the pool of this thread is freed when it exits, before the engine thread starts.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-load") as loader:
        return loader.submit(_build, config).result()


def _build(config: ServerConfig) -> Engine:
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    loaded = load_model(config.model, device, dtype, config.engine.max_model_len, config.cache_dir)
    log.info("loaded %s from %s on %s (%s)", loaded.name, loaded.directory, device, dtype)
    return Engine(loaded, config.engine)
