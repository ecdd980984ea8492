"""The Llama-family decoder forward over one flat, mixed batch (decode tokens + prefill chunks).

`LlamaModel.forward(batch, kv)` writes the step's K/V into the cache and returns next-token
logits only for `batch.logits_rows` (the sampled rows, then any prompt rows an echo request scores). Weights arrive as a name -> tensor mapping in Hugging Face
naming (see loader.py); q/k/v and gate/up are fused into one AdaptedLinear each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kernels.model_ops import ModelOps, select_model_ops
from server.model.arch import ModelArch
from server.model.batch import StepBatch
from server.model.dense import Dense
from server.model.kv_cache import KVCache
from server.model.layers import AdaptedLinear, RMSNorm
from server.model.rope import RotaryTable


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, qkv: AdaptedLinear, o_proj: AdaptedLinear, ops: ModelOps) -> None:
        super().__init__()
        self.arch = arch
        self.qkv_proj = qkv
        self.o_proj = o_proj
        self.ops = ops
        self.scale = arch.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: StepBatch,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,  # [slots, kv_heads, capacity, head_dim]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        a = self.arch
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, batch.adapter_batch)
        # q and k rotated, k and v written to the cache at each token's slot and position
        q = self.ops.rotary_kv_write(qkv, rotary, batch.kv_slots, k_cache, v_cache, a.num_heads)  # [T, H, D]

        # Rows are laid out decode tokens first, then each prefill chunk: outputs concatenate.
        parts = []
        if batch.num_decode:
            decode_q = q[: batch.num_decode]
            parts.append(self.ops.decode_attention(decode_q, k_cache, v_cache, batch.decode, self.scale))
        for chunk in batch.prefills:
            rows = slice(chunk.row, chunk.row + chunk.length)
            parts.append(self._prefill(q[rows], chunk.slot, chunk.start, k_cache, v_cache))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, a.q_size), batch.adapter_batch)

    def _prefill(
        self, q: torch.Tensor, slot: int, start: int, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """A prompt chunk attends causally to itself and to the `start` positions cached before it."""
        length = q.shape[0]
        keys = k_cache[slot, :, : start + length].unsqueeze(0)  # [1, kv_heads, L, D]
        values = v_cache[slot, :, : start + length].unsqueeze(0)
        query = q.transpose(0, 1).unsqueeze(0)  # [1, heads, length, D]
        if start == 0:
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
        else:
            rows = torch.arange(length, device=q.device).view(-1, 1) + start
            mask = torch.arange(start + length, device=q.device).view(1, -1) <= rows
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)  # [length, heads, D]


class MLP(nn.Module):
    def __init__(self, gate_up: AdaptedLinear, down: AdaptedLinear, ops: ModelOps) -> None:
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down
        self.ops = ops

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, batch.adapter_batch)
        return self.down_proj(self.ops.silu_mul(gate_up), batch.adapter_batch)


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: ModelArch, weights: Mapping[str, torch.Tensor], index: int, ops: ModelOps
    ) -> None:
        super().__init__()
        p = f"model.layers.{index}."

        def w(name: str) -> torch.Tensor:
            return weights[p + name]

        qkv_bias = None
        if arch.attention_bias:
            qkv_bias = torch.cat([w(f"self_attn.{n}_proj.bias") for n in "qkv"])
        qkv = AdaptedLinear(
            torch.cat([w(f"self_attn.{n}_proj.weight") for n in "qkv"]),
            qkv_bias,
            ("q_proj", "k_proj", "v_proj"),
            (arch.q_size, arch.kv_size, arch.kv_size),
            ops,
        )
        o_proj = AdaptedLinear(w("self_attn.o_proj.weight"), None, ("o_proj",), (arch.hidden_size,), ops)
        gate_up = AdaptedLinear(
            torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]),
            None,
            ("gate_proj", "up_proj"),
            (arch.intermediate_size, arch.intermediate_size),
            ops,
        )
        down = AdaptedLinear(w("mlp.down_proj.weight"), None, ("down_proj",), (arch.hidden_size,), ops)
        self.input_norm = RMSNorm(w("input_layernorm.weight"), arch.rms_norm_eps, ops)
        self.attn = Attention(arch, qkv, o_proj, ops)
        self.post_attn_norm = RMSNorm(w("post_attention_layernorm.weight"), arch.rms_norm_eps, ops)
        self.mlp = MLP(gate_up, down, ops)

    def forward(
        self,
        h: torch.Tensor,  # [T, hidden] the residual stream, updated in place
        delta: torch.Tensor | None,  # the previous layer's MLP output, not yet added to h
        batch: StepBatch,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        taps: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Returns this layer's MLP output; the next norm adds it to h (residual add fused in).

        taps: when given, gets (attention input, MLP input) appended: the normed inputs of the
        q/k/v and gate/up projections (the router reads them).
        """
        attn_in = self.input_norm(h, delta)
        mlp_in = self.post_attn_norm(h, self.attn(attn_in, batch, rotary, *kv))
        if taps is not None:
            taps.append((attn_in, mlp_in))
        return self.mlp(mlp_in, batch)


class LlamaModel(nn.Module):
    def __init__(
        self,
        arch: ModelArch,
        weights: Mapping[str, torch.Tensor],
        max_positions: int,
        device: torch.device,
        ops: ModelOps | None = None,
    ) -> None:
        """ops: the non-GEMM kernels (default: select_model_ops for the weights' device and dtype)."""
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        self.ops = ops or select_model_ops(device, self.embed_tokens.dtype)
        self.layers = nn.ModuleList(DecoderLayer(arch, weights, i, self.ops) for i in range(arch.num_layers))
        self.norm = RMSNorm(weights["model.norm.weight"], arch.rms_norm_eps, self.ops)
        head = weights["model.embed_tokens.weight"] if arch.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = Dense(head, None, self.ops, keep_gemv_layout=False)
        self.rotary = RotaryTable(arch.rope, arch.head_dim, max_positions, device, self.embed_tokens.dtype)

    def adapted_linears(self) -> Iterator[tuple[int, AdaptedLinear]]:
        """(layer index, linear) for every adapter-aware projection (q|k|v, o, gate|up, down)."""
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            yield index, layer.attn.qkv_proj
            yield index, layer.attn.o_proj
            yield index, layer.mlp.gate_up_proj
            yield index, layer.mlp.down_proj

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        """Next-token logits [len(batch.logits_rows), vocab] in fp32, in the order of logits_rows."""
        h = F.embedding(batch.token_ids, self.embed_tokens)  # the residual stream
        rotary = self.ops.rotary(self.rotary.cos, self.rotary.sin, batch.positions)
        delta = None
        for i, layer in enumerate(self.layers):
            delta = layer(h, delta, batch, rotary, (kv.k[i], kv.v[i]))
        rows = batch.logits_rows
        h = self.norm(h[rows], None if delta is None else delta[rows])
        return self.lm_head(h).float()

    @torch.inference_mode()
    def prefix(
        self, token_ids: torch.Tensor, num_layers: int, context: KVCache | None = None, start: int = 0
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, KVCache]:
        """The base model (no adapter) over one prompt's tokens [T] at positions start.., through its
        first `num_layers` layers.

        context: a KV cache (from an earlier call, same layers) whose slot 0 holds positions < start,
        which these tokens attend to. Returns each layer's (attention input, MLP input) and the
        residual stream after the last layer run ([T, hidden] each), and the KV cache of positions
        < start + T. Uses KV caches of its own: safe beside the engine thread.
        """
        assert 0 <= num_layers <= self.arch.num_layers, num_layers
        a, length = self.arch, start + int(token_ids.shape[0])
        kv = KVCache(
            max(num_layers, 1), 1, a.num_kv_heads, a.head_dim, length, self.dtype, self.device, length
        )
        if start:
            assert context is not None and context.capacity >= start and len(context.k) >= num_layers
            for i in range(num_layers):
                kv.k[i][:, :, :start] = context.k[i][:, :, :start]
                kv.v[i][:, :, :start] = context.v[i][:, :, :start]
        batch = StepBatch.build([], [(0, start, token_ids.tolist(), False)], self.device)
        h = F.embedding(batch.token_ids, self.embed_tokens)
        rotary = self.ops.rotary(self.rotary.cos, self.rotary.sin, batch.positions)
        taps: list[tuple[torch.Tensor, torch.Tensor]] = []
        delta = None
        for i in range(num_layers):
            delta = self.layers[i](h, delta, batch, rotary, (kv.k[i], kv.v[i]), taps)
        return taps, h if delta is None else h + delta, kv

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device
