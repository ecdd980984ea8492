"""The fused CPU model ops (kernels/csrc/) against their torch references, and the
references against plain math; odd sizes (vector tails), GQA groups, scattered slots, bad input."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu_extension
from kernels.model_ops import DecodeMeta, FusedCpuOps, TorchOps, select_model_ops
from tests.cpu_kernels import require_compiler

CPU = torch.device("cpu")
TOL = dict(atol=2e-6, rtol=2e-5)


@pytest.fixture(scope="module")
def fused() -> FusedCpuOps:
    require_compiler()
    ops = select_model_ops(CPU, torch.float32, "fused")
    assert isinstance(ops, FusedCpuOps)
    return ops


REF = TorchOps()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # every draw below reproducible, whatever ran before


@pytest.mark.parametrize("hidden", [576, 37, 16, 5])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_rms_norm(fused: FusedCpuOps, rows: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = torch.randn(hidden, generator=g)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # the math
    torch.testing.assert_close(REF.rms_norm(x, w, 1e-5), expected, **TOL)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), expected, **TOL)


@pytest.mark.parametrize("hidden", [576, 37])
def test_add_rms_norm_adds_in_place(fused: FusedCpuOps, hidden: int) -> None:
    g = torch.Generator().manual_seed(hidden)
    h, d, w = (
        torch.randn(9, hidden, generator=g),
        torch.randn(9, hidden, generator=g),
        torch.randn(hidden, generator=g),
    )
    h_ref = h.clone()
    expected = REF.add_rms_norm(h_ref, d, w, 1e-6)
    out = fused.add_rms_norm(h, d, w, 1e-6)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)  # the residual stream: exactly h + d
    torch.testing.assert_close(out, expected, **TOL)


def test_norms_read_strided_rows(fused: FusedCpuOps) -> None:
    """Rows of a wider tensor (a column slice) are read with their stride, not assumed packed."""
    wide = torch.randn(6, 50)
    x, w = wide[:, 3:40], torch.randn(37)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), REF.rms_norm(x.contiguous(), w, 1e-5), **TOL)


@pytest.mark.parametrize("intermediate", [1536, 19, 8])
def test_silu_mul(fused: FusedCpuOps, intermediate: int) -> None:
    gate_up = torch.randn(7, 2 * intermediate, generator=torch.Generator().manual_seed(intermediate)) * 4
    g, u = gate_up.double()[:, :intermediate], gate_up.double()[:, intermediate:]
    expected = (g / (1 + torch.exp(-g)) * u).float()  # the math in float64
    torch.testing.assert_close(REF.silu_mul(gate_up), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.silu_mul(gate_up), expected, atol=1e-5, rtol=1e-5)


def _rope_tables(max_positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.cos()), -1), torch.cat((-angles.sin(), angles.sin()), -1)


def _rotate_half_math(x: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Hugging Face's formulation: x * cos + rotate_half(x) * sin, sin unsigned."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(positions.float(), inv_freq)
    cos = torch.cat((angles.cos(), angles.cos()), -1).unsqueeze(1)
    sin = torch.cat((angles.sin(), angles.sin()), -1).unsqueeze(1)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 10), (6, 1, 36), (4, 2, 2)])
def test_rotary_kv_write(fused: FusedCpuOps, heads: int, kv_heads: int, dim: int) -> None:
    tokens, slots, capacity = 11, 5, 24
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    token_slots = torch.randint(0, slots, (tokens,), generator=torch.Generator().manual_seed(dim))
    positions = torch.arange(tokens) * 2 % capacity  # distinct positions: no cell written twice
    cos, sin = _rope_tables(64, dim)
    caches = {}
    for name, ops in (("ref", REF), ("fused", fused)):
        k_cache, v_cache = (
            torch.zeros(slots, kv_heads, capacity, dim),
            torch.zeros(slots, kv_heads, capacity, dim),
        )
        q = ops.rotary_kv_write(qkv, ops.rotary(cos, sin, positions), token_slots, k_cache, v_cache, heads)
        caches[name] = (q, k_cache, v_cache)
    q_math = _rotate_half_math(qkv[:, : heads * dim].view(tokens, heads, dim), positions, dim)
    k_math = _rotate_half_math(
        qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim), positions, dim
    )
    for q, k_cache, v_cache in caches.values():
        torch.testing.assert_close(q, q_math, **TOL)
        torch.testing.assert_close(k_cache[token_slots, :, positions], k_math, **TOL)
        v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        torch.testing.assert_close(v_cache[token_slots, :, positions], v, atol=0, rtol=0)
    written = torch.zeros(slots, capacity, dtype=torch.bool)
    written[token_slots, positions] = True
    for cache in caches["fused"][1:]:
        assert not cache.transpose(1, 2)[~written].any()  # nothing else touched


def _attention_math(q: torch.Tensor, k_cache, v_cache, slots: list[int], lengths: list[int]) -> torch.Tensor:
    n, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty_like(q)
    for i, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
        for head in range(heads):
            keys, values = k_cache[slot, head // group, :length], v_cache[slot, head // group, :length]
            weights = torch.softmax(keys @ q[i, head] / math.sqrt(dim), dim=0)
            out[i, head] = weights @ values
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 24), (6, 1, 20), (8, 2, 128)])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [5, 0, 3], [2]])
def test_decode_attention(fused: FusedCpuOps, heads: int, kv_heads: int, dim: int, slots: list[int]) -> None:
    g = torch.Generator().manual_seed(heads * dim + len(slots))
    capacity = 40
    k_cache = torch.randn(6, kv_heads, capacity, dim, generator=g)
    v_cache = torch.randn(6, kv_heads, capacity, dim, generator=g)
    q = torch.randn(len(slots), heads, dim, generator=g) * 2
    positions = [(7 * i + 3) % capacity for i in range(len(slots))]  # ragged, one of length 4
    positions[-1] = capacity - 1  # a sequence filling the cache
    decode = DecodeMeta.build(slots, positions, CPU)
    expected = _attention_math(q, k_cache, v_cache, slots, [p + 1 for p in positions])
    torch.testing.assert_close(REF.decode_attention(q, k_cache, v_cache, decode, dim**-0.5), expected, **TOL)
    torch.testing.assert_close(
        fused.decode_attention(q, k_cache, v_cache, decode, dim**-0.5), expected, **TOL
    )


def test_decode_attention_of_a_single_cached_position(fused: FusedCpuOps) -> None:
    k_cache, v_cache = torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8, 16)
    q = torch.randn(1, 2, 16)
    out = fused.decode_attention(q, k_cache, v_cache, DecodeMeta.build([1], [0], CPU), 0.25)
    torch.testing.assert_close(out[0], v_cache[1, 0, :1].expand(2, 16), **TOL)  # softmax of one = 1


def test_bad_input_is_refused_with_a_message(fused: FusedCpuOps) -> None:
    k_cache, v_cache = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 8, 16)
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="context length 9"):
        fused.decode_attention(q, k_cache, v_cache, DecodeMeta.build([0], [8], CPU), 0.25)
    with pytest.raises(RuntimeError, match="slot 2 is outside"):
        fused.decode_attention(q, k_cache, v_cache, DecodeMeta.build([2], [0], CPU), 0.25)
    cos, sin = _rope_tables(16, 16)
    qkv = torch.randn(1, 4 * 16)
    with pytest.raises(RuntimeError, match="position 8 is outside"):
        fused.rotary_kv_write(qkv, (cos, sin, torch.tensor([8])), torch.tensor([0]), k_cache, v_cache, 2)
    with pytest.raises(RuntimeError, match="float32"):
        fused.rms_norm(torch.zeros(2, 4, dtype=torch.float64), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        fused.rms_norm(torch.zeros(2, 4), torch.ones(5), 1e-5)
    assert not k_cache.any()  # refused before writing anything


def test_overlapping_outputs_and_headless_caches_are_refused(fused: FusedCpuOps) -> None:
    """Outputs written row by row from several threads must not alias themselves."""
    residual = torch.randn(1, 8).expand(4, 8)
    with pytest.raises(RuntimeError, match="overlap|single memory location"):
        fused.add_rms_norm(residual, torch.randn(4, 8), torch.ones(8), 1e-5)
    no_heads = torch.zeros(2, 0, 8, 16)
    with pytest.raises(RuntimeError, match="at least one KV head"):
        fused.decode_attention(
            torch.zeros(1, 2, 16), no_heads, no_heads, DecodeMeta.build([0], [0], CPU), 1.0
        )


def test_rotary_reads_strided_rows(fused: FusedCpuOps) -> None:
    """qkv as a column slice of a wider buffer (rows not packed)."""
    heads, kv_heads, dim, tokens = 4, 2, 16, 5
    wide = torch.randn(tokens, (heads + 2 * kv_heads) * dim + 8)
    qkv = wide[:, 8:]
    cos, sin = _rope_tables(32, dim)
    positions, slots = torch.arange(tokens), torch.zeros(tokens, dtype=torch.int64)
    out = {}
    for name, ops, x in (("ref", REF, qkv.contiguous()), ("fused", fused, qkv)):
        k_cache, v_cache = torch.zeros(1, kv_heads, 8, dim), torch.zeros(1, kv_heads, 8, dim)
        q = ops.rotary_kv_write(x, ops.rotary(cos, sin, positions), slots, k_cache, v_cache, heads)
        out[name] = (q, k_cache, v_cache)
    for expected, got in zip(out["ref"], out["fused"], strict=True):
        torch.testing.assert_close(got, expected, **TOL)


def test_the_kernels_use_torchs_openmp_runtime(fused: FusedCpuOps) -> None:
    """Loading the library mapped no OpenMP runtime of its own (load refuses one that does), so the
    kernels run on torch's threads and follow torch.set_num_threads. (Other packages may map
    theirs: sentencepiece ships a libgomp.)"""
    assert cpu_extension.is_loaded()
    torch_lib = Path(torch.__file__).parent / "lib"
    assert any(Path(path).parent == torch_lib.resolve() for path in cpu_extension._openmp_runtimes())


def test_selection() -> None:
    assert isinstance(select_model_ops(CPU, torch.float32, "torch"), TorchOps)
    assert isinstance(select_model_ops(CPU, torch.bfloat16, "auto"), TorchOps)  # fp32 only
    with pytest.raises(ValueError, match="float32 on CPU"):
        select_model_ops(CPU, torch.bfloat16, "fused")
    with pytest.raises(ValueError, match="one of auto, fused, torch"):
        select_model_ops(CPU, torch.float32, "fast")


def test_auto_falls_back_to_torch_when_the_build_fails(monkeypatch, caplog) -> None:
    def fail(build_dir=None) -> None:
        raise cpu_extension.CpuExtensionError("no C++ compiler found")

    monkeypatch.setattr(cpu_extension, "load", fail)
    with caplog.at_level(logging.WARNING):
        assert isinstance(select_model_ops(CPU, torch.float32, "auto"), TorchOps)
    assert "no C++ compiler found" in caplog.text
    with pytest.raises(cpu_extension.CpuExtensionError):
        select_model_ops(CPU, torch.float32, "fused")


def test_a_failing_compiler_is_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(cpu_extension.CpuExtensionError, match="compiling model_ops.cpp failed"):
        cpu_extension.build(tmp_path)
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_an_unwritable_cache_is_reported(tmp_path, monkeypatch) -> None:
    require_compiler()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(cpu_extension.CpuExtensionError, match="building .* failed"):
        cpu_extension.build(blocker / "extensions")


def test_build_is_cached_and_prebuilt_libraries_come_first(tmp_path, monkeypatch) -> None:
    require_compiler()
    first = cpu_extension.build(tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert cpu_extension.build(tmp_path / "cache") == first and first.stat().st_mtime_ns == stamp
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    (prebuilt / first.name).write_bytes(first.read_bytes())
    monkeypatch.setattr(cpu_extension, "prebuilt_dir", lambda: prebuilt)
    monkeypatch.setenv("CXX", "/bin/false")  # nothing may be compiled
    assert cpu_extension.build(tmp_path / "elsewhere") == prebuilt / first.name


@pytest.mark.parametrize("out_features", [1, 17, 48, 49, 100, 960])
@pytest.mark.parametrize("in_features", [1, 7, 576])
@pytest.mark.parametrize("rows", [0, 1, 3, 8, 9, 33])
def test_packed_linear(fused: FusedCpuOps, rows: int, in_features: int, out_features: int) -> None:
    """Every row-block remainder (rows % 8), partial panels and tiles, with and without bias."""
    g = torch.Generator().manual_seed(rows * 1000 + in_features * 7 + out_features)
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    packed = fused.pack_linear(weight)
    assert REF.pack_linear(weight) is None  # torch keeps its own layouts
    for b in (None, bias):
        y = fused.packed_linear(x, packed, b, out_features)
        assert y.shape == (rows, out_features) and y.is_contiguous()
        torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b), atol=1e-4, rtol=1e-5)


def test_packed_linear_reads_strided_rows(fused: FusedCpuOps) -> None:
    weight = torch.randn(40, 30)
    x = torch.randn(5, 64)[:, 2:32]
    y = fused.packed_linear(x, fused.pack_linear(weight), None, 40)
    torch.testing.assert_close(y, x @ weight.T, atol=1e-5, rtol=1e-5)


def test_packed_linear_refuses_mismatched_shapes(fused: FusedCpuOps) -> None:
    packed = fused.pack_linear(torch.randn(40, 30))
    with pytest.raises(RuntimeError, match="x must be"):
        fused.packed_linear(torch.randn(2, 31), packed, None, 40)
    with pytest.raises(RuntimeError, match="out_features"):
        fused.packed_linear(torch.randn(2, 30), packed, None, 64)
    with pytest.raises(RuntimeError, match="bias must be"):
        fused.packed_linear(torch.randn(2, 30), packed, torch.zeros(39), 40)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_other_cpu_capabilities(capability: str) -> None:
    """The AVX2 and portable builds (other vector widths, other tile shapes) pass the same tests,
    in a child process where torch dispatches to that capability (ATEN_CPU_CAPABILITY)."""
    require_compiler()
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    tests = [
        f"{__file__}::{name}"
        for name in (
            "test_rms_norm",
            "test_add_rms_norm_adds_in_place",
            "test_silu_mul",
            "test_rotary_kv_write",
            "test_decode_attention",
            "test_packed_linear",
        )
    ]
    lora = str(Path(__file__).parent / "test_lora_ops.py")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *tests,
            lora,
            "-k",
            "fused or not lora",
        ],
        env=env,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
