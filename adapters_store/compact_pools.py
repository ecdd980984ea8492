"""Slot pools that keep the compressed formats compact on the device: MoS shard pools, ComPEFT codes.

Both follow the SlotPool protocol of slot_pools.py. Each accepts only its own format, and only
adapters that fit its slots; anything else is refused, so DeviceSlots falls back to a LoRA pool,
which materializes the adapter (`lora_weights()`). Their `slot_nbytes` is the compact size, so
the cheapest-pool rule sends MoS and ComPEFT adapters here whenever one accepts them.

- `MosSlotPool`: one kernels.mos.MosStack per fused projection group, shared by all layers: per
  slot the projections' shard pools (a capacity in values, sized by a pool rank R: R * L * (d_in +
  out) per projection, the size of a rank-R LoRA) and each layer's index tables; any
  shards_per_vector l up to `max_shards` that divides the projection sizes.
- `CompeftSlotPool`: one kernels.ternary.TernaryStack per (layer, fused group): signs as 2-bit codes,
  `scale * gamma^2` per (slot, projection).

prepare() (loader thread) builds the device form (element-offset tables, packed codes) so that
fill() only copies. The terms run the Triton kernels when the backend is triton, else the kernels'
torch references (tests, and any device torch runs on); the server builds these pools only for the
triton backend, and on CPU keeps materializing into LoRA slots. kernels.mos / kernels.ternary
import triton, so they are imported when a pool is built, not with this module.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from adapters_store.adapter import CompeftAdapter, LoadedAdapter, MosAdapter
from adapters_store.compeft_config import ModuleLayout
from adapters_store.slot_pools import DeviceForm, Group, StackedSlots, Term
from adapters_store.spec import BaseModelSpec
from kernels import AdapterStep, LoraBackend

if TYPE_CHECKING:
    from kernels.mos import MosLayer, MosSlotData, MosStack
    from kernels.ternary import TernaryStack

DEFAULT_MAX_SHARDS = 8  # l up to 8: index tables of r * 8 entries per (layer, projection)


def _group_inputs(spec: BaseModelSpec, group: Group) -> int:
    in_features = spec.features[group[0]][0]
    if any(spec.features[p][0] != in_features for p in group):
        raise ValueError(f"fused projections {group} do not share their input size")
    return in_features


def _unknown_modules(adapter: LoadedAdapter, spec: BaseModelSpec, groups: Sequence[Group]) -> str | None:
    served = {p for group in groups for p in group}
    unknown = [p for p in adapter.target_modules if p not in served]
    if unknown:
        return f"it adapts projections these slots do not hold: {', '.join(unknown)}"
    return None


@dataclass(frozen=True)
class _CompactTerm:
    """One adapted linear's term for a compact pool: add(x, y, operands, step), skipped when no slot of
    the step adapts it (`used`: the stack's host mirror by slot, so no device sync)."""

    add: Callable[..., None]  # kernels.mos.mos_add / kernels.ternary.ternary_add, reference bound
    operands: MosLayer | TernaryStack
    used: Sequence[int] | Sequence[bool]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: AdapterStep) -> None:
        if any(self.used[slot] for batch in step.passes for slot in batch.segment_slots):
            self.add(x, y, self.operands, step)


@dataclass(frozen=True, eq=False)
class MosForm:
    """Per fused group the adapter targets, its slot data (groups it does not target are absent)."""

    groups: dict[Group, MosSlotData]
    nbytes: int


class MosSlotPool(StackedSlots):
    """Mixture-of-Shards adapters kept as shard pools + index tables (kernels.mos)."""

    kind = "mos"

    def __init__(
        self,
        spec: BaseModelSpec,
        fused: Sequence[Group],
        num_slots: int,
        backend: LoraBackend,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        *,
        max_rank: int | None = None,
        max_pool_rank: int | None = None,
        max_shards: int = DEFAULT_MAX_SHARDS,
    ) -> None:
        """max_rank: the largest r (index rows per layer); default spec.max_rank.
        max_pool_rank: the pool capacity as a LoRA rank R (pools of R * L * l rows fit); default
        max_rank // 2, so a slot is about half a LoRA slot of max_rank and wins over it."""
        from kernels.mos import MosStack, mos_add

        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.spec = spec
        self.num_slots = num_slots
        self.backend = backend
        self.max_rank = spec.max_rank if max_rank is None else max_rank
        self.max_pool_rank = max(1, self.max_rank // 2) if max_pool_rank is None else max_pool_rank
        if self.max_rank < 1 or self.max_pool_rank < 1 or max_shards < 1:
            raise ValueError("max_rank, max_pool_rank and max_shards must be >= 1")
        self.groups = tuple(tuple(g) for g in fused)
        self._add = functools.partial(mos_add, reference=backend.name != "triton")
        self._stacks: dict[Group, MosStack] = {}
        layers = spec.num_layers
        for group in self.groups:
            in_features = _group_inputs(spec, group)
            widths = tuple(spec.features[p][1] for p in group)
            self._stacks[group] = MosStack.empty(
                num_slots,
                layers,
                in_features,
                widths,
                max_rank=self.max_rank,
                max_shards=max_shards,
                capacity_a=len(group) * self.max_pool_rank * layers * in_features,
                capacity_b=self.max_pool_rank * layers * sum(widths),
                dtype=dtype,
                device=device,
            )
        self.slot_nbytes = sum(stack.nbytes_per_slot for stack in self._stacks.values())

    def stack(self, group: Group) -> MosStack:
        return self._stacks[tuple(group)]

    def _group_parts(
        self, adapter: MosAdapter, group: Group
    ) -> tuple[
        list[tuple[torch.Tensor, torch.Tensor] | None], list[list[tuple[torch.Tensor, torch.Tensor] | None]]
    ]:
        pools = [adapter.pools.get(p) for p in group]
        tables = [[adapter.indices.get((layer, p)) for p in group] for layer in range(self.spec.num_layers)]
        return pools, tables

    def refusal(self, adapter: LoadedAdapter) -> str | None:
        if not isinstance(adapter, MosAdapter):
            return f"holds only MoS adapters, not {adapter.format}"
        reason = _unknown_modules(adapter, self.spec, self.groups)
        if reason is not None:
            return reason
        layers = {layer for layer, _ in adapter.indices}
        if layers and max(layers) >= self.spec.num_layers:
            return f"it adapts layer {max(layers)}, the model has {self.spec.num_layers}"
        for group, stack in self._stacks.items():
            pools, _ = self._group_parts(adapter, group)
            if any(pair is not None for pair in pools):
                reason = stack.refusal(pools, adapter.shards_per_vector, adapter.r)
                if reason is not None:
                    return f"{'|'.join(group)}: {reason}"
        return None

    def prepare(self, adapter: LoadedAdapter) -> MosForm:
        reason = self.refusal(adapter)
        if reason is not None:
            raise ValueError(f"adapter {adapter.name!r}: {reason}")
        assert isinstance(adapter, MosAdapter)
        groups = {}
        for group, stack in self._stacks.items():
            pools, tables = self._group_parts(adapter, group)
            if all(pair is None for per_layer in tables for pair in per_layer):
                continue
            try:
                groups[group] = stack.slot_data(
                    pools, tables, num_shards=adapter.shards_per_vector, rank=adapter.r, scale=adapter.scale
                )
            except ValueError as error:
                raise ValueError(f"adapter {adapter.name!r} {'|'.join(group)}: {error}") from None
        return MosForm(groups=groups, nbytes=sum(data.nbytes for data in groups.values()))

    def fill(self, slot: int, form: DeviceForm) -> None:
        assert isinstance(form, MosForm), type(form)
        self._fill_parts(slot, form.groups, unpack=False)

    def term(self, layer: int, group: Group) -> Term:
        stack = self._stacks[tuple(group)]
        return _CompactTerm(self._add, stack.layer(layer), stack.host_adapted[layer])

    def plan(self, step: AdapterStep) -> AdapterStep:
        return step  # the kernels read the step's segment tables directly: no plan


def _ternary(signs: torch.Tensor) -> bool:
    return bool(((signs >= -1) & (signs <= 1)).all())


@dataclass(frozen=True, eq=False)
class CompeftForm:
    """Every stack's slot image, views of one device buffer: per (layer, group) the packed S_A and
    S_B codes with zeros past each projection's rank, its scales (gamma^2 included) and rank."""

    images: dict[tuple[int, Group], tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]
    rank: int
    nbytes: int  # the codes the adapter has (not the zeros of its images)


@dataclass(frozen=True, eq=False)
class _CompeftPlan:
    """How one module layout becomes the pool's slot images (made once per layout, kept by the pool):
    where each factor's codes are, which packed word each image word takes (`gather`; one past the
    packed words: a zero), and per stack its image's place in the buffer, module scales and rank."""

    matrices: list[tuple[int, int, int]]  # (offset, rows, length) of each A and B in the sign vector
    gather: np.ndarray  # [image words] int32
    stacks: list[tuple[tuple[int, Group], int, int, tuple[float, ...], int]]  # key, A, B starts, scales, rank
    nbytes: int


class CompeftSlotPool(StackedSlots):
    """ComPEFT adapters kept as ternary 2-bit codes (kernels.ternary)."""

    kind = "compeft"

    def __init__(
        self,
        spec: BaseModelSpec,
        fused: Sequence[Group],
        num_slots: int,
        backend: LoraBackend,
        device: torch.device | str,
        *,
        max_rank: int | None = None,
    ) -> None:
        from kernels.ternary import TernaryStack, ternary_add

        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.spec = spec
        self.num_slots = num_slots
        self.backend = backend
        self.max_rank = spec.max_rank if max_rank is None else max_rank
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        self.device = torch.device(device)
        self.groups = tuple(tuple(g) for g in fused)
        self._add = functools.partial(ternary_add, reference=backend.name != "triton")
        self._stacks: dict[tuple[int, Group], TernaryStack] = {}
        for layer in range(spec.num_layers):
            for group in self.groups:
                widths = tuple(spec.features[p][1] for p in group)
                self._stacks[layer, group] = TernaryStack.empty(
                    num_slots, self.max_rank, _group_inputs(spec, group), widths, device=device
                )
        self.slot_nbytes = sum(stack.nbytes_per_slot for stack in self._stacks.values())
        self._plans: dict[tuple[ModuleLayout, ...], _CompeftPlan] = {}
        self._plans_lock = threading.Lock()

    def stack(self, layer: int, group: Group) -> TernaryStack:
        return self._stacks[layer, tuple(group)]

    def refusal(self, adapter: LoadedAdapter) -> str | None:
        if not isinstance(adapter, CompeftAdapter):
            return f"holds only ComPEFT adapters, not {adapter.format}"
        if adapter.rank > self.max_rank:
            return f"rank {adapter.rank} exceeds the pool's max rank {self.max_rank}"
        return _unknown_modules(adapter, self.spec, self.groups)

    def prepare(self, adapter: LoadedAdapter) -> CompeftForm:
        from kernels.ternary import pack_ternary_words

        reason = self.refusal(adapter)
        if reason is not None:
            raise ValueError(f"adapter {adapter.name!r}: {reason}")
        assert isinstance(adapter, CompeftAdapter)
        try:
            signs, layout = adapter.sign_layout()
            plan = self._plan(layout)
        except ValueError as error:
            raise ValueError(f"adapter {adapter.name!r}: {error}") from None
        try:
            words, _ = pack_ternary_words(signs, plan.matrices)
        except ValueError as error:  # name the module at fault, looked for only once something is
            culprit = next((m for m in layout if not _ternary(signs[m.offset : m.offset + m.numel])), None)
            where = "" if culprit is None else f" layer {culprit.layer} {culprit.projection}"
            raise ValueError(f"adapter {adapter.name!r}{where}: {error}") from None
        # every stack's image in one buffer with the scales after it, copied to the device at once
        image = np.append(words, np.int32(0))[plan.gather]  # int32, as the words
        gamma_squared = adapter.gamma * adapter.gamma
        scales = np.array(
            [s * gamma_squared for *_, given, _ in plan.stacks for s in given], dtype=np.float32
        )
        buffer = torch.from_numpy(np.concatenate([image, scales.view(np.int32)])).to(self.device)
        codes, scale = buffer[: image.size], buffer[image.size :].view(torch.float32)
        images, at = {}, 0
        for key, a_start, b_start, given, rank in plan.stacks:
            stack = self._stacks[key]
            a_shape, b_shape = stack.codes_a.shape[1:], stack.codes_b_buffer.shape[1:]
            images[key] = (
                codes[a_start : a_start + a_shape.numel()].view(a_shape),
                codes[b_start : b_start + b_shape.numel()].view(b_shape),
                scale[at : at + len(given)],
                rank,
            )
            at += len(given)
        return CompeftForm(images=images, rank=adapter.rank, nbytes=plan.nbytes)

    def _plan(self, layout: Sequence[ModuleLayout]) -> _CompeftPlan:
        key = tuple(layout)
        with self._plans_lock:  # loader threads prepare concurrently
            plan = self._plans.get(key)
        if plan is None:
            plan = self._make_plan(layout)
            with self._plans_lock:
                self._plans[key] = plan
                while len(self._plans) > 16:  # adapters share a few layouts: keep the newest 16
                    self._plans.pop(next(iter(self._plans)))
        return plan

    def _make_plan(self, layout: Sequence[ModuleLayout]) -> _CompeftPlan:
        from kernels.ternary import packed_layout, packed_words

        by_key: dict[tuple[int, str], tuple[int, ModuleLayout]] = {}
        for i, m in enumerate(layout):
            if (m.layer, m.projection) in by_key:
                raise ValueError(f"layer {m.layer} {m.projection} appears twice in the layout")
            by_key[m.layer, m.projection] = (i, m)
        matrices = []
        for m in layout:
            if m.layer >= self.spec.num_layers or m.projection not in self.spec.features:
                raise ValueError(f"module {(m.layer, m.projection)} is outside the model")
            if (m.in_features, m.out_features) != tuple(self.spec.features[m.projection]):
                raise ValueError(
                    f"layer {m.layer} {m.projection}: [{m.in_features} -> {m.out_features}], the "
                    f"model's is {tuple(self.spec.features[m.projection])}"
                )
            if not 0 < m.rank <= self.max_rank:
                raise ValueError(f"layer {m.layer} {m.projection}: rank {m.rank} outside 1..{self.max_rank}")
            split = m.offset + m.rank * m.in_features
            matrices += [(m.offset, m.rank, m.in_features), (split, m.out_features, m.rank)]
        firsts, words, _ = packed_layout(matrices)  # where pack_ternary_words puts each factor
        zero, pieces, stacks, start = words, [], [], 0  # one past the packed words: a zero
        for (layer, group), stack in self._stacks.items():
            words_in, words_r = packed_words(stack.in_features), packed_words(self.max_rank)
            a_image = np.full((len(group), self.max_rank, words_in), zero, dtype=np.int64)
            b_image = np.full((sum(stack.output_slices), words_r), zero, dtype=np.int64)
            scales, rank, row = [], 0, 0
            for p, (projection, width) in enumerate(zip(group, stack.output_slices, strict=True)):
                found = by_key.get((layer, projection))
                scales.append(0.0 if found is None else found[1].scale)
                if found is not None:
                    i, m = found
                    words_b = packed_words(m.rank)
                    a_image[p, : m.rank] = firsts[2 * i] + np.arange(m.rank * words_in).reshape(
                        m.rank, words_in
                    )
                    b_image[row : row + width, :words_b] = firsts[2 * i + 1] + np.arange(
                        width * words_b
                    ).reshape(width, words_b)
                    rank = max(rank, m.rank)
                row += width
            stacks.append(((layer, group), start, start + a_image.size, tuple(scales), rank))
            pieces += [a_image.reshape(-1), b_image.reshape(-1)]
            start += a_image.size + b_image.size
        # int32: a plan is kept per layout, and a slot's image is far below 2**31 words
        gather = (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)).astype(np.int32)
        return _CompeftPlan(matrices=matrices, gather=gather, stacks=stacks, nbytes=4 * words)

    def fill(self, slot: int, form: DeviceForm) -> None:
        assert isinstance(form, CompeftForm), type(form)
        for key, stack in self._stacks.items():
            stack.set_slot_image(slot, *form.images[key])

    def term(self, layer: int, group: Group) -> Term:
        stack = self._stacks[layer, tuple(group)]
        return _CompactTerm(self._add, stack, stack.host_ranks)

    def plan(self, step: AdapterStep) -> AdapterStep:
        return step  # the kernels read the step's segment tables directly: no plan
