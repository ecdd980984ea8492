"""Adapter formats, validation and the disk and host tiers of the adapter cache.

The server builds a `BaseModelSpec` from its model and an `AdapterStore` over the adapter roots;
`AdapterStore.get(name)` returns a validated `LoadedAdapter` whose `lora_weights()` gives fp32
A [rank, in], B [out, rank] and scale per (layer, projection). `DeviceSlots` over one or more
slot pools is the device tier: prepare (loader thread), acquire / release (engine thread), and
the per-step metadata every adapted linear reads. Imports only `kernels` (or nothing);
never `server`.
"""

from adapters_store.adapter import (
    CompeftAdapter,
    LoadedAdapter,
    LoraAdapter,
    LoraWeights,
    ModuleKey,
    MosAdapter,
    TernaryFactors,
)
from adapters_store.compact_pools import CompeftSlotPool, MosSlotPool
from adapters_store.compeft import (
    CodedCompeftAdapter,
    CompeftCodes,
    compress_compeft,
    load_compeft,
    save_compeft,
)
from adapters_store.device_slots import DeviceSlots, DeviceStep, ReadyAdapter
from adapters_store.errors import AdapterError, AdapterExists, AdapterNotFound, AdapterTooLarge
from adapters_store.formats import FORMAT_REGISTRY, FORMATS, AdapterFormat, detect_format, load_adapter
from adapters_store.host_cache import HostCache, HostCacheStats
from adapters_store.mos import MosLayout, load_mos, save_mos
from adapters_store.names import check_adapter_name, is_adapter_name
from adapters_store.peft_lora import load_peft_lora
from adapters_store.roots import AdapterRoots
from adapters_store.slot_pools import DeviceForm, LoraSlotPool, SlotPool
from adapters_store.spec import PROJECTIONS, BaseModelSpec
from adapters_store.store import AdapterStore, StoredAdapter

__all__ = [
    "FORMATS",
    "FORMAT_REGISTRY",
    "PROJECTIONS",
    "AdapterError",
    "AdapterExists",
    "AdapterFormat",
    "AdapterNotFound",
    "AdapterRoots",
    "AdapterStore",
    "AdapterTooLarge",
    "BaseModelSpec",
    "CodedCompeftAdapter",
    "CompeftCodes",
    "CompeftAdapter",
    "CompeftSlotPool",
    "DeviceForm",
    "DeviceSlots",
    "DeviceStep",
    "HostCache",
    "HostCacheStats",
    "LoadedAdapter",
    "LoraAdapter",
    "LoraSlotPool",
    "LoraWeights",
    "ModuleKey",
    "MosAdapter",
    "MosLayout",
    "MosSlotPool",
    "ReadyAdapter",
    "SlotPool",
    "StoredAdapter",
    "TernaryFactors",
    "check_adapter_name",
    "compress_compeft",
    "detect_format",
    "is_adapter_name",
    "load_adapter",
    "load_compeft",
    "load_mos",
    "load_peft_lora",
    "save_compeft",
    "save_mos",
]
