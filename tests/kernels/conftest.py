"""Kernel tests: every op on every backend against the torch reference, on CPU by default.

Shared cases live in lora_cases.py (imported as tests.kernels.lora_cases, like tests.conftest).

Triton kernels run on CPU only under TRITON_INTERPRET=1, which must be set before the kernel
modules (kernels.shrink, kernels.expand) are imported: this file runs before the test modules here
import them. On a CUDA machine the interpreter stays off and the `gpu` tests run compiled kernels.

No __init__.py in this directory, on purpose: with one (and none in tests/), pytest would put
tests/ first on sys.path and import this directory as the package `kernels`, shadowing ours.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
