"""Reading a safetensors file's header, and checking it, before a byte of its data is read.

Layout: 8 bytes little-endian header length N, N bytes of JSON header (tensor name ->
{dtype, shape, data_offsets: [begin, end]} plus an optional "__metadata__" object of strings),
then the data. The header is refused unless N <= MAX_HEADER_BYTES, every entry is well formed,
each tensor's byte range is exactly its shape times its dtype's size, the ranges tile the data
with no gap or overlap, and the file is exactly as long as the header says. So a loader can
check names, dtypes and shapes against what it expects and refuse a wrong or oversized file
from its header alone. This module knows the container, not what the tensors mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from adapters_store.errors import AdapterError, shown
from adapters_store.jsonfile import decode_object
from adapters_store.limits import MAX_HEADER_BYTES

# safetensors dtype name -> bytes per element (the format's full list).
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
METADATA_KEY = "__metadata__"
_PREFIX_BYTES = 8


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; its bytes are data[begin:end] of the data section."""

    name: str
    dtype: str  # a key of DTYPE_SIZES
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: its tensors, where the data starts in the file, and the file's size."""

    tensors: dict[str, TensorEntry]
    data_start: int  # 8 + N
    file_size: int


def read_header(file: BinaryIO, where: str) -> SafetensorsHeader:
    """Read and check the header of the safetensors file open in `file` (positioned at 0).

    `where` names the file in messages. Reads at most 8 + MAX_HEADER_BYTES bytes.
    """
    file_size = os.fstat(file.fileno()).st_size
    prefix = file.read(_PREFIX_BYTES)
    if len(prefix) < _PREFIX_BYTES:
        raise _bad(where, f"it is {file_size} bytes long, too short for a header")
    header_bytes = int.from_bytes(prefix, "little")
    if header_bytes > MAX_HEADER_BYTES:
        raise _bad(where, f"its header claims {header_bytes} bytes; loramux reads at most {MAX_HEADER_BYTES}")
    data_start = _PREFIX_BYTES + header_bytes
    if data_start > file_size:
        raise _bad(where, f"its header claims {header_bytes} bytes but the file is {file_size} bytes long")
    raw = decode_object(file.read(header_bytes), f"{where} header")
    metadata = raw.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _bad(where, f"{METADATA_KEY} must be an object of strings")
    tensors = {name: _entry(name, value, where) for name, value in raw.items()}
    _check_layout(tensors, file_size - data_start, where)
    return SafetensorsHeader(tensors, data_start, file_size)


def _entry(name: str, value: object, where: str) -> TensorEntry:
    def bad(problem: str) -> AdapterError:
        return _bad(where, f"the header entry for tensor {shown(name)} {problem}")

    if not isinstance(value, dict):
        raise bad("is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"has an unknown dtype {shown(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise bad(f"has a malformed shape {shown(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"has malformed data_offsets {shown(offsets)}")
    entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    if entry.end - entry.begin != entry.numel * DTYPE_SIZES[dtype]:
        raise bad(
            f"declares {entry.end - entry.begin} bytes for shape {list(entry.shape)} of {dtype}, "
            f"which needs {entry.numel * DTYPE_SIZES[dtype]}"
        )
    return entry


def _check_layout(tensors: dict[str, TensorEntry], data_bytes: int, where: str) -> None:
    """The tensors' byte ranges tile [0, data_bytes) exactly: no gap, no overlap, nothing after."""
    position = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            problem = "overlaps another" if entry.begin < position else "leaves a gap before it"
            raise _bad(where, f"the data of tensor {shown(entry.name)} {problem} (offset {entry.begin})")
        position = entry.end
    if position != data_bytes:
        raise _bad(
            where,
            f"its header declares {position} bytes of tensor data but the file holds {data_bytes} "
            "after the header (truncated, or extra bytes)",
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _bad(where: str, problem: str) -> AdapterError:
    return AdapterError(
        f"{where} is not a valid safetensors file: {problem}; it may be truncated or corrupt: "
        "copy or save the adapter again"
    )
