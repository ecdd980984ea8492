"""What adapters attach to: the base model's adaptable projections, their sizes, and the rank limit.

The server builds one `BaseModelSpec` from its model at start-up; loaders validate every adapter
against it. This module knows Llama-family projection names and how PEFT names their modules
(`model.layers.{i}.{self_attn|mlp}.{proj}`); it knows nothing about weights or files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def projection_block(projection: str) -> str:
    """The decoder-layer submodule that holds `projection`: "self_attn" or "mlp"."""
    if projection in ATTENTION_PROJECTIONS:
        return "self_attn"
    if projection in MLP_PROJECTIONS:
        return "mlp"
    raise KeyError(f"unknown projection {projection!r}; known: {', '.join(PROJECTIONS)}")


def module_name(layer: int, projection: str) -> str:
    """PEFT's name for one projection of a causal LM: `model.layers.3.self_attn.q_proj`."""
    return f"model.layers.{layer}.{projection_block(projection)}.{projection}"


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model as adapters see it.

    num_layers: decoder layers; PEFT layer indices run 0..num_layers-1.
    features: projection name -> (in_features, out_features) of its weight, the same in every
        layer; an adapter's A is [rank, in_features] and its B [out_features, rank].
    max_rank: the largest LoRA rank the server accepts (device slots are sized by it).
    """

    num_layers: int
    features: Mapping[str, tuple[int, int]] = field(hash=False)
    max_rank: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        unknown = set(self.features) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown projections {sorted(unknown)}; known: {', '.join(PROJECTIONS)}")
        for projection, (in_features, out_features) in self.features.items():
            if in_features < 1 or out_features < 1:
                raise ValueError(f"{projection} sizes must be >= 1, got {(in_features, out_features)}")
        ordered = {p: tuple(self.features[p]) for p in PROJECTIONS if p in self.features}
        object.__setattr__(self, "features", MappingProxyType(ordered))

    @classmethod
    def llama(
        cls,
        *,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        q_size: int,
        kv_size: int,
        max_rank: int,
    ) -> BaseModelSpec:
        """The seven projections of a Llama-family decoder (q_size = heads * head_dim, kv_size likewise)."""
        return cls(
            num_layers=num_layers,
            features={
                "q_proj": (hidden_size, q_size),
                "k_proj": (hidden_size, kv_size),
                "v_proj": (hidden_size, kv_size),
                "o_proj": (q_size, hidden_size),
                "gate_proj": (hidden_size, intermediate_size),
                "up_proj": (hidden_size, intermediate_size),
                "down_proj": (intermediate_size, hidden_size),
            },
            max_rank=max_rank,
        )

    @property
    def projections(self) -> tuple[str, ...]:
        """The adaptable projection names, in PROJECTIONS order."""
        return tuple(self.features)

    def module_names(self) -> dict[str, tuple[int, str]]:
        """Every adaptable module's PEFT name -> (layer, projection), layer by layer."""
        return {
            module_name(layer, projection): (layer, projection)
            for layer in range(self.num_layers)
            for projection in self.features
        }
