"""ComPEFT adapters (`compeft`): a LoRA compressed to sparse signs with one scale, compressed, saved and served.

Compression (`compress_compeft`), following ComPEFT (Yadav et al. 2023):

0. (optional, `factors`) each module's A and B are replaced by other factors of the same B A:
   rescaled to equal norms ("balanced") or B A's canonical SVD factors ("svd", what `loramux
   compress` does by default); "as-trained" keeps the source's, as the paper does.
1. tau = every lora_A and lora_B of the source adapter (after step 0), flattened row-major and concatenated in
   the order of their PEFT key names (`base_model.model.model.layers.{i}.{block}.{proj}.lora_{A|B}.weight`
   sorted as strings: per module A [rank, in] then B [out, rank], modules sorted by PEFT name).
2. sigma = torch.std(tau), Bessel-corrected (divides by n - 1), computed in float64.
3. keep = the k = max(1, round(density * n)) entries of largest |tau| (one global threshold;
   Python's round, half to even; ties in |tau| go to the lower index), minus any that are
   exactly zero (their sign is 0, so they reconstruct as dropped).
4. gamma = alpha * sigma. Reconstruction: `A^ = gamma * sign(A) * mask_A`, `B^ = gamma * sign(B) * mask_B`
   (A and B separately, never their product); served as `y += scale * B^ (A^ x)` with each module's
   LoRA scale from the source (PEFT's alpha / r, rank_pattern, alpha_pattern, rslora).

A directory holds two files:

- `compeft_config.json` (version 2): format, version, density, alpha, sigma, gamma, the checksums,
  the Rice parameter `rice_k`, `total_elements` (n), `kept` (K) and `modules`, the adapted modules
  as groups `{"projection", "rank", "scale", "layers"}`; every field is described in
  adapters_store/compeft_config.py.
- `compeft_model.safetensors`: three 1-D U8 tensors, the streams described in
  adapters_store/compeft_codec.py: `unary` (the Golomb-Rice quotients of the gaps between kept
  positions, in unary), `remainders` (their k-bit remainders) and `signs` (1 = negative).
  Positions index tau, 0 .. n - 1.

The layout of tau is not stored; a reader derives it from the groups and the base model:

1. list every (layer, projection) of every group, with its group's rank and scale;
2. sort them by PEFT module name `model.layers.{layer}.{block}.{projection}`, block `mlp` for
   gate/up/down_proj and `self_attn` for q/k/v/o_proj, compared as strings: so layer 10 comes
   before layer 2, and within a layer down, gate, up, then k, o, q, v;
3. in that order each module takes rank * in_features elements for A [rank, in_features], then
   out_features * rank for B [out_features, rank], both row-major, end to end from offset 0, with
   in_features and out_features the projection's in the base model; the sum is total_elements.

A reader: decode the positions and signs (compeft_codec.py), scatter the signs into an int8
vector of n zeros, cut it into each module's A and B as above, multiply by gamma.

The loader checks the config (types, ranges, layers and ranks against the base model, the sizes
they imply against total_elements, gamma and scales within adapters_store.limits), then the weight
file's header (names, dtypes, the stream sizes the counts imply, `max_bytes`), before reading any
data; then the file's checksum against the config's and every code (bit counts, padding, positions
within n). A refused directory raises AdapterError naming the field or tensor and the file, and
leaves nothing loaded. The host form keeps the codes as stored (nbytes counts the coded bytes);
`ternary()` decodes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from adapters_store.adapter import CompeftAdapter, LoadedAdapter, LoraWeights, ModuleKey, TernaryFactors
from adapters_store.compeft_codec import (
    RiceCodes,
    check_stream_sizes,
    decode_dense,
    decode_positions,
    decode_signs,
    encode_rice,
)
from adapters_store.compeft_config import (
    CONFIG_FILE,
    FACTOR_FORMS,
    FORMAT,
    CompeftConfig,
    ModuleLayout,
    config_json,
    config_text,
    parse_compeft_config,
)
from adapters_store.errors import AdapterError, AdapterTooLarge, shown
from adapters_store.limits import MAX_ABS_WEIGHT
from adapters_store.peft_config import read_config_json
from adapters_store.safetensors_header import SafetensorsHeader, read_header
from adapters_store.spec import BaseModelSpec, module_name

WEIGHTS_FILE = "compeft_model.safetensors"
STREAMS = ("unary", "remainders", "signs")
MiB = 1 << 20


@dataclass(frozen=True, eq=False)
class CompeftCodes:
    """A compressed adapter in memory: its coded positions and signs, the module layout and the scalars."""

    rice: RiceCodes
    modules: tuple[ModuleLayout, ...]  # sorted by PEFT key, end to end in tau
    total_elements: int
    density: float
    alpha: float
    sigma: float
    gamma: float
    source_checksum: str
    factors: str = "as-trained"  # how each module's A and B were re-factored before step 1 (FACTOR_FORMS)

    @property
    def balanced(self) -> bool:
        """Whether A and B had equal norms per module before step 1 ("balanced" and "svd" both do)."""
        return self.factors != "as-trained"

    @property
    def nbytes(self) -> int:
        return self.rice.nbytes

    def with_alpha(self, alpha: float) -> CompeftCodes:
        """The same codes with another alpha: only gamma changes (the served delta scales as alpha**2)."""
        return replace(self, alpha=alpha, gamma=alpha * self.sigma)

    def kept_fractions(self) -> tuple[float, float]:
        """The fraction of all A entries and of all B entries kept: far apart means one factor lost its terms."""
        dense = decode_dense(self.rice, self.total_elements, "compeft codes")
        kept, sizes = [0, 0], [0, 0]
        for m in self.modules:
            split = m.offset + m.rank * m.in_features
            for side, (start, end) in enumerate(((m.offset, split), (split, m.offset + m.numel))):
                kept[side] += int(dense[start:end].count_nonzero())
                sizes[side] += end - start
        return kept[0] / sizes[0], kept[1] / sizes[1]

    def ternary(self, where: str = "compeft codes") -> dict[ModuleKey, TernaryFactors]:
        """Per module its int8 signs (views of one decoded vector) and LoRA scale."""
        dense = self.signs(where).numpy()
        factors = {}
        for m in self.modules:  # numpy slicing: a third of the cost of torch views over ~200 modules
            split = m.offset + m.rank * m.in_features
            sign_a = torch.from_numpy(dense[m.offset : split].reshape(m.rank, m.in_features))
            sign_b = torch.from_numpy(dense[split : m.offset + m.numel].reshape(m.out_features, m.rank))
            factors[m.layer, m.projection] = TernaryFactors(sign_A=sign_a, sign_B=sign_b, scale=m.scale)
        return factors

    def signs(self, where: str = "compeft codes") -> torch.Tensor:
        """The decoded vector tau's signs, int8 [total_elements]: `modules` says where each factor is."""
        return decode_dense(self.rice, self.total_elements, where)

    def lora_weights(self, where: str = "compeft codes") -> dict[ModuleKey, LoraWeights]:
        """Per module `gamma * signs` as fp32 A and B: one decode and one multiply over the whole
        vector, then views (per-module conversions cost more than the decode itself)."""
        values = decode_dense(self.rice, self.total_elements, where).numpy().astype(np.float32)
        values *= np.float32(self.gamma)
        weights = {}
        for m in self.modules:
            split = m.offset + m.rank * m.in_features
            a = torch.from_numpy(values[m.offset : split].reshape(m.rank, m.in_features))
            b = torch.from_numpy(values[split : m.offset + m.numel].reshape(m.out_features, m.rank))
            weights[m.layer, m.projection] = LoraWeights(A=a, B=b, scale=m.scale)
        return weights


def compress_compeft(
    source: LoadedAdapter, density: float, alpha: float, *, factors: str = "as-trained"
) -> CompeftCodes:
    """ComPEFT of `source`'s LoRA factors (any format; PEFT LoRA in practice) at `density` and `alpha`.

    factors: which factors of each module's B A are compressed (the product, and so the adapter,
    is the same for all three; what differs is how well signs with one scale approximate them):
    - "as-trained": the source's A and B, ComPEFT as published. A trained LoRA's A is still mostly
      its random initialisation and larger than B, so one global threshold keeps nearly all of
      A and almost nothing of B;
    - "balanced": A * c and B / c, c = sqrt(||B|| / ||A||), equal norms per module;
    - "svd": B A's canonical factors, B' = U sqrt(S), A' = sqrt(S) V^T (`canonical_factors`):
      equal norms too, and each row of A' a mix of A's rows, closer to Gaussian than the uniform
      initialisation, which signs approximate better (the product's error: bench/RESULTS.md,
      "ComPEFT of the canonical factors").
    """
    if factors not in FACTOR_FORMS:
        raise ValueError(f"factors must be one of {', '.join(FACTOR_FORMS)}, got {factors!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    weights = source.lora_weights()
    modules, parts, offset = [], [], 0
    for layer, projection in sorted(weights, key=lambda key: module_name(*key)):
        w = weights[layer, projection]
        out_features, in_features = w.B.shape[0], w.A.shape[1]
        modules.append(ModuleLayout(layer, projection, w.rank, in_features, out_features, w.scale, offset))
        a, b = w.A.double(), w.B.double()
        norm_a, norm_b = float(a.norm()), float(b.norm())
        if factors == "svd":
            a, b = canonical_factors(a, b)
        elif factors == "balanced" and norm_a > 0 and norm_b > 0:
            c = (norm_b / norm_a) ** 0.5
            a, b = a * c, b / c
        parts += [a.reshape(-1), b.reshape(-1)]
        offset += modules[-1].numel
    tau = torch.cat(parts)  # [n] float64
    if tau.numel() < 2:
        raise ValueError("an adapter of fewer than 2 elements has no standard deviation")
    sigma = float(torch.std(tau))  # Bessel-corrected
    values = tau.numpy()
    count = max(1, round(density * values.size))
    keep = np.argsort(-np.abs(values), kind="stable")[:count]  # ties: lower index first
    positions = np.sort(keep)
    positions = positions[values[positions] != 0]
    gamma = alpha * sigma
    if not gamma <= MAX_ABS_WEIGHT:
        raise ValueError(
            f"gamma = alpha * sigma = {gamma:g} is above {MAX_ABS_WEIGHT:g}; use a smaller alpha"
        )
    return CompeftCodes(
        rice=encode_rice(positions, values[positions] < 0),
        modules=tuple(modules),
        total_elements=int(values.size),
        density=float(density),
        alpha=float(alpha),
        sigma=sigma,
        gamma=gamma,
        source_checksum=source.checksum,
        factors=factors,
    )


def canonical_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = B A: B' = U sqrt(S), A' = sqrt(S) V^T from the thin SVD of B A.

    Through the QR of B (out x r), so the SVD is of an r x in matrix, never of the out x in product.
    Each pair of singular vectors is signed so that the largest entry of its row of A' is positive:
    the factors (and sigma, which depends on their mean) then do not depend on the SVD routine."""
    q, r = torch.linalg.qr(b)  # b = q r, q [out, r] orthonormal
    u, s, vh = torch.linalg.svd(r @ a, full_matrices=False)
    sign = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    root = s.sqrt() * torch.where(sign == 0, 1.0, sign).to(s.dtype)
    return s.sqrt()[:, None] * vh * sign[:, None], (q @ u) * root


def save_compeft(
    codes: CompeftCodes,
    directory: Path | str,
    *,
    base_model: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> CompeftConfig:
    """Write `codes` as a compeft directory (created if missing): the weights first, the config last,
    so a directory is recognised only once complete. `extra`: more config keys (e.g. "fidelity")."""
    directory = Path(directory)
    directory.mkdir(exist_ok=True)
    data = safetensors.torch.save(
        {"unary": codes.rice.unary, "remainders": codes.rice.remainders, "signs": codes.rice.signs}
    )
    (directory / WEIGHTS_FILE).write_bytes(data)
    config = CompeftConfig(
        base_model=base_model,
        density=codes.density,
        alpha=codes.alpha,
        sigma=codes.sigma,
        gamma=codes.gamma,
        source_checksum=codes.source_checksum,
        checksum="sha256:" + hashlib.sha256(data).hexdigest(),
        rice_k=codes.rice.k,
        total_elements=codes.total_elements,
        kept=codes.rice.kept,
        modules=codes.modules,
        factors=codes.factors,
    )
    document = {**config_json(config), **(extra or {})}
    (directory / CONFIG_FILE).write_text(config_text(document))
    return config


@dataclass(frozen=True, eq=False)
class CodedCompeftAdapter(CompeftAdapter):
    """A loaded compeft adapter whose host form is the codes as stored."""

    codes: CompeftCodes

    def ternary(self) -> Mapping[ModuleKey, TernaryFactors]:
        return self.codes.ternary(f"{self.name}/{WEIGHTS_FILE}")

    def sign_layout(self) -> tuple[torch.Tensor, tuple[ModuleLayout, ...]]:
        return self.codes.signs(f"{self.name}/{WEIGHTS_FILE}"), self.codes.modules

    def lora_weights(self) -> Mapping[ModuleKey, LoraWeights]:
        return self.codes.lora_weights(f"{self.name}/{WEIGHTS_FILE}")


def load_compeft(
    directory: Path | str,
    spec: BaseModelSpec,
    name: str,
    *,
    label: str | None = None,
    max_bytes: int | None = None,
) -> CodedCompeftAdapter:
    """Load and validate the compeft adapter in `directory` against `spec`, registered as `name`.

    label: the directory as messages name it (default its name); max_bytes: the most host memory
    (the coded bytes) the adapter may take, else AdapterTooLarge before its data is read.
    """
    directory = Path(directory)
    label = label or directory.name
    config_source = f"{label}/{CONFIG_FILE}"
    config = parse_compeft_config(
        read_config_json(directory / CONFIG_FILE, config_source), spec, config_source
    )
    where = f"{label}/{WEIGHTS_FILE}"
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        what = "is missing" if not path.exists() else "is not a regular file"
        raise AdapterError(f"{where} {what}: a compeft directory needs it beside {CONFIG_FILE}")
    try:
        with path.open("rb") as file:
            header = read_header(file, where)
            _check_header(header, config, where)
            nbytes = header.file_size - header.data_start
            if max_bytes is not None and nbytes > max_bytes:
                raise AdapterTooLarge(
                    f"{where}: the adapter needs {nbytes / MiB:.1f} MiB of host memory, more than the "
                    f"{max_bytes / MiB:.1f} MiB one adapter may take; raise --max-adapter-mb (at most "
                    "--host-cache-mb) or use a smaller adapter"
                )
            file.seek(0)
            data = file.read(header.file_size + 1)
    except OSError as exc:
        raise AdapterError(f"cannot read {where}: {exc.strerror or type(exc).__name__}") from None
    if len(data) != header.file_size:
        raise AdapterError(f"{where} changed while it was read; try again once it is written")
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    if checksum != config.checksum:
        raise AdapterError(
            f"{where}: its checksum {checksum} does not match the config's checksum {config.checksum} "
            f"({CONFIG_FILE}); the file is corrupt or belongs to another config: compress the adapter again"
        )
    streams = {stream: _stream(data, header, stream) for stream in STREAMS}  # copies, not views of `data`
    rice = RiceCodes(**streams, k=config.rice_k, kept=config.kept)
    decode_positions(rice, config.total_elements, where)  # every code checked once, at load
    decode_signs(rice, where)
    codes = CompeftCodes(
        rice=rice,
        modules=config.modules,
        total_elements=config.total_elements,
        density=config.density,
        alpha=config.alpha,
        sigma=config.sigma,
        gamma=config.gamma,
        source_checksum=config.source_checksum,
        factors=config.factors,
    )
    adapted = {m.projection for m in config.modules}
    return CodedCompeftAdapter(
        name=name,
        format=FORMAT,
        source=directory,
        checksum=checksum,
        nbytes=codes.nbytes,
        rank=max(m.rank for m in config.modules),
        target_modules=tuple(p for p in spec.projections if p in adapted),
        gamma=config.gamma,
        density=config.density,
        codes=codes,
    )


def _check_header(header: SafetensorsHeader, config: CompeftConfig, where: str) -> None:
    """Exactly the three 1-D U8 streams, of the sizes the config's counts imply."""
    for name in sorted(header.tensors):
        if name not in STREAMS:
            raise AdapterError(
                f"{where}: unexpected tensor {shown(name)}; a compeft file holds {', '.join(STREAMS)}"
            )
    sizes = {}
    for name in STREAMS:
        entry = header.tensors.get(name)
        if entry is None:
            raise AdapterError(f"{where}: missing tensor {name}; a compeft file holds {', '.join(STREAMS)}")
        if entry.dtype != "U8":
            raise AdapterError(f"{where}: tensor {name} has dtype {entry.dtype}; expected U8 (packed bits)")
        if len(entry.shape) != 1:
            raise AdapterError(
                f"{where}: tensor {name} has shape {list(entry.shape)}; expected one dimension"
            )
        sizes[name] = entry.shape[0]
    problem = check_stream_sizes(
        sizes["unary"], sizes["remainders"], sizes["signs"], config.rice_k, config.kept, config.total_elements
    )
    if problem is not None:
        raise AdapterError(
            f"{where}: tensor {problem} (kept = {config.kept}, rice_k = {config.rice_k}, total_elements = "
            f"{config.total_elements} in {CONFIG_FILE}); the file is truncated or does not match its config"
        )


def _stream(data: bytes, header: SafetensorsHeader, name: str) -> torch.Tensor:
    entry = header.tensors[name]
    if entry.begin == entry.end:
        return torch.empty(0, dtype=torch.uint8)
    start = header.data_start + entry.begin
    return torch.frombuffer(bytearray(data[start : header.data_start + entry.end]), dtype=torch.uint8)
