"""A corpus of malformed PEFT LoRA adapter directories, for the attack probe (bench/attack_bench.py).

`build_corpus(corpus_dir, dims, outside)` writes one directory per case under `corpus_dir` and
returns the cases; every case but the few controls should be refused by the server with a clear
error (INVALID_ARGUMENT / HTTP 400) that changes nothing already loaded. `outside` is a directory
that must stay outside the server's adapter roots: symlink cases point into it and the pickle
case would leave a marker file there if anything unpickled it.

Adapters are written by hand (JSON + safetensors, no peft import) so the corpus builds in well
under a second for any Llama-shaped base model described by `ModelDims`. This module knows
nothing about servers.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
GOOD_RANK = 4
GOOD_TARGETS = ("q_proj", "v_proj")
# The catastrophic pattern of issue 9: nested alternatives that backtrack exponentially.
EVIL_REGEX = r"model\.layers\.0(?:.|.|.)*Q"
DIGITS_5000 = "9" * 5000
SPARSE_BYTES = 500 * 1024 * 1024
PICKLE_MARKER = "unpickled-by-server"


@dataclass(frozen=True)
class ModelDims:
    """The shapes a LoRA for a Llama-family base model must have."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int
    kv_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelDims:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        return cls(
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            q_size=heads * head_dim,
            kv_size=kv_heads * head_dim,
        )

    def in_out(self, projection: str) -> tuple[int, int]:
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[projection]


@dataclass(frozen=True)
class Case:
    name: str  # the adapter's directory name, and the name requests use
    kind: str  # config | weights | files | hazard | control
    sent: str  # what the directory holds, in words
    expect: str  # "refused" or "served"


def module_key(layer: int | str, projection: str, factor: str) -> str:
    block = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{projection}.lora_{factor}.weight"


def good_config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=GOOD_RANK,
        lora_alpha=2 * GOOD_RANK,
        target_modules=list(GOOD_TARGETS),
        bias="none",
        base_model_name_or_path="tiny",
    )
    config.update(changes)
    return config


def good_tensors(dims: ModelDims, seed: int = 0, rank: int = GOOD_RANK) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(dims.num_layers):
        for projection in GOOD_TARGETS:
            fan_in, fan_out = dims.in_out(projection)
            tensors[module_key(layer, projection, "A")] = torch.randn(rank, fan_in, generator=generator) * 0.5
            tensors[module_key(layer, projection, "B")] = (
                torch.randn(fan_out, rank, generator=generator) * 0.5
            )
    return tensors


def write_good_adapter(directory: Path, dims: ModelDims, seed: int = 0) -> Path:
    """A valid rank-4 q/v LoRA with random (non-zero) A and B, so that it changes greedy output."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(good_config()))
    safetensors.torch.save_file(good_tensors(dims, seed), str(directory / WEIGHTS))
    return directory


def safetensors_bytes(header: dict[str, Any] | str | bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a raw header (so that the header itself can be malformed)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


# -- builders: each writes one case into an empty directory ------------------------------------

Builder = Callable[[Path, ModelDims, Path], None]


def _config(**changes: Any) -> Builder:
    def build(directory: Path, dims: ModelDims, outside: Path) -> None:
        (directory / CONFIG).write_text(json.dumps(good_config(**changes)))
        safetensors.torch.save_file(good_tensors(dims), str(directory / WEIGHTS))

    return build


def _config_text(text: str | bytes) -> Builder:
    def build(directory: Path, dims: ModelDims, outside: Path) -> None:
        (directory / CONFIG).write_bytes(text.encode() if isinstance(text, str) else text)
        safetensors.torch.save_file(good_tensors(dims), str(directory / WEIGHTS))

    return build


def _tensors(change: Callable[[dict[str, torch.Tensor], ModelDims], Any], **config: Any) -> Builder:
    def build(directory: Path, dims: ModelDims, outside: Path) -> None:
        (directory / CONFIG).write_text(json.dumps(good_config(**config)))
        tensors = good_tensors(dims)
        change(tensors, dims)
        safetensors.torch.save_file(tensors, str(directory / WEIGHTS))

    return build


def _weights_bytes(make: Callable[[ModelDims], bytes]) -> Builder:
    def build(directory: Path, dims: ModelDims, outside: Path) -> None:
        (directory / CONFIG).write_text(json.dumps(good_config()))
        (directory / WEIGHTS).write_bytes(make(dims))

    return build


def _first(tensors: dict[str, torch.Tensor], factor: str) -> str:
    return module_key(0, GOOD_TARGETS[0], factor)


def _set(key_factor: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def change(tensors: dict[str, torch.Tensor], dims: ModelDims) -> None:
        key = _first(tensors, key_factor)
        tensors[key] = value(tensors[key])

    return change


def _drop(factor: str) -> Callable[..., None]:
    return lambda tensors, dims: tensors.pop(_first(tensors, factor))


def _add(key: str, shape: tuple[int, ...] = (GOOD_RANK, 8)) -> Callable[..., None]:
    def change(tensors: dict[str, torch.Tensor], dims: ModelDims) -> None:
        tensors[key] = torch.zeros(shape)

    return change


def _all(value: float, factor: str) -> Callable[..., None]:
    def change(tensors: dict[str, torch.Tensor], dims: ModelDims) -> None:
        for key in tensors:
            if f".lora_{factor}." in key:
                tensors[key] = torch.full_like(tensors[key], value)

    return change


def _huge_finite(tensors: dict[str, torch.Tensor], dims: ModelDims) -> None:
    _all(3e38, "A")(tensors, dims)
    _all(1e30, "B")(tensors, dims)


def _truncated(directory: Path, dims: ModelDims, outside: Path) -> None:
    _config()(directory, dims, outside)
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])


def _sparse_500mb(directory: Path, dims: ModelDims, outside: Path) -> None:
    """A valid header that declares one 500 MB tensor; the file is sparse (no disk used)."""
    (directory / CONFIG).write_text(json.dumps(good_config()))
    rows = SPARSE_BYTES // (4 * dims.hidden_size)
    header = {
        module_key(0, "q_proj", "A"): {
            "dtype": "F32",
            "shape": [rows, dims.hidden_size],
            "data_offsets": [0, rows * dims.hidden_size * 4],
        }
    }
    head = safetensors_bytes(header)
    path = directory / WEIGHTS
    path.write_bytes(head)
    os.truncate(path, len(head) + rows * dims.hidden_size * 4)


def _no_files(directory: Path, dims: ModelDims, outside: Path) -> None:
    pass


def _config_only(directory: Path, dims: ModelDims, outside: Path) -> None:
    (directory / CONFIG).write_text(json.dumps(good_config()))


def _config_is_dir(directory: Path, dims: ModelDims, outside: Path) -> None:
    (directory / CONFIG).mkdir()
    safetensors.torch.save_file(good_tensors(dims), str(directory / WEIGHTS))


def _weights_is_dir(directory: Path, dims: ModelDims, outside: Path) -> None:
    (directory / CONFIG).write_text(json.dumps(good_config()))
    (directory / WEIGHTS).mkdir()


def _weights_fifo(directory: Path, dims: ModelDims, outside: Path) -> None:
    (directory / CONFIG).write_text(json.dumps(good_config()))
    os.mkfifo(directory / WEIGHTS)


class _Marker:
    """Unpickling this writes a marker file: proof that the server ran pickle on an adapter."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _pickle_bin(directory: Path, dims: ModelDims, outside: Path) -> None:
    (directory / CONFIG).write_text(json.dumps(good_config()))
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(str(outside / PICKLE_MARKER))))


def _pickle_beside(directory: Path, dims: ModelDims, outside: Path) -> None:
    _config()(directory, dims, outside)
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(str(outside / PICKLE_MARKER))))


def _symlink_dir_out(directory: Path, dims: ModelDims, outside: Path) -> None:
    target = write_good_adapter(outside / "secret-adapter", dims)
    directory.rmdir()
    directory.symlink_to(target, target_is_directory=True)


def _symlink_file_out(directory: Path, dims: ModelDims, outside: Path) -> None:
    target = write_good_adapter(outside / "secret-weights", dims)
    (directory / CONFIG).write_text(json.dumps(good_config()))
    (directory / WEIGHTS).symlink_to(target / WEIGHTS)


def _symlink_config_etc(directory: Path, dims: ModelDims, outside: Path) -> None:
    (directory / CONFIG).symlink_to("/etc/hostname")
    safetensors.torch.save_file(good_tensors(dims), str(directory / WEIGHTS))


def _other_format(filename: str, content: dict[str, Any]) -> Builder:
    def build(directory: Path, dims: ModelDims, outside: Path) -> None:
        (directory / filename).write_text(json.dumps(content))
        safetensors.torch.save_file(
            good_tensors(dims), str(directory / filename.replace("config.json", "model.safetensors"))
        )

    return build


def _header(header: dict[str, Any] | str | bytes, data: bytes = b"") -> Builder:
    return _weights_bytes(lambda dims: safetensors_bytes(header, data))


def _one_tensor(
    dtype: str = "F32", shape: tuple[int, ...] = (2, 2), offsets: tuple[int, int] = (0, 16)
) -> dict[str, Any]:
    return {
        module_key(0, "q_proj", "A"): {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}
    }


_UNSUPPORTED = (
    ("use_dora", True), ("modules_to_save", ["lm_head"]), ("lora_bias", True),
    ("trainable_token_indices", [1, 2]), ("layer_replication", [[0, 1]]), ("target_parameters", ["mlp.experts"]),
    ("use_qalora", True), ("alora_invocation_tokens", [1]), ("velora_config", {"a": 1}),
    ("monteclora_config", {"a": 1}), ("use_bdlora", True), ("arrow_config", {"a": 1}), ("kasa_config", {"a": 1}),
)  # fmt: skip
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _cases() -> list[tuple[str, str, str, Builder]]:
    """(name, kind, what is sent, builder) for every case; names are valid adapter names."""
    deep = "[" * 200_000 + "]" * 200_000
    cases: list[tuple[str, str, str, Builder]] = [
        (
            "cfg-missing",
            "config",
            "no adapter_config.json",
            lambda d, m, o: safetensors.torch.save_file(good_tensors(m), str(d / WEIGHTS)),
        ),
        ("cfg-empty", "config", "empty adapter_config.json", _config_text("")),
        ("cfg-bad-json", "config", "adapter_config.json = '{not json'", _config_text("{not json")),
        ("cfg-array", "config", "config is a JSON array", _config_text("[]")),
        ("cfg-string", "config", "config is a JSON string", _config_text('"LORA"')),
        ("cfg-null", "config", "config is JSON null", _config_text("null")),
        ("cfg-invalid-utf8", "config", "config bytes are not UTF-8", _config_text(b'\xff\xfe{"r": 4}')),
        ("cfg-deep-nesting", "config", "config = 200,000 levels of nested JSON arrays", _config_text(deep)),
        (
            "cfg-deep-object",
            "config",
            "r = 200,000 levels of nested objects",
            _config_text('{"peft_type":"LORA","r":' + '{"a":' * 200_000 + "1" + "}" * 200_000 + "}"),
        ),
        (
            "cfg-2mb",
            "config",
            "config of 2 MB (valid JSON padded with spaces)",
            _config_text(json.dumps(good_config()) + " " * (2 << 20)),
        ),
        ("cfg-is-directory", "files", "adapter_config.json is a directory", _config_is_dir),
        ("peft-type-prefix", "config", "peft_type = PREFIX_TUNING", _config(peft_type="PREFIX_TUNING")),
        ("peft-type-number", "config", "peft_type = 1", _config(peft_type=1)),
        ("peft-type-ia3", "config", "peft_type = IA3", _config(peft_type="IA3")),
        ("r-zero", "config", "r = 0", _config(r=0)),
        ("r-negative", "config", "r = -4", _config(r=-4)),
        ("r-float", "config", "r = 4.5", _config(r=4.5)),
        ("r-string", "config", 'r = "4"', _config(r="4")),
        ("r-bool", "config", "r = true", _config(r=True)),
        ("r-null", "config", "r = null", _config(r=None)),
        (
            "r-5000-digits",
            "config",
            "r = a 5,000-digit integer",
            _config_text(json.dumps(good_config()).replace('"r": 4', '"r": ' + DIGITS_5000)),
        ),
        (
            "r-1e400",
            "config",
            "r = 1e400 (parses as inf)",
            _config_text(json.dumps(good_config()).replace('"r": 4', '"r": 1e400')),
        ),
        (
            "r-over-max-rank",
            "config",
            "r = 256 with matching tensors (over --max-rank)",
            _tensors(lambda t, m: t.update(good_tensors(m, rank=256)), r=256, lora_alpha=512),
        ),
        ("alpha-string", "config", 'lora_alpha = "8"', _config(lora_alpha="8")),
        (
            "alpha-nan",
            "config",
            "lora_alpha = NaN",
            _config_text(json.dumps(good_config(lora_alpha=float("nan")))),
        ),
        (
            "alpha-inf",
            "config",
            "lora_alpha = Infinity",
            _config_text(json.dumps(good_config(lora_alpha=float("inf")))),
        ),
        (
            "alpha-neg-inf",
            "config",
            "lora_alpha = -Infinity",
            _config_text(json.dumps(good_config(lora_alpha=float("-inf")))),
        ),
        (
            "alpha-5000-digits",
            "config",
            "lora_alpha = a 5,000-digit integer",
            _config_text(
                json.dumps(good_config()).replace('"lora_alpha": 8', '"lora_alpha": ' + DIGITS_5000)
            ),
        ),
        (
            "alpha-1e400",
            "config",
            "lora_alpha = 1e400",
            _config_text(json.dumps(good_config()).replace('"lora_alpha": 8', '"lora_alpha": 1e400')),
        ),
        ("targets-empty", "config", "target_modules = []", _config(target_modules=[])),
        (
            "targets-unknown",
            "config",
            'target_modules = ["nonexistent_proj"]',
            _config(target_modules=["nonexistent_proj"]),
        ),
        ("targets-number", "config", "target_modules = 123", _config(target_modules=123)),
        ("targets-numbers", "config", "target_modules = [1, 2]", _config(target_modules=[1, 2])),
        ("targets-bad-regex", "config", 'target_modules = "(" (invalid regex)', _config(target_modules="(")),
        (
            "targets-evil-regex",
            "hazard",
            f"target_modules = {EVIL_REGEX!r} (catastrophic backtracking)",
            _config(target_modules=EVIL_REGEX),
        ),
        (
            "targets-embed",
            "config",
            'target_modules = ["embed_tokens"]',
            _config(target_modules=["embed_tokens"]),
        ),
        (
            "rank-pattern-5000-digits",
            "config",
            "rank_pattern q_proj = a 5,000-digit integer",
            _config_text(
                json.dumps(good_config(rank_pattern={"q_proj": 7})).replace(
                    '"q_proj": 7', '"q_proj": ' + DIGITS_5000
                )
            ),
        ),
        ("rank-pattern-bad-regex", "config", 'rank_pattern = {"(": 4}', _config(rank_pattern={"(": 4})),
        ("rank-pattern-list", "config", "rank_pattern = [4]", _config(rank_pattern=[4])),
        (
            "rank-pattern-negative",
            "config",
            'rank_pattern = {"q_proj": -1}',
            _config(rank_pattern={"q_proj": -1}),
        ),
        (
            "alpha-pattern-nan",
            "config",
            'alpha_pattern = {"q_proj": NaN}',
            _config_text(json.dumps(good_config(alpha_pattern={"q_proj": float("nan")}))),
        ),
        (
            "alpha-pattern-string",
            "config",
            'alpha_pattern = {"q_proj": "x"}',
            _config(alpha_pattern={"q_proj": "x"}),
        ),
        ("layers-negative", "config", "layers_to_transform = [-1]", _config(layers_to_transform=[-1])),
        (
            "layers-5000-digits",
            "config",
            "layers_to_transform = [5,000-digit int]",
            _config_text(
                json.dumps(good_config(layers_to_transform=[7])).replace("[7]", "[" + DIGITS_5000 + "]")
            ),
        ),
        ("layers-string", "config", 'layers_to_transform = "x"', _config(layers_to_transform="x")),
        ("rslora-string", "config", 'use_rslora = "yes"', _config(use_rslora="yes")),
        ("exclude-bad-regex", "config", 'exclude_modules = "["', _config(exclude_modules="[")),
    ]
    cases += [
        (
            f"unsupported-{field.replace('_', '-')}",
            "config",
            f"{field} = {json.dumps(value)}",
            _config(**{field: value}),
        )
        for field, value in _UNSUPPORTED
    ]
    cases += [
        (
            f"init-{init.replace('_', '-')}",
            "config",
            f'init_lora_weights = "{init}"',
            _config(init_lora_weights=init),
        )
        for init in _BASE_MODIFYING_INITS
    ]
    big_layer = f"base_model.model.model.layers.{DIGITS_5000}.self_attn.q_proj.lora_A.weight"
    cases += [
        ("w-missing", "weights", "config only, no weights file", _config_only),
        ("w-empty", "weights", "0-byte adapter_model.safetensors", _weights_bytes(lambda d: b"")),
        ("w-truncated", "weights", "safetensors cut in half", _truncated),
        (
            "w-header-len-huge",
            "weights",
            "header length field = 2**63",
            _weights_bytes(lambda d: struct.pack("<Q", 2**63) + b"{}"),
        ),
        (
            "w-header-past-end",
            "weights",
            "header length 1,000 bytes in a 20-byte file",
            _weights_bytes(lambda d: struct.pack("<Q", 1000) + b"{" * 12),
        ),
        ("w-header-not-json", "weights", "header = 'not json'", _header("not json  ")),
        (
            "w-header-deep",
            "weights",
            "header = 100,000 nested JSON arrays",
            _header("[" * 100_000 + "]" * 100_000),
        ),
        (
            "w-header-dup-keys",
            "weights",
            "header names one tensor twice",
            _header(
                '{"'
                + module_key(0, "q_proj", "A")
                + '":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"'
                + module_key(0, "q_proj", "A")
                + '":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
                b"\0" * 16,
            ),
        ),
        (
            "w-offsets-overlap",
            "weights",
            "data offsets overlap",
            _header(
                {
                    **_one_tensor(),
                    module_key(0, "q_proj", "B"): {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
                },
                b"\0" * 24,
            ),
        ),
        (
            "w-offsets-past-end",
            "weights",
            "data offsets past the end of the file",
            _header(_one_tensor(offsets=(0, 1 << 40)), b"\0" * 16),
        ),
        ("w-unknown-dtype", "weights", 'dtype = "Q4"', _header(_one_tensor(dtype="Q4"), b"\0" * 16)),
        ("w-no-tensors", "weights", "a valid safetensors file with no tensors", _header({})),
        ("w-sparse-500mb", "hazard", "valid header declaring one 500 MB tensor (sparse file)", _sparse_500mb),
        ("w-fifo", "hazard", "adapter_model.safetensors is a named pipe (FIFO) nobody writes", _weights_fifo),
        ("w-is-directory", "files", "adapter_model.safetensors is a directory", _weights_is_dir),
        (
            "shape-a-rank",
            "weights",
            "layer 0 q lora_A has rank+1 rows",
            _tensors(_set("A", lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]))),
        ),
        (
            "shape-b-rank",
            "weights",
            "layer 0 q lora_B has rank+1 columns",
            _tensors(_set("B", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1))),
        ),
        (
            "shape-a-transposed",
            "weights",
            "layer 0 q lora_A transposed",
            _tensors(_set("A", lambda t: t.T.contiguous())),
        ),
        (
            "shape-b-out",
            "weights",
            "layer 0 q lora_B has 1 output row too many",
            _tensors(_set("B", lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]))),
        ),
        (
            "shape-3d",
            "weights",
            "layer 0 q lora_A is 3-D",
            _tensors(_set("A", lambda t: t.unsqueeze(0).contiguous())),
        ),
        (
            "shape-scalar",
            "weights",
            "layer 0 q lora_A is a scalar",
            _tensors(_set("A", lambda t: torch.tensor(1.0))),
        ),
        (
            "shape-empty",
            "weights",
            "layer 0 q lora_A has 0 rows",
            _tensors(_set("A", lambda t: torch.zeros(0, t.shape[1]))),
        ),
        (
            "rank-over-config",
            "weights",
            "tensors of rank 64 with config r = 4",
            _tensors(lambda t, m: t.update(good_tensors(m, rank=64))),
        ),
        ("dtype-int32", "weights", "lora_A int32", _tensors(_set("A", lambda t: t.to(torch.int32)))),
        ("dtype-int8", "weights", "lora_A int8", _tensors(_set("A", lambda t: t.to(torch.int8)))),
        ("dtype-bool", "weights", "lora_A bool", _tensors(_set("A", lambda t: t > 0))),
        ("dtype-float64", "weights", "lora_A float64", _tensors(_set("A", lambda t: t.double()))),
        ("dtype-uint8", "weights", "lora_A uint8", _tensors(_set("A", lambda t: t.to(torch.uint8)))),
        (
            "dtype-fp8",
            "weights",
            "lora_A float8_e4m3fn",
            _tensors(_set("A", lambda t: t.to(torch.float8_e4m3fn))),
        ),
        (
            "nan-a",
            "weights",
            "one NaN in lora_A",
            _tensors(
                _set(
                    "A",
                    lambda t: t.index_put_(
                        (torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))
                    ),
                )
            ),
        ),
        (
            "inf-b",
            "weights",
            "one +inf in lora_B",
            _tensors(
                _set(
                    "B",
                    lambda t: t.index_put_(
                        (torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))
                    ),
                )
            ),
        ),
        (
            "neginf-b-fp16",
            "weights",
            "one -inf in an fp16 lora_B",
            _tensors(
                _set(
                    "B",
                    lambda t: t.half().index_put_(
                        (torch.tensor([0]), torch.tensor([0])), torch.tensor(float("-inf"), dtype=torch.half)
                    ),
                )
            ),
        ),
        (
            "huge-finite",
            "weights",
            "A = 3e38, B = 1e30 everywhere, lora_alpha = 1e37",
            _tensors(_huge_finite, lora_alpha=1e37),
        ),
        (
            "missing-b",
            "weights",
            "layer 0 q lora_B missing",
            _tensors(lambda t, m: t.pop(module_key(0, "q_proj", "B"))),
        ),
        (
            "missing-a",
            "weights",
            "layer 0 q lora_A missing",
            _tensors(lambda t, m: t.pop(module_key(0, "q_proj", "A"))),
        ),
        ("extra-unrelated", "weights", "an extra tensor 'foo.weight'", _tensors(_add("foo.weight"))),
        (
            "extra-layer-99",
            "weights",
            "an extra layer-99 q_proj pair",
            _tensors(
                lambda t, m: t.update(
                    {
                        module_key(99, "q_proj", "A"): torch.zeros(GOOD_RANK, m.hidden_size),
                        module_key(99, "q_proj", "B"): torch.zeros(m.q_size, GOOD_RANK),
                    }
                )
            ),
        ),
        (
            "layer-5000-digits",
            "weights",
            "tensor name with a 5,000-digit layer number",
            _tensors(_add(big_layer)),
        ),
        (
            "extra-untargeted",
            "weights",
            "k_proj tensors while target_modules = q, v",
            _tensors(
                lambda t, m: t.update(
                    {
                        module_key(0, "k_proj", "A"): torch.zeros(GOOD_RANK, m.hidden_size),
                        module_key(0, "k_proj", "B"): torch.zeros(m.kv_size, GOOD_RANK),
                    }
                )
            ),
        ),
        (
            "extra-embedding",
            "weights",
            "lora_embedding_A for embed_tokens",
            _tensors(_add("base_model.model.model.embed_tokens.lora_embedding_A")),
        ),
        (
            "extra-magnitude",
            "weights",
            "a DoRA lora_magnitude_vector without use_dora",
            _tensors(_add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (8,))),
        ),
        (
            "named-adapter-key",
            "weights",
            "keys with '.default' adapter name (lora_A.default.weight)",
            _tensors(
                lambda t, m: [
                    t.__setitem__(k.replace(".weight", ".default.weight"), t.pop(k)) for k in list(t)
                ]
            ),
        ),
        (
            "pickle-bin-only",
            "files",
            "adapter_model.bin only (a pickle that writes a marker file when loaded)",
            _pickle_bin,
        ),
        (
            "symlink-dir-out",
            "files",
            "the adapter directory is a symlink to a valid adapter outside the root",
            _symlink_dir_out,
        ),
        (
            "symlink-weights-out",
            "files",
            "adapter_model.safetensors is a symlink out of the root",
            _symlink_file_out,
        ),
        (
            "symlink-config-etc",
            "files",
            "adapter_config.json is a symlink to /etc/hostname",
            _symlink_config_etc,
        ),
        (
            "format-mos",
            "config",
            "a mos_config.json adapter (format not served)",
            _other_format("mos_config.json", {"format": "mos", "r": 4}),
        ),
        (
            "format-compeft",
            "config",
            "a compeft_config.json adapter",
            _other_format("compeft_config.json", {"format": "compeft"}),
        ),
        ("empty-dir", "files", "an empty directory", _no_files),
        (
            "control-pickle-beside",
            "control",
            "a valid adapter plus a malicious adapter_model.bin (must serve, never unpickle)",
            _pickle_beside,
        ),
        ("control-good", "control", "a valid adapter (control)", _config()),
    ]
    return cases


def build_corpus(corpus_dir: Path, dims: ModelDims, outside: Path) -> list[Case]:
    """Write every case into `corpus_dir/<name>`; return them in order."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    made = []
    for name, kind, sent, builder in _cases():
        directory = corpus_dir / name
        directory.mkdir()
        builder(directory, dims, outside)
        made.append(Case(name, kind, sent, "served" if kind == "control" else "refused"))
    return made
