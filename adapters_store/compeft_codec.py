"""The bit coding of a ComPEFT adapter: which entries of tau are kept (Golomb-Rice coded gaps) and their signs.

Given the kept positions `p_0 < p_1 < ... < p_{K-1}` of a vector of `total` elements and a Rice
parameter k >= 0, each position becomes a gap `g_i = p_i - p_{i-1} - 1` (with `p_{-1} = -1`, so
`g_0 = p_0`), split into a quotient `q_i = g_i >> k` and a remainder `r_i = g_i & (2**k - 1)`:

    unary       q_i zero bits then a one bit (the terminator), for i = 0 .. K-1, concatenated;
                exactly K one bits, ceil((sum(q) + K) / 8) bytes
    remainders  each r_i as a fixed k-bit field, most significant bit first, concatenated;
                exactly ceil(K * k / 8) bytes (no bytes when k = 0)
    signs       one bit per kept entry in position order, 1 = negative (-1), 0 = positive (+1);
                exactly ceil(K / 8) bytes

Every stream packs its bits most significant bit first within a byte (numpy.packbits' default
bitorder "big") and pads its last byte with zero bits. The quotients sit apart from the
fixed-width remainders so that decoding is a handful of vectorized passes with no loop over
entries: unpack the unary bits, the indices of its one bits give the quotients by difference,
the remainders unpack as a [K, k] bit matrix, and a cumulative sum of `(q << k | r) + 1` gives
the positions.

The alternative a reader may compare with is a plain bitmap (one bit per element) plus the same
sign bits; `bitmap_nbytes` gives its size. Below a density of roughly 0.3 the Rice code is the
smaller. This module knows bits and positions, not adapters, modules or files: `where` in its
errors is the caller's name for the coded data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adapters_store.errors import AdapterError

MAX_RICE_K = 48  # a gap is below the element count, so k never needs more bits than it has


@dataclass(frozen=True, eq=False)
class RiceCodes:
    """The coded kept positions and signs of one vector: three uint8 streams, CPU, 1-D."""

    unary: torch.Tensor  # uint8 [ceil((sum(q) + kept) / 8)]
    remainders: torch.Tensor  # uint8 [ceil(kept * k / 8)]
    signs: torch.Tensor  # uint8 [ceil(kept / 8)]
    k: int  # the Rice parameter: bits per remainder
    kept: int  # entries kept, K

    @property
    def nbytes(self) -> int:
        return self.unary.numel() + self.remainders.numel() + self.signs.numel()


def packed_bytes(bits: int) -> int:
    return (bits + 7) // 8


def bitmap_nbytes(total: int, kept: int) -> int:
    """The size of the plain alternative: a `total`-bit keep mask plus the same `kept` sign bits."""
    return packed_bytes(total) + packed_bytes(kept)


def best_rice_k(gaps: np.ndarray) -> int:
    """The k that makes `sum(q) + K * (1 + k)` bits smallest for these gaps (ties: the smaller k)."""
    if gaps.size == 0:
        return 0
    largest = int(gaps.max()).bit_length()
    costs = [int((gaps >> k).sum()) + gaps.size * (1 + k) for k in range(min(largest, MAX_RICE_K) + 1)]
    return int(np.argmin(costs))


def encode_rice(positions: np.ndarray, negative: np.ndarray, k: int | None = None) -> RiceCodes:
    """Code strictly increasing int64 `positions` and their signs (`negative`: bool, one per position).

    k: the Rice parameter, else `best_rice_k` of the gaps.
    """
    positions = np.asarray(positions, dtype=np.int64)
    negative = np.asarray(negative, dtype=bool)
    assert positions.ndim == 1 and negative.shape == positions.shape
    kept = positions.size
    gaps = np.diff(positions, prepend=-1) - 1  # [kept] int64, >= 0 for increasing positions
    assert kept == 0 or (positions[0] >= 0 and gaps.min() >= 0), "positions must be increasing"
    k = best_rice_k(gaps) if k is None else k
    assert 0 <= k <= MAX_RICE_K
    quotients = gaps >> k
    # unary: terminator of entry i at bit (sum of q_0..q_i) + i
    terminators = np.cumsum(quotients + 1) - 1
    unary_bits = np.zeros(int(terminators[-1]) + 1 if kept else 0, dtype=np.uint8)
    unary_bits[terminators] = 1
    shifts = np.arange(k - 1, -1, -1, dtype=np.int64)  # most significant bit first
    remainder_bits = ((gaps[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return RiceCodes(
        unary=_packed(unary_bits),
        remainders=_packed(remainder_bits),
        signs=_packed(negative.astype(np.uint8)),
        k=k,
        kept=kept,
    )


def _packed(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits))


def check_stream_sizes(unary: int, remainders: int, signs: int, k: int, kept: int, total: int) -> str | None:
    """None when streams of these byte sizes can code `kept` of `total` positions with parameter k,
    else which stream is wrong and why (checked from sizes alone, before any data is read)."""
    if signs != packed_bytes(kept):
        return f"signs holds {signs} bytes; {kept} kept entries need {packed_bytes(kept)} (one bit each)"
    if remainders != packed_bytes(kept * k):
        return (
            f"remainders holds {remainders} bytes; {kept} kept entries of {k}-bit remainders need "
            f"{packed_bytes(kept * k)}"
        )
    most = packed_bytes((total >> k) + kept)  # every quotient bit moves a position at least 2**k on
    if not packed_bytes(kept) <= unary <= most:
        return (
            f"unary holds {unary} bytes; {kept} terminators of positions below {total} need between "
            f"{packed_bytes(kept)} and {most}"
        )
    return None


def decode_positions(codes: RiceCodes, total: int, where: str) -> np.ndarray:
    """The kept positions, int64 [kept], strictly increasing and below `total`; AdapterError naming
    `where` and the stream when the codes are malformed (wrong bit counts, truncated, out of range)."""
    kept, k = codes.kept, codes.k
    unary = codes.unary.numpy()
    # bit index of each terminator (nonzero on a bool view is several times faster than on uint8)
    ends = np.flatnonzero(np.unpackbits(unary).view(np.bool_))
    if ends.size != kept:
        raise AdapterError(
            f"{where}: tensor unary holds {ends.size} terminator bits, expected kept = {kept} "
            "(the codes are truncated or corrupt)"
        )
    if kept == 0:
        if unary.size:
            raise AdapterError(f"{where}: tensor unary holds {unary.size} bytes but kept is 0")
        return ends.astype(np.int64)
    if unary.size != int(ends[-1]) // 8 + 1:
        raise AdapterError(
            f"{where}: tensor unary runs {unary.size - int(ends[-1]) // 8 - 1} bytes past its last terminator"
        )
    quotients = np.diff(ends, prepend=-1) - 1
    # sum(q) << k <= the last position < total, checked before anything is shifted (no overflow)
    if int(ends[-1]) + 1 - kept > total >> k:
        raise AdapterError(f"{where}: the positions run past the {total} elements (tensor unary)")
    remainder_bits = np.unpackbits(codes.remainders.numpy())
    if remainder_bits[kept * k :].any():
        raise AdapterError(f"{where}: tensor remainders has bits set in its padding after {kept * k} bits")
    fields = remainder_bits[: kept * k].reshape(kept, k)
    remainders = np.zeros(kept, dtype=np.int64)
    for column in range(k):  # k passes over K entries: most significant bit first
        remainders = (remainders << 1) | fields[:, column]
    gaps = (quotients << k) | remainders
    # the float sum bounds the exact one, so the int64 cumsum below cannot overflow
    if float(gaps.sum(dtype=np.float64)) + kept > 2.0 * total:
        raise AdapterError(f"{where}: the positions run past the {total} elements")
    positions = np.cumsum(gaps + 1) - 1
    if int(positions[-1]) >= total:
        raise AdapterError(
            f"{where}: the last kept position is {int(positions[-1])}, past the {total} elements"
        )
    return positions


def decode_signs(codes: RiceCodes, where: str) -> np.ndarray:
    """The kept entries' signs, int8 [kept] in {-1, +1}."""
    bits = np.unpackbits(codes.signs.numpy()).view(np.int8)
    if bits[codes.kept :].any():
        raise AdapterError(f"{where}: tensor signs has bits set in its padding after {codes.kept} bits")
    return 1 - 2 * bits[: codes.kept]


def decode_dense(codes: RiceCodes, total: int, where: str) -> torch.Tensor:
    """The whole vector as int8 [total] in {-1, 0, +1}: the sign where kept, 0 elsewhere."""
    dense = np.zeros(total, dtype=np.int8)
    dense[decode_positions(codes, total, where)] = decode_signs(codes, where)
    return torch.from_numpy(dense)
