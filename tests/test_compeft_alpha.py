"""tasks.compeft_alpha: candidates differ from the shipped ComPEFT adapter only in alpha (codes identical,
served delta scaled by alpha**2 against an independent ComPEFT of the source), validation rows are
never training or held-out prompts, and the best validation score picks the alpha. Tiny models only."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapters_store import compress_compeft, load_compeft, load_peft_lora, save_compeft
from tasks import Example, Task, get_task, prompt_key
from tasks.compeft_alpha import (
    Candidate,
    Validation,
    adopt,
    choose,
    kl_alpha,
    pick,
    validation_examples,
    write_candidates,
)
from tests.test_compress import SOURCES, _save_source, _tiny_spec

KL_ALPHA = 3.0
FACTORS = (0.5, 1.0, 1.4)


@pytest.fixture(scope="module")
def shipped(make_tiny_model, tmp_path_factory) -> tuple[Path, Path, object]:
    """(the source PEFT LoRA, a compeft adapter of it at KL_ALPHA as compress would ship it, the spec)."""
    base_dir = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    spec = _tiny_spec(base_dir)
    work = tmp_path_factory.mktemp("alpha")
    _save_source(base_dir, work / "source", SOURCES["all4"], seed=3)
    codes = compress_compeft(load_peft_lora(work / "source", spec, "source"), density=0.2, alpha=KL_ALPHA)
    save_compeft(codes, work / "task-compeft-20", base_model="tiny", extra={"alpha_search": {"mode": "auto"}})
    (work / "task-compeft-20" / "examples.jsonl").write_text('{"prompt": "hi"}\n')
    return work / "source", work / "task-compeft-20", spec


def _independent_signs(source: Path, density: float) -> dict[str, torch.Tensor]:
    """ComPEFT as published (no balancing), written here from the paper: per PEFT key its signs in {-1, 0, 1}."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(source / "adapter_model.safetensors")
    keys = sorted(tensors)
    tau = torch.cat([tensors[key].double().reshape(-1) for key in keys])
    k = round(density * tau.numel())
    threshold = tau.abs().sort(descending=True).values[k - 1]
    signs, offset = {}, 0
    for key in keys:
        part = tau[offset : offset + tensors[key].numel()].reshape(tensors[key].shape)
        signs[key] = torch.where(part.abs() >= threshold, part.sign(), torch.zeros_like(part))
        offset += tensors[key].numel()
    return signs


def test_candidates_change_only_alpha_and_the_delta_scales_as_alpha_squared(shipped, tmp_path) -> None:
    source, _, spec = shipped
    unbalanced = tmp_path / "unbalanced"
    source_adapter = load_peft_lora(source, spec, "source")
    save_compeft(compress_compeft(source_adapter, density=0.2, alpha=KL_ALPHA), unbalanced)
    (tmp_path / "root").mkdir()
    candidates = write_candidates(unbalanced, tmp_path / "root", FACTORS, spec)
    assert [c.name for c in candidates] == ["unbalanced-x050", "unbalanced-x100", "unbalanced-x140"]
    original = json.loads((unbalanced / "compeft_config.json").read_text())
    weights = (unbalanced / "compeft_model.safetensors").read_bytes()
    signs = _independent_signs(source, 0.2)
    sigma = float(torch.cat([s.reshape(-1) for s in _source_tensors(source).values()]).double().std())
    for candidate in candidates:
        assert (tmp_path / "root" / candidate.name / "compeft_model.safetensors").read_bytes() == weights
        config = json.loads((tmp_path / "root" / candidate.name / "compeft_config.json").read_text())
        changed = {key for key in original if original[key] != config.get(key)}
        assert changed == ({"alpha", "gamma"} if candidate.factor != 1.0 else set())
        assert config["alpha"] == pytest.approx(KL_ALPHA * candidate.factor)
        gamma = KL_ALPHA * candidate.factor * sigma
        served = load_compeft(tmp_path / "root" / candidate.name, spec, candidate.name).lora_weights()
        for (layer, projection), w in served.items():
            block = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{projection}"
            expected = w.scale * gamma**2 * signs[f"{key}.lora_B.weight"] @ signs[f"{key}.lora_A.weight"]
            torch.testing.assert_close(
                w.scale * (w.B.double() @ w.A.double()), expected, rtol=1e-5, atol=1e-9
            )


def _source_tensors(source: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(source / "adapter_model.safetensors")


def test_adopting_an_alpha_rewrites_only_alpha_and_records_how_it_was_chosen(shipped, tmp_path) -> None:
    _, directory, spec = shipped
    target = tmp_path / "task-compeft-20"
    target.mkdir()
    for file in directory.iterdir():
        target.joinpath(file.name).write_bytes(file.read_bytes())
    before = json.loads((target / "compeft_config.json").read_text())
    record = {"alpha_source": "validation task metric, 4 generated rows, seed 1000", "alpha_validation": {"kl_alpha": KL_ALPHA}}  # fmt: skip
    adopt(target, spec, 4.2, record)
    after = json.loads((target / "compeft_config.json").read_text())
    assert after["alpha"] == 4.2 and after["gamma"] == pytest.approx(4.2 * before["sigma"])
    assert after["alpha_source"] == record["alpha_source"] and after["alpha_search"] == {"mode": "auto"}
    assert {k for k in before if before[k] != after[k]} == {"alpha", "gamma"}
    assert (target / "examples.jsonl").read_text() == '{"prompt": "hi"}\n'
    assert (target / "compeft_model.safetensors").read_bytes() == (
        directory / "compeft_model.safetensors"
    ).read_bytes()
    loaded = load_compeft(target, spec, "t")  # the loader takes the extra keys
    assert loaded.codes.alpha == 4.2 and loaded.gamma == pytest.approx(4.2 * before["sigma"])
    assert kl_alpha(target) == KL_ALPHA  # a second run starts from the same candidates


def _sampler(prompts: list[str]) -> Callable[[random.Random], Example]:
    return lambda rng: Example(rng.choice(prompts), "")


def test_validation_rows_are_never_training_or_heldout_prompts() -> None:
    real = get_task("sql")
    heldout = [e.prompt for e in real.heldout()]
    training = [Example(f"Training question {i}?", "") for i in range(20)]
    fresh = [f"Fresh question {i}?" for i in range(40)]
    # held-out and training prompts in other surface forms, and fresh ones
    handwritten = [e.prompt for e in real.validation()]
    pool = [p.upper() for p in heldout] + [e.prompt.lower().rstrip("?") for e in training] + fresh
    pool += [p.lower() for p in handwritten]
    task = Task("sql", "", "m", 4, _sampler(pool), lambda answer, example: 0.0)
    validation = validation_examples(task, 30, seed=1000, training=training)
    # the hand-written validation rows first, as written; then 30 generated, none seen anywhere
    assert validation.handwritten == len(handwritten) >= 30
    assert [e.prompt for e in validation.examples[: len(handwritten)]] == handwritten
    keys = [prompt_key(e.prompt) for e in validation.examples[len(handwritten) :]]
    assert len(keys) == len(set(keys)) == 30 and validation.strict
    assert set(keys) <= {prompt_key(p) for p in fresh}
    source = validation.source()
    assert validation.skipped > 0 and "seed 1000" in source and f"{len(handwritten)} hand-written" in source
    assert validation_examples(task, 30, seed=1000, training=training) == validation  # seeded


def test_shout_validation_falls_back_to_unseen_surface_forms_and_says_so() -> None:
    task = get_task("shout")
    training = task.generate(random.Random(0), 2000)  # holds every question the generator has
    validation = validation_examples(task, 32, training=training)
    assert not validation.strict and "surface forms" in validation.source()
    trained = {e.prompt for e in training}
    heldout = {prompt_key(e.prompt) for e in task.heldout()}
    generated = validation.examples[validation.handwritten :]
    assert len(generated) == 32 and validation.handwritten == len(task.validation())
    assert all(e.prompt not in trained and prompt_key(e.prompt) not in heldout for e in generated)


class FakeServer:
    """Answers "right" (the reference) for a share of prompts that depends on the adapter; records prompts."""

    def __init__(self, right_share: dict[str, float], examples: list[Example]) -> None:
        self.right_share, self.examples, self.seen = right_share, examples, []

    def complete(self, prompt: str, adapter: str, max_tokens: int) -> str:
        self.seen.append(prompt)
        index = [e.prompt for e in self.examples].index(prompt)
        right = index < self.right_share[adapter] * len(self.examples)
        return self.examples[index].response if right else "wrong"


def test_the_best_validation_score_picks_the_alpha() -> None:
    examples = [Example(f"q{i}", f"a{i}") for i in range(10)]
    task = Task("sql", "", "exact", 4, _sampler(["q0"]), lambda answer, e: float(answer == e.response))
    candidates = [Candidate(f"v-x{f}", f, KL_ALPHA * f) for f in (0.5, 0.85, 1.0, 1.2)]
    server = FakeServer({"v-x0.5": 0.3, "v-x0.85": 0.6, "v-x1.0": 0.5, "v-x1.2": 0.6}, examples)
    validation = Validation(tuple(examples), 0, 1000, True)
    chosen, trials = pick(server, task, validation, candidates, KL_ALPHA)
    assert chosen.factor == 0.85  # 0.6 ties with x1.2; 0.85 is nearer the KL alpha
    assert trials == [[1.5, 0.3], [2.55, 0.6], [3.0, 0.5], [3.6, 0.6]]
    assert set(server.seen) == {e.prompt for e in examples}  # validation rows only
    server.right_share["v-x1.2"] = 0.7
    assert pick(server, task, validation, candidates, KL_ALPHA)[0].factor == 1.2


def test_choose_breaks_ties_towards_the_kl_alpha() -> None:
    low, mid, high = (Candidate(n, f, KL_ALPHA * f) for n, f in (("a", 0.7, ), ("b", 1.0), ("c", 1.4)))  # fmt: skip
    assert choose([(low, 0.5), (mid, 0.5), (high, 0.5)], KL_ALPHA) is mid
    assert choose([(low, 0.5), (mid, 0.4), (high, 0.5)], KL_ALPHA) is high  # |log 1.4| < |log 0.7|


def test_the_demo_picks_compeft_alpha_after_compressing_unless_told_not_to(monkeypatch, tmp_path) -> None:
    import tasks.demo as demo

    built, tuned = [], []
    monkeypatch.setattr(demo, "build", lambda adapter_format, name, *rest: built.append(adapter_format) or 0)
    monkeypatch.setattr(demo, "tune_alpha", lambda names, out: tuned.append((names, out)) or 0)
    common = ["--tasks", "sql", "--out", str(tmp_path), "--skip-measure"]
    assert demo.main([*common, "--formats", "lora,compeft"]) == 0
    assert built == ["lora", "compeft"] and tuned == [(["sql"], tmp_path)]
    assert demo.main([*common, "--formats", "compeft", "--skip-alpha"]) == 0
    assert demo.main([*common, "--formats", "lora,mos"]) == 0
    assert len(tuned) == 1
