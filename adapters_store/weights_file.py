"""A safetensors weights file's data, read once its header has passed (safetensors_header.py), and
its float tensors checked value by value: what every adapter format's loader shares.

`read_data` reads the whole file (header included, for the checksum) into memory of its own;
`float_tensor` copies one entry out as fp32, refusing non-finite values and values beyond
MAX_ABS_WEIGHT with a message naming the tensor. This module knows no adapter format.
"""

from __future__ import annotations

from io import BufferedReader

import torch

from adapters_store.errors import AdapterError
from adapters_store.limits import MAX_ABS_WEIGHT
from adapters_store.safetensors_header import SafetensorsHeader, TensorEntry

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_data(file: BufferedReader, header: SafetensorsHeader, where: str) -> bytearray:
    """The whole file (header included, for the checksum), read once after the header passed."""
    data = bytearray(header.file_size)
    file.seek(0)
    try:
        read = file.readinto(data)
    except OSError as exc:
        raise AdapterError(f"cannot read {where}: {exc.strerror or type(exc).__name__}") from None
    if read != header.file_size:
        raise AdapterError(f"{where} changed while it was read; try again once it is written")
    return data


def float_tensor(data: bytearray, header: SafetensorsHeader, entry: TensorEntry, where: str) -> torch.Tensor:
    """The entry's values as a new fp32 tensor (no view of `data`), every |x| <= MAX_ABS_WEIGHT."""
    dtype = FLOAT_DTYPES[entry.dtype]
    stored = torch.frombuffer(data, dtype=dtype, count=entry.numel, offset=header.data_start + entry.begin)
    # Upcast at once, into memory of its own: fp32 is the host form (bf16 is computed wrongly by some CPU paths).
    tensor = stored.to(torch.float32, copy=True).reshape(entry.shape)
    low, high = torch.aminmax(tensor)  # NaN propagates, so one pass checks finiteness and range
    if not (float(low) >= -MAX_ABS_WEIGHT and float(high) <= MAX_ABS_WEIGHT):
        name = f"{where}: tensor {entry.name}"
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterError(f"{name} holds {bad} non-finite values (NaN or inf)")
        raise AdapterError(
            f"{name} holds values up to |x| = {max(-float(low), float(high)):.3g}; loramux accepts "
            f"|x| <= {MAX_ABS_WEIGHT:g} (the float16 range), beyond which the adapter's output cannot stay finite"
        )
    return tensor
