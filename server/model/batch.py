"""Per-step batch metadata, built once by the engine and passed to every layer.

A step's tokens are laid out flat: first one decode token per decoding sequence, then the
prefill chunks of sequences still reading their prompt. Nothing here knows about requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.model_ops import DecodeMeta


@dataclass(frozen=True)
class PrefillChunk:
    slot: int  # KV slot of the sequence
    start: int  # position of the chunk's first token
    length: int  # tokens in the chunk
    row: int  # row of the chunk's first token in the flat batch


@dataclass(frozen=True)
class DecodeSeq:
    slot: int
    position: int  # position of the token being decoded (= tokens already in the cache)
    token_id: int


@dataclass(frozen=True)
class StepBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    kv_slots: torch.Tensor  # [T] int64, slot each token's K/V is written to
    num_decode: int
    decode: DecodeMeta  # where the decode rows read their cached context
    prefills: tuple[PrefillChunk, ...]
    logits_rows: torch.Tensor  # [N + M] rows whose next-token logits are wanted: sampled, then scored
    adapter_batch: Any = None  # per-step adapter metadata (adapters_store.DeviceStep), None = base only
    num_sampled: int = -1  # the first N of logits_rows; the M after them score prompt tokens (-1 = all)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def build(
        cls,
        decodes: list[DecodeSeq],
        prefills: list[tuple[int, int, list[int], bool]],
        device: torch.device,
        adapter_batch: Any = None,
        prompt_scores: list[int] | None = None,
    ) -> StepBatch:
        """decodes: one token each; prefills: (slot, start, token_ids, wants_logits) per chunk.

        prompt_scores: per chunk, how many of its first tokens' logits are wanted too (to score the
        prompt token after each: log-probs of an echo request); their rows follow the sampled rows."""
        token_ids = [d.token_id for d in decodes]
        positions = [d.position for d in decodes]
        kv_slots = [d.slot for d in decodes]
        logits_rows = list(range(len(decodes)))
        chunks = []
        for slot, start, ids, wants_logits in prefills:
            row = len(token_ids)
            chunks.append(PrefillChunk(slot=slot, start=start, length=len(ids), row=row))
            token_ids.extend(ids)
            positions.extend(range(start, start + len(ids)))
            kv_slots.extend([slot] * len(ids))
            if wants_logits:
                logits_rows.append(row + len(ids) - 1)
        num_sampled = len(logits_rows)
        for chunk, count in zip(chunks, prompt_scores or [0] * len(chunks), strict=True):
            logits_rows.extend(range(chunk.row, chunk.row + count))

        num_decode = len(decodes)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            token_ids=as_tensor(token_ids),
            positions=as_tensor(positions),
            kv_slots=as_tensor(kv_slots),
            num_decode=num_decode,
            decode=DecodeMeta.build(kv_slots[:num_decode], positions[:num_decode], device),
            prefills=tuple(chunks),
            logits_rows=as_tensor(logits_rows),
            adapter_batch=adapter_batch,
            num_sampled=num_sampled,
        )
