"""The compeft format: reconstruction against an independent ComPEFT oracle, the codes round-trip
exactly, and every kind of malformed compressed directory is refused naming its field or tensor."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from adapters_store import (
    AdapterError,
    AdapterTooLarge,
    BaseModelSpec,
    CodedCompeftAdapter,
    compress_compeft,
    detect_format,
    load_adapter,
    load_compeft,
    load_peft_lora,
    save_compeft,
)
from adapters_store.compeft import CompeftCodes
from adapters_store.compeft_codec import bitmap_nbytes, decode_positions, decode_signs, encode_rice
from adapters_store.compeft_config import ModuleLayout
from adapters_store.spec import module_name
from tests.adapters_store.adapter_cases import peft_factors
from tests.adapters_store.conftest import AdapterFactory

CONFIG = "compeft_config.json"
WEIGHTS = "compeft_model.safetensors"


# -- the oracle: ComPEFT written out again from the paper's description, on PEFT's own files ------


def oracle(
    source: Path, model: Any, density: float, alpha: float, factors: str = "as-trained"
) -> dict[tuple[int, str], tuple]:
    """(layer, projection) -> (A^, B^, scale) computed from the PEFT file and PEFT's own scaling.

    factors "balanced": each module's A times sqrt(|B| / |A|) and B divided by it first (Frobenius
    norms); "svd": A = sqrt(S) V^T and B = U sqrt(S) from the SVD of the whole product B A."""
    tensors = safetensors.torch.load_file(source / "adapter_model.safetensors")
    keys = sorted(tensors)  # PEFT key names, as strings
    tensors = {key: tensor.double() for key, tensor in tensors.items()}
    for key in keys:
        if ".lora_A." not in key or factors == "as-trained":
            continue
        partner = key.replace(".lora_A.", ".lora_B.")
        a, b = tensors[key], tensors[partner]
        if factors == "balanced":
            c = (b.norm() / a.norm()).sqrt()
            tensors[key], tensors[partner] = a * c, b / c
        else:
            u, s, vh = torch.linalg.svd(b @ a)
            r = a.shape[0]
            for i in range(r):  # each pair signed so that its row of A's largest entry is positive
                if vh[i, vh[i].abs().argmax()] < 0:
                    u[:, i], vh[i] = -u[:, i], -vh[i]
            tensors[key] = s[:r].sqrt()[:, None] * vh[:r]
            tensors[partner] = u[:, :r] * s[:r].sqrt()
    tau = torch.cat([tensors[key].double().flatten() for key in keys])
    sigma = tau.std(correction=1).item()
    count = max(1, round(density * tau.numel()))
    threshold = tau.abs().sort(descending=True).values[count - 1]  # random values: no ties
    mask = tau.abs() >= threshold
    assert int(mask.sum()) == count
    recon = (alpha * sigma) * torch.sign(tau) * mask
    scales = {key: scaling for key, (_, _, scaling) in peft_factors(model).items()}
    out: dict[tuple[int, str], list] = {}
    offset = 0
    for key in keys:
        numel = tensors[key].numel()
        part = recon[offset : offset + numel].reshape(tensors[key].shape).float()
        offset += numel
        parts = key.split(".")
        module = (int(parts[4]), parts[6])
        out.setdefault(module, [None, None, scales[module]])[0 if parts[7] == "lora_A" else 1] = part
    return {module: tuple(value) for module, value in out.items()}


LORA_CONFIGS = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
}


def _compressed(make_adapter: AdapterFactory, spec: BaseModelSpec, kind: str, density: float, alpha: float):
    source, model = make_adapter(name="src", **LORA_CONFIGS[kind])
    codes = compress_compeft(load_peft_lora(source, spec, "src"), density, alpha)
    target = source.parent / "c"
    save_compeft(codes, target, base_model="tiny")
    return source, model, codes, target


@pytest.mark.parametrize("kind", list(LORA_CONFIGS))
@pytest.mark.parametrize("density", [0.002, 0.1, 0.5, 1.0])
def test_reconstruction_equals_compeft_computed_independently(
    make_adapter: AdapterFactory, spec: BaseModelSpec, kind: str, density: float
) -> None:
    source, model, _, target = _compressed(make_adapter, spec, kind, density, alpha=2.5)
    adapter = load_compeft(target, spec, "c")
    expected = oracle(source, model, density, alpha=2.5)
    loaded = adapter.lora_weights()
    assert set(loaded) == set(expected)
    for key, (a, b, scale) in expected.items():
        torch.testing.assert_close(loaded[key].A, a, rtol=1e-6, atol=0)
        torch.testing.assert_close(loaded[key].B, b, rtol=1e-6, atol=0)
        assert loaded[key].scale == pytest.approx(scale, rel=1e-12)
    config = json.loads((target / CONFIG).read_text())
    tensors = safetensors.torch.load_file(source / "adapter_model.safetensors")
    tau = torch.cat([tensors[k].double().flatten() for k in sorted(tensors)])
    assert config["sigma"] == pytest.approx(tau.std().item(), rel=1e-12)
    assert config["gamma"] == pytest.approx(2.5 * config["sigma"], rel=1e-12)
    digest = hashlib.sha256((source / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert config["source_checksum"] == f"sha256:{digest}"
    assert config["kept"] == max(1, round(density * tau.numel()))
    assert detect_format(target) == "compeft"
    assert adapter.format == "compeft" and adapter.nbytes == adapter.codes.rice.nbytes


@pytest.mark.parametrize("density", [0.05, 0.3])
def test_balanced_reconstruction_equals_compeft_of_the_rescaled_factors(
    make_adapter: AdapterFactory, spec: BaseModelSpec, density: float
) -> None:
    """factors "balanced" is ComPEFT on each module's A * c, B / c, c = sqrt(|B|/|A|):
    the same adapter (B A unchanged), factors of equal norm, so both keep entries."""
    source, model = make_adapter(name="src", **LORA_CONFIGS["all-linear"])
    with torch.no_grad():  # a trained LoRA's A is larger than its B: make it so, lopsided
        tensors = safetensors.torch.load_file(source / "adapter_model.safetensors")
        tensors = {k: t * (4.0 if ".lora_A." in k else 0.25) for k, t in tensors.items()}
        safetensors.torch.save_file(tensors, source / "adapter_model.safetensors")
    adapter = load_peft_lora(source, spec, "src")
    plain = compress_compeft(adapter, density, 2.0)
    balanced = compress_compeft(adapter, density, 2.0, factors="balanced")
    save_compeft(balanced, source.parent / "b", base_model="tiny")
    loaded = load_compeft(source.parent / "b", spec, "b")
    assert (
        loaded.codes.balanced and json.loads((source.parent / "b" / CONFIG).read_text())["balanced"] is True
    )
    expected = oracle(source, model, density, alpha=2.0, factors="balanced")
    weights = loaded.lora_weights()
    for key, (a, b, scale) in expected.items():
        torch.testing.assert_close(weights[key].A, a, rtol=1e-6, atol=0)
        torch.testing.assert_close(weights[key].B, b, rtol=1e-6, atol=0)
        assert weights[key].scale == pytest.approx(scale, rel=1e-12)

    def kept_b(codes: Any) -> int:
        return sum(int(f.sign_B.count_nonzero()) for f in codes.ternary("x").values())

    assert kept_b(plain) < kept_b(balanced)  # the lopsided adapter keeps more of B when balanced


def _trained_like(make_adapter: AdapterFactory, seed: int) -> tuple[Path, Any]:
    """An adapter shaped like a briefly trained LoRA: A still its uniform initialisation, B small."""
    source, model = make_adapter(name="src", **LORA_CONFIGS["all-linear"])
    generator = torch.Generator().manual_seed(seed)
    tensors = safetensors.torch.load_file(source / "adapter_model.safetensors")
    tensors = {
        k: (torch.rand(t.shape, generator=generator) * 2 - 1) * 0.1
        if ".lora_A." in k
        else torch.randn(t.shape, generator=generator) * 0.01
        for k, t in tensors.items()
    }
    safetensors.torch.save_file(tensors, source / "adapter_model.safetensors")
    return source, model


@pytest.mark.parametrize("density", [0.05, 0.3])
def test_svd_reconstruction_equals_compeft_of_the_canonical_factors(
    make_adapter: AdapterFactory, spec: BaseModelSpec, density: float
) -> None:
    """factors "svd" (loramux compress's default) is ComPEFT on B A's canonical factors U sqrt(S),
    sqrt(S) V^T, here from the SVD of the whole product (the code goes through the QR of B), each
    pair of singular vectors signed so that the largest entry of A's row is positive."""
    source, model = _trained_like(make_adapter, seed=3)
    codes = compress_compeft(load_peft_lora(source, spec, "src"), density, 2.0, factors="svd")
    save_compeft(codes, source.parent / "s", base_model="tiny")
    document = json.loads((source.parent / "s" / CONFIG).read_text())
    assert document["factors"] == "svd" and document["balanced"] is True
    loaded = load_compeft(source.parent / "s", spec, "s")
    assert loaded.codes.factors == "svd" and loaded.codes.kept_fractions()[1] > 0
    weights = loaded.lora_weights()
    for key, (a, b, scale) in oracle(source, model, density, alpha=2.0, factors="svd").items():
        torch.testing.assert_close(weights[key].A, a, rtol=1e-6, atol=0)
        torch.testing.assert_close(weights[key].B, b, rtol=1e-6, atol=0)
        assert weights[key].scale == pytest.approx(scale, rel=1e-12)


def test_svd_factors_approximate_the_adapter_better_than_balanced_ones(
    make_adapter: AdapterFactory, spec: BaseModelSpec
) -> None:
    """Why "svd" is the default: at the same density and the best scale for each, the signs of the
    canonical factors give a product B^ A^ nearer the adapter's B A than those of balanced ones."""
    source, _ = _trained_like(make_adapter, seed=4)
    adapter = load_peft_lora(source, spec, "src")
    exact = {key: (w.B.double() @ w.A.double()) for key, w in adapter.lora_weights().items()}

    def error(factors: str) -> float:
        weights = compress_compeft(adapter, 0.1, 1.0, factors=factors).lora_weights()
        got = {key: w.B.double() @ w.A.double() for key, w in weights.items()}
        # the one scale that fits best (gamma is alpha * sigma; alpha is tuned separately)
        power = sum((got[k] ** 2).sum() for k in exact)  # 0 when every module lost one factor
        fit = sum((got[k] * exact[k]).sum() for k in exact) / power if power > 0 else 0.0
        residual = sum(((fit * got[k] - exact[k]) ** 2).sum() for k in exact)
        return float(residual / sum((exact[k] ** 2).sum() for k in exact))

    assert error("svd") < error("balanced") < error("as-trained")


def test_ties_go_to_the_lower_index_and_zeros_are_never_kept(
    make_adapter: AdapterFactory, spec: BaseModelSpec
) -> None:
    source, _ = make_adapter(name="src", r=2, lora_alpha=2, target_modules=["q_proj"])

    def flatten_then_fill(tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:  # every |x| = 0.5, A's positive, B zero (PEFT's own initialisation of B)
            tensors[key] = torch.full_like(tensors[key], 0.5) if "lora_A" in key else tensors[key] * 0

    tensors = safetensors.torch.load_file(source / "adapter_model.safetensors")
    flatten_then_fill(tensors)
    safetensors.torch.save_file(tensors, source / "adapter_model.safetensors")
    lora = load_peft_lora(source, spec, "src")
    numel_a = 2 * 64  # per layer: A [2, 64] then B [64, 2]
    codes = compress_compeft(lora, 0.05, 1.0)
    count = round(0.05 * 4 * numel_a)
    positions = decode_positions(codes.rice, codes.total_elements, "t")
    assert positions.tolist() == list(range(count))  # the first `count` of layer 0's A
    everything = compress_compeft(lora, 1.0, 1.0)  # density 1 keeps all but the zeros of B
    ternary = everything.ternary()
    for factors in ternary.values():
        assert bool((factors.sign_A == 1).all()) and not factors.sign_B.any()


@pytest.mark.parametrize("total", [1, 2, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_codes_round_trip_over_sizes_densities_and_rice_parameters(total: int) -> None:
    rng = np.random.default_rng(total)
    for kept in sorted({1, max(1, total // 37), total // 2 or 1, total}):
        positions = np.sort(rng.choice(total, kept, replace=False))
        negative = rng.random(kept) < 0.5
        for k in (None, 0, 1, 5, 12):
            codes = encode_rice(positions, negative, k)
            assert decode_positions(codes, total, "t").tolist() == positions.tolist()
            assert (decode_signs(codes, "t") == np.where(negative, -1, 1)).all()


def test_saved_codes_load_to_the_same_masks_and_signs(
    make_adapter: AdapterFactory, spec: BaseModelSpec
) -> None:
    for density in (0.001, 0.03, 0.37, 1.0):
        _, _, codes, target = _compressed(make_adapter, spec, "patterns", density, alpha=1.0)
        loaded = load_adapter(target, spec, "c")
        assert isinstance(loaded, CodedCompeftAdapter)
        before, after = codes.ternary(), loaded.ternary()
        assert set(before) == set(after)
        for key in before:
            assert torch.equal(before[key].sign_A, after[key].sign_A)
            assert torch.equal(before[key].sign_B, after[key].sign_B)
            assert before[key].sign_A.dtype == torch.int8


def test_rice_codes_are_smaller_than_a_bitmap_at_low_density() -> None:
    total = 200_000
    rng = np.random.default_rng(0)
    for density in (0.05, 0.1, 0.2):
        kept = round(density * total)
        codes = encode_rice(np.sort(rng.choice(total, kept, replace=False)), rng.random(kept) < 0.5)
        assert codes.nbytes < bitmap_nbytes(total, kept)
        entropy = -(density * math.log2(density) + (1 - density) * math.log2(1 - density))
        assert codes.nbytes * 8 < 1.1 * (entropy * total + kept)  # within 10% of the bound


# -- refusals ------------------------------------------------------------------------------------


def _edit_config(target: Path, **changes: Any) -> None:
    """Set top-level keys, or `module{i}_{field}=value` for a field of group i of "modules"."""
    config = json.loads((target / CONFIG).read_text())
    for key, value in changes.items():
        if key.startswith("module") and "_" in key and key[6].isdigit():
            index, field = key.removeprefix("module").split("_", 1)
            config["modules"][int(index)][field] = value
        else:
            config[key] = value
    (target / CONFIG).write_text(json.dumps(config))


def _edit_tensors(target: Path, change: Any, *, resync: bool = True) -> None:
    """Rewrite the streams; `resync` records the new file's checksum, so the later checks are reached."""
    tensors = safetensors.torch.load_file(target / WEIGHTS)
    change(tensors)
    data = safetensors.torch.save(tensors)
    (target / WEIGHTS).write_bytes(data)
    if resync:
        _edit_config(target, checksum="sha256:" + hashlib.sha256(data).hexdigest())


def _drop_last_byte(name: str) -> Any:
    return lambda t: t.__setitem__(name, t[name][:-1].clone())


def _add_byte(name: str, value: int = 0) -> Any:
    return lambda t: t.__setitem__(name, torch.cat([t[name], torch.tensor([value], dtype=torch.uint8)]))


def _set_padding_bit(name: str) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name][-1] |= 1  # kept = 781 is not a multiple of 8: the last bit is padding

    return change


def _past_the_end(tensors: dict[str, torch.Tensor]) -> None:
    """Recode the positions with the last one moved beyond the elements (same k, counts, signs)."""
    codes = _CODES["codes"]
    positions = decode_positions(codes.rice, codes.total_elements, "t").copy()
    positions[-1] = codes.total_elements + 2
    recoded = encode_rice(positions, np.zeros(positions.size, dtype=bool), codes.rice.k)
    tensors["unary"] = recoded.unary


_CODES: dict[str, Any] = {}

# The fixture's groups: modules[0] is q_proj (layers [0, 1]), modules[1] k_proj, ... rank 4, scale 2.
GROUP = dict(projection="q_proj", rank=4, scale=2.0, layers=[0, 1])
CONFIG_CASES = {
    "density zero": (dict(density=0), "compeft_config.json: density = 0.0 must be in"),
    "density above one": (dict(density=1.5), "density = 1.5 must be in"),
    "density a string": (dict(density="0.1"), "density must be a number"),
    "gamma not finite": (dict(gamma=float("nan")), "gamma = nan must be finite"),
    "gamma out of range": (dict(gamma=1e6), "gamma = 1000000.0 is out of range"),
    "gamma not alpha * sigma": (dict(gamma=0.5), "gamma = 0.5 is not alpha . sigma"),
    "alpha negative": (dict(alpha=-1), "alpha = -1.0 must be > 0"),
    "total": (
        dict(total_elements=7809),
        "total_elements = 7809, but the modules hold 7808 with the base model's projection sizes",
    ),
    "kept": (dict(kept=10**7), "kept = 10000000 is more than total_elements"),
    "factors unknown": (
        dict(factors="qr"),
        "factors is 'qr', expected one of 'as-trained', 'balanced', 'svd'",
    ),
    "balanced contradicts factors": (
        dict(factors="svd", balanced=False),
        "balanced = False contradicts factors = 'svd'",
    ),
    "balanced a string": (dict(balanced="yes"), "balanced must be true or false"),
    "checksum field": (dict(checksum="md5:00"), "checksum must be 'sha256:'"),
    "version 1": (
        dict(version=1),
        "version is 1; loramux reads version 2; it was written by an older loramux: run `loramux compress`",
    ),
    "version 3": (dict(version=3), "version is 3; loramux reads version 2$"),
    "rice_k": (dict(rice_k=99), "rice_k = 99 is above"),
    # modules: the list, then each group's fields by name
    "modules missing": (dict(modules=None), "modules must be a non-empty list of module groups"),
    "modules empty": (dict(modules=[]), "modules must be a non-empty list of module groups"),
    "too many groups": (dict(modules=[GROUP] * 15), "modules lists 15 groups; the base model has only 14"),
    "group not an object": (
        dict(modules=[["q_proj", 4]]),
        r"modules\[0\] must be an object, got \['q_proj', 4\]",
    ),
    "a group dropped": (
        dict(modules=[dict(GROUP, projection="k_proj")]),
        "total_elements = 7808, but the modules hold 768",
    ),
    "projection unknown": (dict(module0_projection="lm_head"), r"modules\[0\].projection is 'lm_head'"),
    "projection missing": (dict(module3_projection=None), r"modules\[3\].projection is None; the base model"),
    "rank above max": (dict(module0_rank=17), r"modules\[0\].rank = 17 must be in \[1, 16\]"),
    "rank zero": (dict(module2_rank=0), r"modules\[2\].rank = 0 must be in \[1, 16\]"),
    "rank not an integer": (
        dict(module0_rank=4.0),
        r"modules\[0\].rank must be a non-negative integer, got 4.0",
    ),
    "scale too large": (dict(module0_scale=1e9), r"modules\[0\].scale = 1000000000.0; loramux accepts"),
    "scale not finite": (dict(module6_scale=float("inf")), r"modules\[6\].scale = inf must be finite"),
    "scale a string": (dict(module0_scale="2"), r"modules\[0\].scale must be a number, got '2'"),
    "layers missing": (dict(module0_layers=None), r"modules\[0\].layers must be a non-empty list"),
    "layers empty": (dict(module0_layers=[]), r"modules\[0\].layers must be a non-empty list"),
    "layers a range string": (dict(module0_layers="0-1"), r"modules\[0\].layers must be a non-empty list"),
    "too many layers": (
        dict(module0_layers=[0, 1, 0]),
        r"modules\[0\].layers lists 3 layers; the base model has 2",
    ),
    "layer past the model": (
        dict(module0_layers=[0, 2]),
        r"modules\[0\].layers\[1\] is 2; layers run 0 .. 1",
    ),
    "layer negative": (dict(module1_layers=[-1]), r"modules\[1\].layers\[0\] is -1; layers run 0 .. 1"),
    "layer a float": (dict(module0_layers=[0.0, 1]), r"modules\[0\].layers\[0\] is 0.0; layers run"),
    "layer a bool": (dict(module0_layers=[True]), r"modules\[0\].layers\[0\] is True; layers run"),
    "layer repeated in a group": (
        dict(module0_layers=[1, 1]),
        r"modules\[0\].layers\[1\] = 1: layer 1 q_proj is already in modules\[0\]; a module is in one group",
    ),
    "layer repeated across groups": (
        dict(module5_projection="q_proj"),
        r"modules\[5\].layers\[0\] = 0: layer 0 q_proj is already in modules\[0\]",
    ),
}

TENSOR_CASES = {
    "signs one bit short": (
        _drop_last_byte("signs"),
        "tensor signs holds 97 bytes; 781 kept entries need 98",
    ),
    "remainders too long": (_add_byte("remainders"), "tensor remainders holds 294 bytes"),
    "unary truncated": (
        _drop_last_byte("unary"),
        r"tensor unary holds 77\d terminator bits, expected kept = 781",
    ),
    "unary runs on": (_add_byte("unary"), "tensor unary runs 1 bytes past its last terminator"),
    "extra terminators": (_add_byte("unary", 255), "tensor unary holds 789 terminator bits"),
    "positions past the end": (_past_the_end, "past the 7808 elements"),
    "sign padding set": (_set_padding_bit("signs"), "tensor signs has bits set in its padding"),
    "wrong dtype": (
        lambda t: t.__setitem__("signs", t["signs"].to(torch.int8)),
        "tensor signs has dtype I8; expected U8",
    ),
    "two dimensions": (
        lambda t: t.__setitem__("signs", t["signs"].reshape(2, -1)),
        r"tensor signs has shape \[2, 49\]; expected one dimension",
    ),
    "missing stream": (lambda t: t.pop("remainders"), "missing tensor remainders"),
    "extra tensor": (
        lambda t: t.__setitem__("mask", torch.zeros(3, dtype=torch.uint8)),
        "unexpected tensor 'mask'",
    ),
}


@pytest.fixture
def compressed(make_adapter: AdapterFactory, spec: BaseModelSpec) -> Path:
    """A density-0.1 all-linear rank-4 adapter: 7808 elements, 781 kept, rice_k 3."""
    _, _, codes, target = _compressed(make_adapter, spec, "all-linear", 0.1, alpha=1.0)
    assert (codes.total_elements, codes.rice.kept, codes.rice.k) == (7808, 781, 3)
    _CODES["codes"] = codes
    return target


def _refused(target: Path, spec: BaseModelSpec, match: str, error: type = AdapterError) -> None:
    with pytest.raises(error, match=match) as caught:
        load_adapter(target, spec, "c", label="root/c")
    assert "root/c/" in str(caught.value)  # names the file, relative to its root


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_fields_are_refused_by_name(compressed: Path, spec: BaseModelSpec, case: str) -> None:
    changes, match = CONFIG_CASES[case]
    _edit_config(compressed, **changes)
    _refused(compressed, spec, match)


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_codes_are_refused_by_tensor(compressed: Path, spec: BaseModelSpec, case: str) -> None:
    change, match = TENSOR_CASES[case]
    _edit_tensors(compressed, change)
    _refused(compressed, spec, match)


def test_checksum_mismatch_truncation_size_and_format_are_refused(
    compressed: Path, spec: BaseModelSpec
) -> None:
    load_adapter(compressed, spec, "c")  # intact
    with pytest.raises(AdapterTooLarge, match="compeft_model.safetensors: the adapter needs"):
        load_adapter(compressed, spec, "c", max_bytes=100)
    data = (compressed / WEIGHTS).read_bytes()
    flipped = bytearray(data)
    flipped[-1] ^= 0x80  # one sign flipped: a well-formed file, but not the one the config describes
    (compressed / WEIGHTS).write_bytes(bytes(flipped))
    _refused(compressed, spec, "compeft_model.safetensors: its checksum sha256:[0-9a-f]+ does not match")
    (compressed / WEIGHTS).write_bytes(data[:-10])
    _refused(compressed, spec, "compeft_model.safetensors is not a valid safetensors file")
    (compressed / WEIGHTS).unlink()
    _refused(compressed, spec, "compeft_model.safetensors is missing")
    _edit_config(compressed, format="mos")
    with pytest.raises(AdapterError, match="format 'mos' is not supported"):
        detect_format(compressed)


def test_the_server_rank_limit_applies(compressed: Path) -> None:
    small = BaseModelSpec.llama(
        num_layers=2, hidden_size=64, intermediate_size=112, q_size=64, kv_size=32, max_rank=2
    )
    _refused(compressed, small, r"rank = 4 must be in \[1, 2\] \(the server's --max-rank\)")


def test_another_base_model_is_refused_by_its_sizes(compressed: Path) -> None:
    wider = BaseModelSpec.llama(
        num_layers=2, hidden_size=64, intermediate_size=128, q_size=64, kv_size=32, max_rank=16
    )
    _refused(compressed, wider, "total_elements = 7808, but the modules hold 8192 .* another base model")


def test_groups_and_layers_load_in_any_order(compressed: Path, spec: BaseModelSpec) -> None:
    """The layout comes from PEFT names, not from where a group or layer is listed."""
    before = load_adapter(compressed, spec, "c").ternary()
    config = json.loads((compressed / CONFIG).read_text())
    config["modules"] = [dict(group, layers=group["layers"][::-1]) for group in config["modules"][::-1]]
    q_proj = config["modules"].pop()  # split one group in two: the same modules
    config["modules"] += [dict(q_proj, layers=[0]), dict(q_proj, layers=[1])]
    (compressed / CONFIG).write_text(json.dumps(config))
    after = load_adapter(compressed, spec, "c").ternary()
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key].sign_A, after[key].sign_A)
        assert torch.equal(before[key].sign_B, after[key].sign_B)
        assert before[key].scale == after[key].scale


def test_the_config_lists_one_group_per_projection_rank_and_scale(
    make_adapter: AdapterFactory, spec: BaseModelSpec
) -> None:
    """rank_pattern and alpha_pattern make more groups; each group's layers sit on one line."""
    _, _, _, target = _compressed(make_adapter, spec, "patterns", 0.1, alpha=1.0)
    text = (target / CONFIG).read_text()
    config = json.loads(text)
    assert config["version"] == 2
    assert config["modules"] == [
        {"projection": "q_proj", "rank": 4, "scale": 4.0, "layers": [0, 1]},  # rslora: 8 / sqrt(4)
        {"projection": "v_proj", "rank": 4, "scale": 1.5, "layers": [0, 1]},  # alpha_pattern: 3 / sqrt(4)
        {"projection": "down_proj", "rank": 2, "scale": 8 / math.sqrt(2), "layers": [0, 1]},
    ]
    assert '"layers": [0, 1]}' in text and text.startswith('{\n  "format": "compeft",\n')


def test_a_210_module_config_stays_under_2_kib(tmp_path: Path) -> None:
    """SmolLM2's 30 layers x 7 projections: seven one-line groups, not 210 objects."""
    smol = BaseModelSpec.llama(
        num_layers=30, hidden_size=576, intermediate_size=1536, q_size=576, kv_size=192, max_rank=16
    )
    names = sorted(((layer, p) for layer in range(30) for p in smol.features), key=lambda m: module_name(*m))
    modules, offset = [], 0
    for layer, projection in names:
        modules.append(ModuleLayout(layer, projection, 3, *smol.features[projection], 2.0, offset))
        offset += modules[-1].numel
    positions = np.arange(0, offset, 10)
    rice = encode_rice(positions, np.zeros(positions.size, dtype=bool))
    codes = CompeftCodes(rice, tuple(modules), offset, 0.1, 5.1, 0.0163, 5.1 * 0.0163, "sha256:" + "0" * 64)
    config = save_compeft(codes, tmp_path / "c", base_model="SmolLM2-135M-Instruct")
    assert (tmp_path / "c" / CONFIG).stat().st_size < 2048
    assert len(json.loads((tmp_path / "c" / CONFIG).read_text())["modules"]) == 7
    assert load_compeft(tmp_path / "c", smol, "c").codes.modules == config.modules == codes.modules


def test_the_layout_follows_peft_names_past_ten_layers(tmp_path: Path) -> None:
    """Layer 10 sorts before layer 2 among PEFT names; the derived layout must do the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.adapters_store.adapter_cases import TINY

    torch.manual_seed(0)
    with warnings.catch_warnings():  # transformers' deprecation notices inside peft
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(
            LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 12})),
            LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 3}),
        )
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.normal_(0, 0.5)
        model.save_pretrained(str(tmp_path / "src"))
    spec = BaseModelSpec.llama(
        num_layers=12, hidden_size=64, intermediate_size=112, q_size=64, kv_size=32, max_rank=16
    )
    codes = compress_compeft(load_peft_lora(tmp_path / "src", spec, "src"), 0.2, 1.5)
    save_compeft(codes, tmp_path / "c")
    loaded = load_compeft(tmp_path / "c", spec, "c")
    assert loaded.codes.modules == codes.modules
    expected = oracle(tmp_path / "src", model, 0.2, alpha=1.5)
    weights = loaded.lora_weights()
    assert set(weights) == set(expected)
    for key, (a, b, scale) in expected.items():
        torch.testing.assert_close(weights[key].A, a, rtol=1e-6, atol=0)
        torch.testing.assert_close(weights[key].B, b, rtol=1e-6, atol=0)
        assert weights[key].scale == pytest.approx(scale, rel=1e-12)


def test_sign_layout_places_every_factor_of_ternary_in_one_vector(
    make_adapter: AdapterFactory, spec: BaseModelSpec
) -> None:
    """GPU slots pack the vector in one pass and read each factor where the layout says: the coded
    adapter's own decoded vector and the base class's default (the factors copied end to end) must
    both hold `ternary()`'s A and B there, row-major, with its scales."""
    from adapters_store.adapter import CompeftAdapter

    _, _, _, target = _compressed(make_adapter, spec, "patterns", 0.3, alpha=1.0)
    coded = load_adapter(target, spec, "c")
    assert isinstance(coded, CodedCompeftAdapter)
    expected = coded.ternary()
    for vector, layout in (coded.sign_layout(), CompeftAdapter.sign_layout(coded)):
        assert vector.dtype == torch.int8 and vector.dim() == 1
        assert {(m.layer, m.projection) for m in layout} == set(expected)
        for m in layout:
            f = expected[m.layer, m.projection]
            split = m.offset + m.rank * m.in_features
            assert torch.equal(vector[m.offset : split].view(m.rank, m.in_features), f.sign_A)
            assert torch.equal(vector[split : m.offset + m.numel].view(m.out_features, m.rank), f.sign_B)
            assert m.scale == f.scale
