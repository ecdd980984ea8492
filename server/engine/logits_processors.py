"""Per-row logit controls of one step, applied in place between the forward and the sampler.

For every row whose request asks for them, in vLLM's order:

1. `logit_bias`: `logits[r, t] += bias` for each (t, bias) of the request.
2. `min_tokens`: while fewer tokens than that were generated, `logits[r, t] = -inf` for the EOS
   ids (unless `ignore_eos`) and the request's stop token ids.
3. penalties over the tokens seen so far (vLLM's `apply_penalties`, OpenAI's definitions):
   `repetition_penalty` over prompt + generated tokens: `l / p` where `l > 0`, else `l * p`;
   then `l -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)`, with `count[t]`
   how many times t was generated (the prompt does not count).

A step where no row uses them costs one look at each row's SamplingParams; otherwise only the
rows that do are touched, and penalties touch only the tokens a row has seen (a sparse gather and
scatter), never a [rows, vocab] buffer. A sequence's counts are kept here incrementally (the
tokens appended since the last step are added) for as long as it is sampled; min_p lives
in the sampler (server.engine.sampling), after the temperature.

It reads a sequence's prompt, its generated ids and its SamplingParams; it knows nothing about
the model, the scheduler or how tokens are sampled. Not thread-safe: the engine thread alone calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from server.engine.request import PreparedRequest, SamplingParams


class Sampled(Protocol):
    """What the processor reads of a sequence (server.engine.sequence.Sequence has it)."""

    @property
    def request(self) -> PreparedRequest: ...

    @property
    def output_ids(self) -> list[int]: ...


class _TokenCounts:
    """The distinct tokens a sequence has seen and how often it generated each, kept incrementally.

    Numpy buffers (grown by doubling) so that one step adds its token with two scalar writes and
    hands its entries to torch without copying them through Python lists."""

    def __init__(self, prompt_ids: Sequence[int]) -> None:
        self.position: dict[int, int] = {}  # token -> its index in the buffers
        self.ids = np.empty(max(16, len(prompt_ids)), dtype=np.int64)
        self.counts = np.zeros(len(self.ids), dtype=np.float32)
        self.size = 0
        self.counted = 0  # how many of the sequence's output ids are counted
        for token in prompt_ids:  # seen (repetition penalty), generated 0 times
            self._position(token)

    def count_new(self, output_ids: list[int]) -> None:
        for token in output_ids[self.counted :]:
            position = self._position(token)  # first: it may grow (replace) the buffers
            self.counts[position] += 1.0
        self.counted = len(output_ids)

    def _position(self, token: int) -> int:
        position = self.position.get(token)
        if position is None:
            if self.size == len(self.ids):
                self.ids = np.resize(self.ids, 2 * self.size)
                self.counts = np.concatenate([self.counts, np.zeros(self.size, dtype=np.float32)])
            position = self.position[token] = self.size
            self.ids[position] = token
            self.size += 1
        return position


@dataclass
class _RowState:
    """What a sampled sequence keeps between steps: its tensors made once and its token counts."""

    bias_ids: torch.Tensor  # [b] int64 token ids of logit_bias
    bias_values: torch.Tensor  # [b] fp32
    stop_ids: torch.Tensor  # [s] int64 ids masked until min_tokens (EOS unless ignore_eos, stop ids)
    counts: _TokenCounts | None  # None: no penalty


def uses_penalties(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


class LogitsProcessor:
    """Applies logit_bias, min_tokens and the penalties to a step's logits in place."""

    def __init__(self, eos_token_ids: frozenset[int]) -> None:
        self.eos_token_ids = eos_token_ids
        self._states: dict[Sampled, _RowState] = {}  # keyed by the sequence object (identity)

    def apply(self, logits: torch.Tensor, seqs: Sequence[Sampled]) -> dict[int, str]:
        """logits: [len(seqs), vocab] fp32, row i for seqs[i]; changed in place, only in rows that
        use a control. Sequences absent from a step are forgotten (they finished). Never raises:
        if processing fails, every row that uses a control is returned as {row: why} (to fail alone)."""
        rows = [i for i, s in enumerate(seqs) if s.request.sampling.processes_logits]
        if not rows:
            self._states.clear()
            return {}
        try:
            with torch.inference_mode():  # the forward's logits are inference tensors
                self._apply(logits, seqs, rows)
        except Exception as exc:  # fail the requests that asked for controls, not their neighbours
            self._states.clear()
            return dict.fromkeys(rows, f"applying logit_bias, min_tokens or penalties failed: {exc!r}")
        return {}

    def _apply(self, logits: torch.Tensor, seqs: Sequence[Sampled], rows: list[int]) -> None:
        states = {seqs[i]: self._states.get(seqs[i]) or self._new_state(seqs[i]) for i in rows}
        self._states = states
        penalized: list[int] = []
        for row in rows:
            seq = seqs[row]
            params, state = seq.request.sampling, states[seq]
            if params.logit_bias:  # 1) bias
                logits[row].index_add_(0, state.bias_ids, state.bias_values)
            if len(seq.output_ids) < params.min_tokens and len(state.stop_ids):  # 2) min_tokens
                logits[row].index_fill_(0, state.stop_ids, float("-inf"))
            if uses_penalties(params):
                penalized.append(row)
        if penalized:  # 3) penalties
            self._penalize(logits, [(row, seqs[row], states[seqs[row]]) for row in penalized])

    def _new_state(self, seq: Sampled) -> _RowState:
        params = seq.request.sampling
        bias = params.logit_bias
        stop = set(params.stop_token_ids) if params.min_tokens else set()
        if params.min_tokens and not params.ignore_eos:
            stop |= self.eos_token_ids
        state = _RowState(
            bias_ids=torch.tensor([t for t, _ in bias], dtype=torch.long),
            bias_values=torch.tensor([b for _, b in bias], dtype=torch.float32),
            stop_ids=torch.tensor(sorted(stop), dtype=torch.long),
            counts=None,
        )
        if uses_penalties(params):  # the prompt is "seen" for the repetition penalty only
            prompt = seq.request.prompt_token_ids if params.repetition_penalty != 1.0 else ()
            state.counts = _TokenCounts(prompt)
        return state

    @staticmethod
    def _penalize(logits: torch.Tensor, penalized: list[tuple[int, Sampled, _RowState]]) -> None:
        """The penalties of the given rows over the tokens each has seen: one gather, one scatter."""
        token_ids: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        lengths: list[int] = []
        for _, seq, state in penalized:
            seen = state.counts
            assert seen is not None
            seen.count_new(seq.output_ids)
            token_ids.append(seen.ids[: seen.size])
            counts.append(seen.counts[: seen.size])
            lengths.append(seen.size)
        if not sum(lengths):  # nothing seen yet (no repetition penalty, first token)
            return
        sizes = torch.tensor(lengths)
        params = [seq.request.sampling for _, seq, _ in penalized]
        per_row = torch.tensor(
            [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params],
            dtype=torch.float32,
        ).repeat_interleave(sizes, dim=0)  # [n, 3]: each entry's row's penalties
        rows = torch.tensor([row for row, _, _ in penalized]).repeat_interleave(sizes)
        index = (rows, torch.from_numpy(np.concatenate(token_ids)))  # [n], [n]
        count = torch.from_numpy(np.concatenate(counts))  # [n] times generated (0: prompt only)
        values = logits[index]  # [n]
        repetition, frequency, presence = per_row.unbind(-1)
        values = torch.where(values > 0, values / repetition, values * repetition)
        values -= frequency * count + presence * (count > 0)
        logits.index_put_(index, values)
