"""The demo adapters shipped under adapters/: they load, stay small, and each moves its task's answers.

A quick check on the real default model (SmolLM2-135M-Instruct): every adapter validates against
the base model, is fp16 and under ~2 MB, carries its router examples, and on the first held-out
prompts of its task scores better than the base model under the task's own metric (greedy, the
chat template as served). The full evaluation is `make demo-adapters`' job (bench/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors

from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.runtime import build_engine
from tasks import TASK_NAMES, get_task
from tests.test_engine import chat_ids, submit

ROOT = Path(__file__).resolve().parent.parent / "adapters"
PROMPTS = 8  # held-out prompts per task
MAX_BYTES = 2_100_000


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    config = ServerConfig(
        device="cpu",
        engine=EngineConfig(max_running=16, max_queue=64, max_model_len=512, max_batched_tokens=256),
        adapters=AdapterConfig(roots=(str(ROOT),), max_slots=len(TASK_NAMES), max_rank=8),
    )
    engine_ = build_engine(config)
    engine_.start()
    yield engine_
    engine_.shutdown()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_the_adapter_is_small_fp16_and_has_router_examples(name: str) -> None:
    directory = ROOT / name
    weights = directory / "adapter_model.safetensors"
    assert weights.stat().st_size <= MAX_BYTES
    with safetensors.safe_open(str(weights), "pt") as file:
        assert {file.get_slice(key).get_dtype() for key in file.keys()} == {"F16"}  # noqa: SIM118
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] <= 8
    examples = [json.loads(line) for line in (directory / "examples.jsonl").read_text().splitlines()]
    assert len(examples) >= 20 and all(set(row) == {"prompt"} and row["prompt"] for row in examples)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_the_adapter_moves_its_tasks_answers(engine: Engine, name: str) -> None:
    task = get_task(name)
    examples = task.heldout()[:PROMPTS]
    params = SamplingParams(max_tokens=task.max_tokens, temperature=0.0)
    tokenizer = engine.tokenizer
    runs = {
        (model, i): submit(
            engine, f"{name}-{model or 'base'}-{i}", chat_ids(tokenizer, e.prompt), params, model
        )
        for i, e in enumerate(examples)
        for model in ("", name)
    }
    scores = {model: 0.0 for model in ("", name)}
    for (model, i), run in runs.items():
        scores[model] += task.score(run.wait(timeout=300).text, examples[i])
    assert scores[name] > scores[""], f"{name}: adapter {scores[name]} vs base {scores['']} of {PROMPTS}"


COMPRESSED = ("mos", "compeft-05", "compeft-10", "compeft-20")


def _numel(weights: Path) -> int:
    with safetensors.safe_open(str(weights), "pt") as file:
        return sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())  # noqa: SIM118


@pytest.mark.parametrize("variant", COMPRESSED)
@pytest.mark.parametrize("name", TASK_NAMES)
def test_the_compressed_demo_adapters_load_and_keep_the_papers_sizes(
    engine: Engine, name: str, variant: str
) -> None:
    """Each task ships as MoS (at most a quarter of the LoRA's parameters) and ComPEFT (at density
    0.1 at least 8x smaller than the fp16 LoRA file), each valid for the base model, with the
    router's examples."""
    directory = ROOT / f"{name}-{variant}"
    manager = engine.adapters
    assert manager is not None
    adapter = manager.store.get(f"{name}-{variant}")  # validated against SmolLM2, as served
    lora_file = (ROOT / name / "adapter_model.safetensors").stat().st_size
    if variant == "mos":
        assert adapter.format == "mos"
        pools = json.loads((directory / "training.json").read_text())["parameters"]
        assert pools * 4 <= _numel(ROOT / name / "adapter_model.safetensors")
    else:
        assert adapter.format == "compeft"
        config = json.loads((directory / "compeft_config.json").read_text())
        assert config["density"] == int(variant.split("-")[1]) / 100 and config["factors"] == "svd"
        assert (
            config["source_checksum"]
            == "sha256:"
            + hashlib.sha256((ROOT / name / "adapter_model.safetensors").read_bytes()).hexdigest()
        )  # compressed from the LoRA shipped beside it
        if variant == "compeft-10":
            assert (directory / "compeft_model.safetensors").stat().st_size * 8 <= lora_file
    assert (directory / "examples.jsonl").read_text() == (ROOT / name / "examples.jsonl").read_text()


def test_the_demo_report_is_a_markdown_table() -> None:
    from tasks.demo import markdown

    row = {"metric": "accuracy", "base": 0.1, "adapter": 0.9, "heldout": 42, "train_steps": 150}
    row |= {
        "train_seconds": 400.0,
        "bytes": 1_800_000,
        "example": {"prompt": "a | b", "base": "x\ny", "adapter": "z"},
    }
    report = markdown({"tasks": {"sentiment": row}, "burst": {"requests": 20, "differ": []}})
    assert "| sentiment | accuracy | 0.100 | 0.900 | 42 | 150 steps, 400 s | 1.80 MB |" in report
    assert "| sentiment | a \\| b | x y | z |" in report
    assert "each got the same greedy text as alone" in report
