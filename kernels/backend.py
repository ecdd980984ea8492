"""One interface over the LoRA kernels, chosen once at start-up: `select_backend(device)`.

Once per step, whoever builds the step's metadata asks the backend for its plan
(`step.with_plan(backend.plan_step(step, stacks))`); layers then call
`backend.add_lora(x, y, stack, step)` (or a bound `LoraTerm`) and never branch on the platform. The Triton backend (CUDA) is imported only when chosen, so importing `kernels`
needs neither triton's start-up cost nor a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kernels import cpu_extension
from kernels.metadata import AdapterBatch, AdapterStep
from kernels.stack import LoraStack, StackLayout
from kernels.torch_backend import Strategy, TorchBackend


class LoraBackend(Protocol):
    """What every backend offers; semantics as kernels.shrink.lora_shrink / kernels.expand.lora_expand."""

    name: str
    stack_layout: StackLayout  # how LoraStack.empty should store weights for this backend

    def shrink(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        batch: AdapterBatch,
        scale: torch.Tensor,
        *,
        slot_ranks: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def expand(
        self,
        h: torch.Tensor,
        lora_b: Sequence[torch.Tensor] | torch.Tensor,
        batch: AdapterBatch,
        y: torch.Tensor,
        *,
        slot_ranks: torch.Tensor | None = None,
    ) -> None: ...

    def plan_step(self, step: AdapterStep, stacks: Iterable[LoraStack]) -> object:
        """The immutable per-step plan add_lora reads for these stacks (made once per step)."""
        ...

    def add_lora(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        stack: LoraStack,
        step: AdapterStep | AdapterBatch,
        plan: object = None,
    ) -> None:
        """y[t, slice p] += sum_k w_tk * scale[s_tk, p] * (x[t] @ A_p[s_tk]^T) @ B_p[s_tk]^T over the
        (slot, weight) pairs of every token (plan: from plan_step, default step.plan)."""
        ...


class TritonBackend:
    """The SGMV-style Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests)."""

    name = "triton"
    stack_layout: StackLayout = "triton"

    def __init__(self) -> None:
        from kernels import expand, shrink  # triton is imported here, not with the package

        self._shrink = shrink.lora_shrink
        self._expand = expand.lora_expand

    def shrink(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        batch: AdapterBatch,
        scale: torch.Tensor,
        *,
        slot_ranks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._shrink(x, lora_a, batch, scale, slot_ranks=slot_ranks)

    def expand(
        self,
        h: torch.Tensor,
        lora_b: Sequence[torch.Tensor] | torch.Tensor,
        batch: AdapterBatch,
        y: torch.Tensor,
        *,
        slot_ranks: torch.Tensor | None = None,
    ) -> None:
        self._expand(h, lora_b, batch, y, slot_ranks=slot_ranks)

    def plan_step(self, step: AdapterStep, stacks: Iterable[LoraStack]) -> object:
        """Nothing beyond the step's segment tables: the kernels' grids read them directly."""
        del step, stacks
        return None

    def add_lora(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        stack: LoraStack,
        step: AdapterStep | AdapterBatch,
        plan: object = None,
    ) -> None:
        del plan
        passes = (step,) if isinstance(step, AdapterBatch) else step.passes
        for batch in passes:  # one shrink + expand per pass: rows are distinct inside a pass
            if batch.has_adapters:
                h = self._shrink(x, stack.lora_a, batch, stack.scale, slot_ranks=stack.slot_ranks)
                self._expand(h, stack.lora_b, batch, y, slot_ranks=stack.slot_ranks)


@dataclass(frozen=True)
class LoraTerm:
    """One adapted layer's LoRA term: term(x, y, step) adds it to y (step: AdapterStep with its plan)."""

    backend: LoraBackend
    stack: LoraStack

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: AdapterStep | AdapterBatch) -> None:
        # Skip the whole term when no adapter of this step adapts this projection (e.g. attention-
        # only LoRAs in the MLP): host ranks, so no device sync, whatever the backend.
        passes = (step,) if isinstance(step, AdapterBatch) else step.passes
        if any(self.stack.host_ranks[slot] for batch in passes for slot in batch.segment_slots):
            self.backend.add_lora(x, y, self.stack, step)


def select_backend(
    device: torch.device | str,
    name: str | None = None,
    *,
    strategy: Strategy = "auto",
    fused_gather: bool | None = None,
) -> LoraBackend:
    """The backend for `device`: triton on CUDA, torch elsewhere; `name` forces one ("triton" | "torch").

    `strategy` tunes the torch backend only (auto | segments | gather); `fused_gather` runs its
    gather path as the fused CPU kernel (default: on CPU when kernels.cpu_extension is loaded).
    """
    device = torch.device(device)
    name = name or ("triton" if device.type == "cuda" else "torch")
    if name == "torch":
        if fused_gather is None:
            fused_gather = device.type == "cpu" and cpu_extension.is_loaded()
        return TorchBackend(strategy, fused_gather=fused_gather)
    if name == "triton":
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"the triton backend needs a CUDA device (got {device}); use the torch backend on CPU, "
                "or set TRITON_INTERPRET=1 before importing kernels to run the kernels interpreted"
            )
        return TritonBackend()
    raise ValueError(f"unknown kernels backend {name!r}: use 'triton' or 'torch'")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
