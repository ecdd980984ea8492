"""The bounds the adapter store puts on what one adapter directory may hold (documented in the README).

Each limit refuses, with an AdapterError naming the field, tensor or file, an input that would
otherwise stall the process, hold memory, or load and then compute nonsense. The values are
far above anything a trained adapter needs. This module holds numbers only.
"""

from __future__ import annotations

MAX_CONFIG_BYTES = 1 << 20
"""adapter_config.json is at most 1 MiB (PEFT's are about 1 KiB)."""

MAX_CONFIG_ENTRIES = 1024
"""Entries in one config list or object: target_modules, exclude_modules, layers_to_transform,
layers_pattern, and the keys of rank_pattern / alpha_pattern."""

MAX_PATTERN_CHARS = 1024
"""Characters in one user regular expression (matched by RE2, in time linear in the name)."""

MAX_PATTERN_MEMORY = 8 << 20
"""RE2's memory budget for compiling one pattern, in bytes; a bigger automaton is refused."""

MAX_HEADER_BYTES = 8 << 20
"""The JSON header of adapter_model.safetensors (80 layers x 7 projections x 2 tensors need ~200 KiB)."""

MAX_ABS_WEIGHT = 65504.0
"""Every element of every lora_A and lora_B satisfies |x| <= 65504, the largest finite float16.
With |scale| <= MAX_ABS_SCALE, ranks and widths below 2**16 and activations below 2**16, each
term of `scale * (x @ A.T) @ B.T` stays below ~1e28, far inside float32's 3.4e38."""

MAX_ABS_SCALE = 10_000.0
"""Every module's |scale| (lora_alpha / r, or / sqrt(r) with use_rslora; rank_pattern and
alpha_pattern included) is at most 10,000 (trained adapters use 0.1 to 64)."""
