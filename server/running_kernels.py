"""What GetInfo says about a running engine's kernels and adapter tiers, read from the live objects.

`kernels_info(engine)` names the kernels that were really chosen at start, after any fallback
(the LoRA backend object, its gather path, the model's ops object), not the flags that asked for
them; `adapter_settings(manager)` the tiers' limits, pools and target projections. Both read
attributes only (cheap, any thread). The roots' paths are never shown, only how many there are.

It does not choose kernels (kernels.backend, kernels.model_ops do) nor change any setting.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from adapters_store.spec import PROJECTIONS
from loramux.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from server.engine.adapters import AdapterManager
    from server.engine.engine import Engine


def kernels_info(engine: Engine) -> pb.KernelsInfo:
    """The LoRA backend, its gather path and the model's ops as they run in `engine`."""
    manager = engine.adapters
    backend = manager.slots.backend if manager is not None else None
    lora_backend = backend.name if backend is not None else "none"
    if backend is None:
        gather = "none"
    elif lora_backend == "torch":
        gather = "fused-cpu" if getattr(backend, "fused_gather", False) else "torch"
    else:
        gather = lora_backend
    return pb.KernelsInfo(
        lora_backend=lora_backend,
        lora_gather=gather,
        model_ops=engine.model.ops.name,
        triton_interpreted=lora_backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1",
    )


def adapter_settings(manager: AdapterManager) -> pb.AdapterSettings:
    """The adapter tiers' settings: slots, ranks, host memory, the pools and what may be adapted."""
    spec = manager.store.spec
    pools = [
        pb.SlotPoolInfo(kind=pool.kind, slots=pool.num_slots, max_rank=getattr(pool, "max_rank", 0))
        for pool in manager.slots.pools
    ]
    return pb.AdapterSettings(
        max_slots=manager.num_slots,
        max_rank=spec.max_rank,
        host_cache_bytes=manager.store.host.capacity_bytes,
        max_adapter_bytes=manager.store.max_adapter_bytes,
        target_modules=[projection for projection in PROJECTIONS if projection in spec.features],
        pools=pools,
        adapter_roots=len(manager.store.roots.roots),
    )
