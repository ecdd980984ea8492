"""What the router reads of a prompt: the base model's first layers over its token ids.

`FeatureReader.read(token_ids)` runs the frozen base model (no adapter, a KV cache of its own, so
it is safe beside the engine thread) through its first layers once and returns a `PromptReading`:
- `feature`: the selector's input, the mean of the normed residual stream entering decoder layer
  `layer` ([hidden] fp32) over the prompt's own tokens: those of the chat template's fixed
  prefix and suffix (system prompt, role markers), which every chat shares, are read (later
  tokens attend to them) but not pooled; pooled in, they outweigh a short prompt's own tokens and
  make every short prompt look alike (out-of-domain prompts then sit closer to an adapter's
  examples than its own held-out prompts do). Layer 2 and this pooling are the measured default
  (bench/router_bench.py `--sweep`, bench/RESULTS.md "Router"): on the demo tasks' held-out
  prompts it routes as well as deeper layers, at 2 of the prefill's 30 layers.
- `taps`: per layer run, the normed inputs of its attention and MLP projections at the prompt's
  own tokens, which the weight-only prototypes score; only when `prototype_layers` asks for them.

It knows the model's forward, nothing of adapters, heads or requests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.model.kv_cache import KVCache
from server.model.llama import DecoderLayer, LlamaModel

DEFAULT_LAYER = 2


Taps = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class PromptReading:
    feature: torch.Tensor  # [hidden] fp32
    taps: Taps  # per layer (attention input, MLP input) at the prompt's own tokens, [T', hidden]


class FeatureReader:
    def __init__(
        self,
        model: LlamaModel,
        layer: int = DEFAULT_LAYER,
        template: tuple[Sequence[int], Sequence[int]] = ((), ()),
    ) -> None:
        """template: the token ids every chat prompt starts and ends with (`chat_template_edges`)."""
        num_layers = model.arch.num_layers
        if not 0 <= layer <= num_layers:
            raise ValueError(f"router layer must be in [0, {num_layers}] for this model, got {layer}")
        self.model = model
        self.layer = layer
        self.prefix, self.suffix = tuple(template[0]), tuple(template[1])
        self._contexts: dict[int, KVCache] = {}  # layers run -> the K/V of the template's prefix
        self._lock = threading.Lock()

    def _context(self, layers: int) -> KVCache:
        """The KV cache of the template's prefix through `layers` layers (computed on first use)."""
        with self._lock:
            context = self._contexts.get(layers)
            if context is None:
                ids = torch.tensor(self.prefix, dtype=torch.int64, device=self.model.device)
                context = self._contexts[layers] = self.model.prefix(ids, layers)[2]
            return context

    def content_span(self, token_ids: Sequence[int]) -> slice:
        """The positions of the prompt's own tokens: without the template's prefix and suffix."""
        start = _common_prefix(token_ids, self.prefix)
        end = len(token_ids) - _common_prefix(token_ids[::-1], self.suffix[::-1])
        return slice(start, end) if start < end else slice(0, len(token_ids))

    @property
    def dim(self) -> int:
        return self.model.arch.hidden_size

    def read(self, token_ids: Sequence[int], prototype_layers: int = 0) -> PromptReading:
        """The prompt's feature, and the taps of its first `prototype_layers` layers (0 = none)."""
        assert token_ids, "the router reads a non-empty prompt"
        model = self.model
        prototype_layers = min(prototype_layers, model.arch.num_layers)
        run = max(self.layer, prototype_layers)
        own = self.content_span(token_ids)
        # Every chat starts with the template's prefix: its K/V are computed once and reused.
        start = own.start if self.prefix and own.start == len(self.prefix) else 0
        ids = torch.tensor(list(token_ids[start:]), dtype=torch.int64, device=model.device)
        with torch.inference_mode():
            taps, residual, _ = model.prefix(ids, run, self._context(run) if start else None, start)
            if self.layer < run:  # the stream entering layer `layer` is that layer's attention input
                normed = taps[self.layer][0]
            elif self.layer < model.arch.num_layers:
                layer = model.layers[self.layer]
                assert isinstance(layer, DecoderLayer)
                normed = layer.input_norm(residual)
            else:
                normed = model.norm(residual)
            span = slice(own.start - start, own.stop - start)
            feature = normed[span].float().mean(0)
        return PromptReading(feature, tuple((a[span], m[span]) for a, m in taps[:prototype_layers]))


def chat_template_edges(render: Callable[[str], Sequence[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token ids shared by every rendering `render(content)` of a one-message chat: the longest
    prefix and suffix two renderings with different contents have in common."""
    a, b = list(render("a")), list(render("b c"))
    start = _common_prefix(a, b)
    end = _common_prefix(a[start:][::-1], b[start:][::-1])
    return tuple(a[:start]), tuple(a[len(a) - end :])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
