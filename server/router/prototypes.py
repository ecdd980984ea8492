"""Weight-only routing (Arrow): an adapter's prototypes from its own weights, scored against a prompt.

For each adapted projection that reads the residual stream (q/k/v read the attention input,
gate/up the MLP input), the prototype is the top right singular vector of `B A` ([in], unit
norm): the input direction the adapter changes most. Arrow (Ostapenko et al., 2024) scores a
token by |<x, v>|. Raw, that favours whichever adapter's directions align with what every
prompt's hidden states share (on the demo adapters one adapter then wins every prompt), so each
(layer, projection) score is standardized against REFERENCE_PROMPTS, generic requests of every
kind: a prompt's score for an adapter is the mean over its modules of
(mean over the prompt's tokens of |cos(x_t, v)| - reference mean) / reference spread.

This module knows LoRA weights and tensors; nothing of examples, heads or the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adapters_store.adapter import LoraWeights, ModuleKey

# The projections whose input is a normed residual stream, and which tap (0: attention, 1: MLP) it is.
TAP_OF_PROJECTION = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 1, "up_proj": 1}

# Generic requests of many kinds, the yardstick each prototype's scores are standardized against.
REFERENCE_PROMPTS = (
    "Can you help me plan a weekend trip to the mountains?",
    "What is the difference between a virus and a bacterium?",
    "Write a short poem about autumn leaves.",
    "How do I make my bread rise better?",
    "Explain how interest rates affect house prices.",
    "Give me three ideas for a birthday party for a ten year old.",
    "Translate this sentence into Spanish: the library opens at nine.",
    "Why do cats purr?",
    "Summarize the main causes of the First World War.",
    "What should I pack for a business trip to Berlin in winter?",
    "How can I improve my running pace?",
    "Suggest a name for a small coffee shop.",
    "Is it safe to swim right after eating?",
    "What are good plants for a shady balcony?",
    "Draft a polite reminder email about an unpaid invoice.",
    "How does a solar panel produce electricity?",
    "Tell me a fun fact about octopuses.",
    "Which programming language should a beginner learn first?",
    "How long should I boil an egg for a soft yolk?",
    "What does a notary public do?",
    "Recommend a board game for four players.",
    "How do vaccines train the immune system?",
    "Write a tweet announcing our new opening hours.",
    "What is the capital of Australia and why is it not Sydney?",
)

Prototypes = dict[ModuleKey, torch.Tensor]  # (layer, projection) -> [in] unit vector


@dataclass(frozen=True)
class AdapterPrototypes:
    vectors: Prototypes
    mean: dict[ModuleKey, float]  # of the module's score over the reference prompts
    spread: dict[ModuleKey, float]  # its standard deviation there


def adapter_vectors(weights: Mapping[ModuleKey, LoraWeights], num_layers: int) -> Prototypes:
    """The top right singular vector of `B A` of every module in layers < num_layers that reads the
    residual stream. Computed from the rank-r factors: B = Q R, so B A = Q (R A) and the right
    singular vectors of B A are those of the small R A ([r, in])."""
    vectors: Prototypes = {}
    for (layer, projection), module in sorted(weights.items()):
        if layer >= num_layers or projection not in TAP_OF_PROJECTION:
            continue
        _, r = torch.linalg.qr(module.B.double())
        _, _, vh = torch.linalg.svd(r @ module.A.double(), full_matrices=False)
        vectors[(layer, projection)] = vh[0].float()
    return vectors


def module_scores(
    vectors: Prototypes, taps: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> dict[ModuleKey, float]:
    """Per module in the tapped layers: the mean over tokens of |cos(x_t, v)|."""
    scores = {}
    for (layer, projection), vector in vectors.items():
        if layer < len(taps):
            x = taps[layer][TAP_OF_PROJECTION[projection]].float()
            units = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scores[(layer, projection)] = float((units @ vector).abs().mean())
    return scores


def calibrated(
    vectors: Prototypes, reference: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]
) -> AdapterPrototypes:
    """`vectors` with their scores' mean and spread over the reference prompts' taps."""
    rows = [module_scores(vectors, taps) for taps in reference]
    mean, spread = {}, {}
    for key in vectors:
        values = torch.tensor([row[key] for row in rows if key in row], dtype=torch.float64)
        if len(values) >= 2:
            mean[key], spread[key] = float(values.mean()), float(values.std()) + 1e-6
    return AdapterPrototypes({k: v for k, v in vectors.items() if k in mean}, mean, spread)


def arrow_scores(
    adapters: Sequence[AdapterPrototypes], taps: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """[len(adapters)] standardized scores of one prompt (an adapter with no module in the tapped
    layers scores 0, the reference's average)."""
    scores = torch.zeros(len(adapters))
    for i, adapter in enumerate(adapters):
        values = [
            (s - adapter.mean[k]) / adapter.spread[k] for k, s in module_scores(adapter.vectors, taps).items()
        ]
        if values:
            scores[i] = sum(values) / len(values)
    return scores
