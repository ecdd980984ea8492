"""Weight-only routing (Arrow): an adapter's prototypes from its own weights, scored against a prompt.

For each adapted projection that reads the residual stream (q/k/v read the attention input,
gate/up the MLP input) in the first layers, the prototype is the top right singular vector of
`B A` ([in], unit norm): the input direction the adapter changes most. A prompt's score for an
adapter is the mean over those (layer, projection) pairs of the mean over the prompt's tokens of
|cos(x_t, v)|: how much the prompt's hidden states point where the adapter acts. Arrow (Ostapenko
et al., 2024) routes per token and layer this way; the router uses it per request.

This module knows LoRA weights and tensors; nothing of examples, heads or the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from adapters_store.adapter import LoraWeights, ModuleKey

# The projections whose input is a normed residual stream, and which tap (0: attention, 1: MLP) it is.
TAP_OF_PROJECTION = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 1, "up_proj": 1}

Prototypes = dict[ModuleKey, torch.Tensor]  # (layer, projection) -> [in] unit vector


def adapter_prototypes(weights: Mapping[ModuleKey, LoraWeights], num_layers: int) -> Prototypes:
    """The top right singular vector of `B A` of every module in layers < num_layers that reads the
    residual stream. Computed from the rank-r factors: B = Q R, so B A = Q (R A) and the right
    singular vectors of B A are those of the small R A ([r, in])."""
    prototypes: Prototypes = {}
    for (layer, projection), module in sorted(weights.items()):
        if layer >= num_layers or projection not in TAP_OF_PROJECTION:
            continue
        _, r = torch.linalg.qr(module.B.double())
        _, _, vh = torch.linalg.svd(r @ module.A.double(), full_matrices=False)
        prototypes[(layer, projection)] = vh[0].float()
    return prototypes


def arrow_scores(
    prototypes: Sequence[Prototypes], taps: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """[len(prototypes)] scores in [0, 1]: per adapter the mean |cos| of the prompt's tapped inputs with
    its prototypes (layers beyond `taps` are skipped; an adapter with no prototype there scores 0)."""
    units = [
        tuple(x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12) for x in pair)
        for pair in taps
    ]
    scores = torch.zeros(len(prototypes))
    for i, adapter in enumerate(prototypes):
        values = [
            (units[layer][TAP_OF_PROJECTION[projection]] @ vector).abs().mean()
            for (layer, projection), vector in adapter.items()
            if layer < len(units)
        ]
        if values:
            scores[i] = torch.stack(values).mean()
    return scores
