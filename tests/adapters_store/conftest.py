"""Tiny PEFT LoRA adapters made on the spot: a 2-layer Llama wrapped by peft, saved to a temp dir.

PEFT initialises lora_B to zero; `make_adapter` overwrites A and B with random values so that
a wrong transpose, scale or module mapping shows. Nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store.spec import BaseModelSpec
from tests.adapters_store.adapter_cases import TINY, TINY_SPEC

AdapterFactory = Callable[..., tuple[Path, Any]]


@pytest.fixture
def spec() -> BaseModelSpec:
    return TINY_SPEC


@pytest.fixture
def make_adapter(tmp_path: Path) -> AdapterFactory:
    """make_adapter(name="a", dtype=None, seed=0, root=tmp_path, **LoraConfig kwargs) -> (directory, peft model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(
        name: str = "a",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        root: Path | None = None,
        **lora_kwargs: Any,
    ) -> tuple[Path, Any]:
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # peft's warnings about odd configs are what some tests want
            warnings.simplefilter("ignore")
            model = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)), LoraConfig(**lora_kwargs))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_A" in param_name or "lora_B" in param_name:
                    param.normal_(0, 0.5)
        if dtype is not None:
            model = model.to(dtype)
        directory = (root or tmp_path) / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.save_pretrained(str(directory))
        return directory, model

    return make
