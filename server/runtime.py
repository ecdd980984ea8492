"""Turn a ServerConfig into a ready (not yet started) Engine: device, dtype, model, tokenizer."""

from __future__ import annotations

import copy
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from adapters_store import AdapterRoots, AdapterStore, BaseModelSpec
from adapters_store.compact_pools import CompeftSlotPool, MosSlotPool
from adapters_store.device_slots import DeviceSlots
from adapters_store.slot_pools import LoraSlotPool, SlotPool
from kernels import LoraBackend, select_backend
from kernels.model_ops import FusedCpuOps
from server.allocator import keep_freed_memory
from server.config import AdapterConfig, ServerConfig
from server.cpus import default_threads
from server.engine.adapters import FUSED_PROJECTIONS, AdapterManager
from server.engine.engine import Engine
from server.engine.events import EngineEvents
from server.engine.threads import ThreadGovernor
from server.model.llama import LlamaModel
from server.model.loader import cache_root, load_model
from server.prompts import chat_prompt_ids

if TYPE_CHECKING:
    from server.router.router import Router

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


def build_engine(config: ServerConfig, events: EngineEvents | None = None) -> Engine:
    """Load the model and allocate the engine on a short-lived thread (see below).

    `events` observes the engine (the server's metrics); the caller also has it watch
    `engine.snapshot` where it needs gauges.
    """
    # One process-wide count: every thread that runs torch ops (the loader, the engine) takes it
    # on its first parallel call. The default leaves out CPUs a cgroup quota would throttle.
    # How the threads wait (OMP_WAIT_POLICY) was fixed when torch loaded; see server/cpus.py.
    keep_freed_memory()  # before the model loads: large temporaries reused, not faulted in anew
    threads = config.threads or default_threads(os.environ)
    torch.set_num_threads(threads)
    log.info(
        "%d intra-op threads (%s), OMP_WAIT_POLICY=%s",
        threads,
        "--threads" if config.threads else "OMP_NUM_THREADS or the CPUs usable",
        os.environ.get("OMP_WAIT_POLICY", "unset"),
    )
    # Why a thread: libgomp keeps an OpenMP worker pool per thread that ran parallel torch code,
    # and once it manages more threads than there are CPUs it stops spin-waiting between parallel
    # regions. A pool left on the main thread by loading made every engine step ~1.7x slower on
    # 2 cores; the pool of this thread is freed when it exits, before the engine thread starts.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-load") as loader:
        engine = loader.submit(_build, config, events).result()
    if device_is_cpu(config) and not config.threads:  # an explicit --threads is kept as given
        engine.governor = ThreadGovernor(threads, torch.set_num_threads)
    return engine


def device_is_cpu(config: ServerConfig) -> bool:
    return pick_device(config.device).type == "cpu"


def _build(config: ServerConfig, events: EngineEvents | None) -> Engine:
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    loaded = load_model(
        config.model,
        device,
        dtype,
        config.engine.max_model_len,
        config.cache_dir,
        kernels=config.model_kernels,
    )
    log.info(
        "loaded %s from %s on %s (%s, %s model kernels)",
        loaded.name,
        loaded.directory,
        device,
        dtype,
        loaded.model.ops.name,
    )
    return Engine(loaded, config.engine, build_adapters(loaded.model, config.adapters), events)


def build_adapters(model: LlamaModel, config: AdapterConfig) -> AdapterManager | None:
    """The adapter tiers over `model` (roots -> host cache -> device slots), or None for --max-slots 0."""
    if config.max_slots == 0:
        return None
    spec = model.arch.adapter_spec(config.max_rank)
    device = model.embed_tokens.device
    # The fused LoRA gather comes with the model's fused CPU kernels (--model-kernels).
    backend = select_backend(device, fused_gather=isinstance(model.ops, FusedCpuOps))
    store = AdapterStore(
        spec, AdapterRoots(config.roots), config.host_cache_mb << 20, (config.max_adapter_mb << 20) or None
    )
    pools = slot_pools(spec, config, backend, device, model.dtype)
    log.info(
        "adapters: device slots %s (%s kernels), roots %s",
        ", ".join(f"{pool.num_slots} {pool.kind}" for pool in pools),
        backend.name,
        ", ".join(config.roots) or "none",
    )
    return AdapterManager.attach(model, store, DeviceSlots(pools))


def slot_pools(
    spec: BaseModelSpec, config: AdapterConfig, backend: LoraBackend, device: torch.device, dtype: torch.dtype
) -> list[SlotPool]:
    """The LoRA pools of `config.pool_shapes`; with the triton backend also one MoS and one ComPEFT
    pool of --max-slots slots each, whose kernels read those formats' compact forms (a slot of either
    costs a fraction of a LoRA slot of --max-rank, so DeviceSlots puts the adapters they accept there).
    Elsewhere MoS and ComPEFT adapters are materialized into LoRA slots."""
    pools: list[SlotPool] = [
        LoraSlotPool(spec, FUSED_PROJECTIONS, num_slots, backend, device, dtype, max_rank=rank)
        for rank, num_slots in config.pool_shapes
    ]
    if backend.name == "triton":
        pools.append(MosSlotPool(spec, FUSED_PROJECTIONS, config.max_slots, backend, device, dtype))
        pools.append(CompeftSlotPool(spec, FUSED_PROJECTIONS, config.max_slots, backend, device))
    return pools


def build_router(engine: Engine, config: ServerConfig) -> Router | None:
    """The router serving `auto` over `engine`'s base model and adapters, its saved tables read back
    (None when adapters are off or the router is disabled). Call `reconcile()` before relying on it."""
    from server.router.features import FeatureReader, chat_template_edges
    from server.router.router import Router, StoreSource

    settings = config.router
    if engine.adapters is None or not settings.enabled:
        return None
    if settings.state_path is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in engine.info.model_name)
        state = cache_root(config.cache_dir) / "router" / f"{safe}.safetensors"
        settings = replace(settings, state_path=str(state))
    tokenizer = copy.deepcopy(engine.tokenizer)  # the router tokenizes on its own threads
    edges = chat_template_edges(lambda content: chat_prompt_ids(tokenizer, [("user", content)]))
    reader = FeatureReader(engine.model, settings.layer, edges)
    source = StoreSource(engine.adapters.store, engine.adapters.read)  # its loads counted as the server's
    router = Router(engine.info.model_name, reader, tokenizer, source, settings)
    router.restore()
    return router
