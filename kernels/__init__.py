"""Segmented / gathered LoRA matmuls: the adapter term of every adapted linear layer.

    backend = select_backend(device)                             # once, at start-up
    stack = LoraStack.empty(..., layout=backend.stack_layout)    # per layer and fused projection
    term = LoraTerm(backend, stack)                              # term(x, y, step)
    step = AdapterStep.build(token_pairs, device)                # once per engine step:
    step = step.with_plan(backend.plan_step(step, stacks))       #   token t's (slot, weight) pairs
    backend.add_lora(x, y, stack, step)                          # what the term does: y += LoRA

`shrink.py` and `expand.py` hold the Triton kernels, their launchers and the torch references;
`torch_backend.py` the CPU backend. `mos.py` (Mixture-of-Shards: shard pools + index tables) and
`ternary.py` (ComPEFT: 2-bit sign codes) hold kernels that read those compact forms directly, with
their slot stacks (MosStack, TernaryStack); adapters_store.compact_pools uses them on the GPU. Triton is imported only when the triton backend is chosen
(or those modules are imported), so importing this package is cheap and needs no GPU.

Deliberately defines no ``__version__``: transformers probes for a Hugging Face package also
called ``kernels`` and must not mistake this one for it (see tests/test_naming_hazard.py).
"""

from kernels.backend import LoraBackend, LoraTerm, TritonBackend, select_backend
from kernels.metadata import AdapterBatch, AdapterStep, TokenPairs
from kernels.stack import LoraStack, StackLayout
from kernels.torch_backend import TorchBackend

__all__ = [
    "AdapterBatch",
    "AdapterStep",
    "LoraBackend",
    "LoraStack",
    "LoraTerm",
    "StackLayout",
    "TorchBackend",
    "TokenPairs",
    "TritonBackend",
    "select_backend",
]
