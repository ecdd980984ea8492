"""The Llama-family decoder forward over one flat, mixed batch (decode tokens + prefill chunks).

`LlamaModel.forward(batch, kv)` writes the step's K/V into the cache and returns next-token
logits only for `batch.logits_rows`. Weights arrive as a name -> tensor mapping in Hugging Face
naming (see loader.py); q/k/v and gate/up are fused into one AdaptedLinear each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from server.model.arch import ModelArch
from server.model.batch import StepBatch
from server.model.dense import Dense
from server.model.kv_cache import KVCache
from server.model.layers import AdaptedLinear, RMSNorm
from server.model.rope import RotaryTable, apply_rotary


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, qkv: AdaptedLinear, o_proj: AdaptedLinear) -> None:
        super().__init__()
        self.arch = arch
        self.qkv_proj = qkv
        self.o_proj = o_proj

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: StepBatch,
        rotary: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,  # [slots, kv_heads, capacity, head_dim]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        a = self.arch
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, batch.adapter_batch)
        # q and k heads are rotated in one go: [T, heads + kv_heads, head_dim]
        qk = apply_rotary(qkv[:, : a.q_size + a.kv_size].view(num_tokens, -1, a.head_dim), *rotary)
        q, k = qk.split((a.num_heads, a.num_kv_heads), dim=1)
        k_cache[batch.kv_slots, :, batch.positions] = k
        v_cache[batch.kv_slots, :, batch.positions] = qkv[:, a.q_size + a.kv_size :].view(
            num_tokens, a.num_kv_heads, a.head_dim
        )

        # Rows are laid out decode tokens first, then each prefill chunk: outputs concatenate.
        parts = []
        if batch.num_decode:
            parts.append(self._decode(q[: batch.num_decode], batch, k_cache, v_cache))
        for chunk in batch.prefills:
            rows = slice(chunk.row, chunk.row + chunk.length)
            parts.append(self._prefill(q[rows], chunk.slot, chunk.start, k_cache, v_cache))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, a.q_size), batch.adapter_batch)

    def _decode(
        self, q: torch.Tensor, batch: StepBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """One query per sequence against its cached context; GQA by grouping heads, no K/V repeat."""
        a = self.arch
        n, length = batch.num_decode, batch.decode_len
        if batch.decode_slot_start is not None:  # a view, no copy
            start = batch.decode_slot_start
            keys = k_cache[start : start + n, :, :length]
            values = v_cache[start : start + n, :, :length]
        else:
            keys = k_cache[batch.decode_slots, :, :length]
            values = v_cache[batch.decode_slots, :, :length]
        # The query heads of one KV head form the "query length" axis: no K/V repeat, one call.
        group = a.num_heads // a.num_kv_heads
        q = q.reshape(n, a.num_kv_heads, group, a.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.decode_mask)
        return out.reshape(n, a.num_heads, a.head_dim)

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
    def __init__(self, gate_up: AdaptedLinear, down: AdaptedLinear) -> None:
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, batch.adapter_batch).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, batch.adapter_batch)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, weights: Mapping[str, torch.Tensor], index: int) -> None:
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
        )
        o_proj = AdaptedLinear(w("self_attn.o_proj.weight"), None, ("o_proj",), (arch.hidden_size,))
        gate_up = AdaptedLinear(
            torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]),
            None,
            ("gate_proj", "up_proj"),
            (arch.intermediate_size, arch.intermediate_size),
        )
        down = AdaptedLinear(w("mlp.down_proj.weight"), None, ("down_proj",), (arch.hidden_size,))
        self.input_norm = RMSNorm(w("input_layernorm.weight"), arch.rms_norm_eps)
        self.attn = Attention(arch, qkv, o_proj)
        self.post_attn_norm = RMSNorm(w("post_attention_layernorm.weight"), arch.rms_norm_eps)
        self.mlp = MLP(gate_up, down)

    def forward(
        self,
        h: torch.Tensor,
        batch: StepBatch,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        h = h + self.attn(self.input_norm(h), batch, rotary, *kv)
        return h + self.mlp(self.post_attn_norm(h), batch)


class LlamaModel(nn.Module):
    def __init__(
        self, arch: ModelArch, weights: Mapping[str, torch.Tensor], max_positions: int, device: torch.device
    ) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(arch, weights, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(weights["model.norm.weight"], arch.rms_norm_eps)
        head = weights["model.embed_tokens.weight"] if arch.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = Dense(head, None, keep_gemv_layout=False)
        self.rotary = RotaryTable(arch.rope, arch.head_dim, max_positions, device)

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
        """Next-token logits [len(batch.logits_rows), vocab] in fp32."""
        h = F.embedding(batch.token_ids, self.embed_tokens)
        rotary = self.rotary.lookup(batch.positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, batch, rotary, (kv.k[i], kv.v[i]))
        h = self.norm(h[batch.logits_rows])
        return self.lm_head(h).float()
