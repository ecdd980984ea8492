"""`loramux compress` and compeft serving: the engine serving a compeft directory gives the logits and
greedy tokens of transformers + PEFT running the reconstructed dense LoRA (A^ = gamma * S_A,
B^ = gamma * S_B written as a PEFT directory), and the command writes, reports and is refused
as a user would expect. Tiny generated models only."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from adapters_store import compress_compeft, load_compeft, load_peft_lora, save_compeft
from adapters_store.spec import BaseModelSpec
from server.cli import main
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.request import SamplingParams
from server.model.batch import StepBatch
from server.model.kv_cache import KVCache
from server.runtime import build_engine
from tests.test_engine import submit, wait_idle

CPU = torch.device("cpu")
SOURCES: dict[str, dict[str, Any]] = {
    "all4": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
}
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _tiny_spec(base_dir: Path) -> BaseModelSpec:
    config = json.loads((base_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return BaseModelSpec.llama(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        q_size=config["num_attention_heads"] * head_dim,
        kv_size=config["num_key_value_heads"] * head_dim,
        max_rank=8,
    )


def _save_source(base_dir: Path, target: Path, config: dict[str, Any], seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(**config)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(target)


def _write_reconstruction(compeft_dir: Path, source: Path, target: Path) -> None:
    """The dense A^ and B^ the compeft directory stands for, as a PEFT directory (same config as the source)."""
    spec = BaseModelSpec.llama(
        num_layers=2, hidden_size=64, intermediate_size=112, q_size=64, kv_size=32, max_rank=8
    )
    adapter = load_compeft(compeft_dir, spec, "c")
    tensors = {}
    for (layer, projection), factors in adapter.ternary().items():
        block = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"base_model.model.model.layers.{layer}.{block}.{projection}"
        tensors[f"{key}.lora_A.weight"] = factors.sign_A.float() * adapter.gamma
        tensors[f"{key}.lora_B.weight"] = factors.sign_B.float() * adapter.gamma
    target.mkdir()
    shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
    safetensors.torch.save_file(tensors, target / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def setup(make_tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base model, root of compeft adapters, root of their dense reconstructions as PEFT LoRA)."""
    base_dir = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    sources = tmp_path_factory.mktemp("sources")
    root = tmp_path_factory.mktemp("compeft-root")
    dense = tmp_path_factory.mktemp("dense-root")
    spec = _tiny_spec(base_dir)
    for seed, (name, config) in enumerate(SOURCES.items()):
        _save_source(base_dir, sources / name, config, seed)
        codes = compress_compeft(load_peft_lora(sources / name, spec, name), density=0.3, alpha=2.0)
        save_compeft(codes, root / name)
        _write_reconstruction(root / name, sources / name, dense / name)
    return base_dir, root, dense


@pytest.fixture(scope="module")
def peft_model(setup) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, _, dense = setup
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = list(SOURCES)
    model = PeftModel.from_pretrained(base, dense / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dense / name, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def engine(setup) -> Any:
    base_dir, root, _ = setup
    config = ServerConfig(
        model=str(base_dir),
        device="cpu",
        engine=EngineConfig(max_running=4, max_model_len=128, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8),
    )
    engine_ = build_engine(config)
    engine_.start()
    yield engine_
    engine_.shutdown()


def test_served_logits_equal_peft_on_the_reconstructed_dense_lora(engine, peft_model) -> None:
    manager = engine.adapters
    prompts = [[17, 300, 42, 901, 5], [9, 8, 7, 6, 5], [100, 200, 300, 400, 500]]
    adapters = [*SOURCES, ""]
    prompts = prompts[: len(adapters)]
    loaded = {name: manager.prefetch(name).result() for name in SOURCES}
    assert all(ready.adapter.format == "compeft" for ready in loaded.values())
    slot_of = {name: manager.slots.acquire(ready) for name, ready in loaded.items()}
    slot_of[""] = -1
    try:
        model, arch = engine.model, engine.model.arch
        kv = KVCache(arch.num_layers, len(prompts), arch.num_kv_heads, arch.head_dim, 16, torch.float32, CPU)
        pairs = [[(slot_of[a], 1.0)] if a else [] for a in adapters]
        step = manager.slots.step([p for p, ids in zip(pairs, prompts, strict=True) for _ in ids], CPU)
        ours = model(StepBatch.build([], [(i, 0, p, True) for i, p in enumerate(prompts)], CPU, step), kv)
        with torch.no_grad():
            theirs = peft_model(
                torch.tensor(prompts), adapter_names=[a or "__base__" for a in adapters]
            ).logits
        torch.testing.assert_close(ours, theirs[:, -1], atol=1e-4, rtol=0)
    finally:
        for name in loaded:
            manager.slots.release(slot_of[name])


def test_greedy_tokens_equal_peft_generate(engine, peft_model) -> None:
    prompt = [17, 300, 42, 901, 5, 77]
    sinks = {name: submit(engine, f"g-{name}", prompt, GREEDY, adapter=name) for name in SOURCES}
    for name, sink in sinks.items():
        peft_model.set_adapter(name)
        with torch.no_grad():
            expected = peft_model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False
            )
        assert sink.wait().tokens == expected[0, len(prompt) :].tolist(), name
    wait_idle(engine)


# -- loramux compress ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(make_tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    base_dir = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    directory = tmp_path_factory.mktemp("cli") / "src"
    _save_source(base_dir, directory, SOURCES["all4"], seed=5)
    (directory / "examples.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"Tell me about the number {n}."}) for n in range(6)) + "\n"
    )
    return base_dir, directory


def test_compress_with_a_fixed_alpha_writes_reports_and_serves(source, tmp_path, capsys) -> None:
    base_dir, src = source
    dst = tmp_path / "c"
    assert (
        main(["compress", "--density", "0.2", "--alpha", "3", str(src), str(dst), "--model", str(base_dir)])
        == 0
    )
    out = capsys.readouterr().out
    assert f"wrote {dst} (compeft of the svd factors: density 0.2" in out and "alpha 3 (given)" in out
    assert "x smaller); as fp16" in out and "top-1 agreement" in out and "base model alone" in out
    config = json.loads((dst / "compeft_config.json").read_text())
    assert config["alpha"] == 3.0 and config["alpha_search"]["mode"] == "fixed"
    assert 0 <= config["fidelity"]["top1_agreement"] <= 1 and config["fidelity"]["mean_kl"] >= 0
    assert config["fidelity"]["prompts"] == 3 and config["fidelity"]["prompts_from"].endswith(
        "examples.jsonl"
    )
    # what it was made from, and its source's example prompts (the router's), beside it
    source_checksum = "sha256:" + hashlib.sha256((src / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert json.loads((dst / "source.json").read_text()) == {
        "source": {"name": "src", "format": "peft-lora", "checksum": source_checksum},
        "original": source_checksum,
        "original_bytes": (src / "adapter_model.safetensors").stat().st_size,
    }
    assert config["source_checksum"] == source_checksum
    assert (dst / "examples.jsonl").read_bytes() == (src / "examples.jsonl").read_bytes()
    spec = _tiny_spec(base_dir)
    adapter = load_compeft(dst, spec, "c")
    assert adapter.gamma == pytest.approx(3.0 * config["sigma"])
    assert config["factors"] == "svd" and config["balanced"] is True  # the default
    expected = compress_compeft(load_peft_lora(src, spec, "s"), 0.2, 3.0, factors="svd").ternary()
    for key, factors in adapter.ternary().items():
        assert torch.equal(factors.sign_A, expected[key].sign_A) and torch.equal(
            factors.sign_B, expected[key].sign_B
        )


def test_compress_alpha_auto_picks_the_least_kl_and_beats_the_base_model(source, tmp_path, capsys) -> None:
    base_dir, src = source
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w} twice."}) + "\n" for w in "abcdefgh"))
    dst = tmp_path / "auto"
    args = ["compress", "--density", "0.5", "--alpha", "auto", str(src), str(dst)]
    assert main([*args, "--model", str(base_dir), "--prompts", str(prompts)]) == 0
    out = capsys.readouterr().out
    text = (dst / "compeft_config.json").read_text()
    config = json.loads(text)
    search = config["alpha_search"]
    assert config["version"] == 2 and f'"trials": {json.dumps(search["trials"])}' in text  # one line
    assert search["mode"] == "auto" and search["calibration_prompts"] == 4
    best_alpha, best_kl = min(search["trials"], key=lambda trial: trial[1])
    assert (
        config["alpha"] == pytest.approx(best_alpha, rel=1e-5) and f"alpha {config['alpha']:.4g} (auto" in out
    )
    assert config["factors"] == "svd"
    fidelity = config["fidelity"]
    assert fidelity["mean_kl"] < fidelity["base_model_alone"]["mean_kl"]
    assert fidelity["top1_agreement"] >= fidelity["base_model_alone"]["top1_agreement"]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--density", "0"], 2, "--density: must be in"),
        (["--density", "0.1", "--alpha", "-1"], 2, "--alpha: must be a positive number or auto"),
        (["--density", "0.1", "--method", "dare"], 2, "invalid choice: 'dare'"),
    ],
)
def test_bad_flags_exit_2(source, tmp_path, capsys, args, status, message) -> None:
    _, src = source
    with pytest.raises(SystemExit) as exited:
        main(["compress", *args, str(src), str(tmp_path / "x")])
    assert exited.value.code == status and message in capsys.readouterr().err


def test_user_errors_exit_1_and_leave_no_dst(source, tmp_path, capsys) -> None:
    base_dir, src = source
    model = ["--model", str(base_dir)]
    assert main(["compress", "--density", "0.1", str(tmp_path / "nope"), str(tmp_path / "d1"), *model]) == 1
    assert "error: SRC" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    assert main(["compress", "--density", "0.1", str(src), str(taken), *model]) == 1
    assert "is not empty" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert (
        main(["compress", "--density", "0.1", str(src), str(tmp_path / "d2"), *model, "--prompts", str(bad)])
        == 1
    )
    assert f"error: {bad} line 2" in capsys.readouterr().err
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()
    not_lora = tmp_path / "notlora"
    not_lora.mkdir()
    assert main(["compress", "--density", "0.1", str(not_lora), str(tmp_path / "d3"), *model]) == 1
    assert "error: SRC: " in capsys.readouterr().err and not (tmp_path / "d3").exists()


@pytest.mark.parametrize(
    ("flags", "factors"),
    [
        (["--no-balance"], "as-trained"),
        (["--factors", "as-trained"], "as-trained"),
        (["--factors", "balanced"], "balanced"),
    ],
)
def test_factors_flag_picks_what_is_compressed(source, tmp_path, capsys, flags, factors) -> None:
    """--factors as-trained (or the older --no-balance) is ComPEFT as published."""
    base_dir, src = source
    dst = tmp_path / "plain"
    argv = ["compress", "--density", "0.2", "--alpha", "3", *flags, str(src), str(dst)]
    assert main([*argv, "--model", str(base_dir)]) == 0
    assert f"compeft of the {factors} factors" in capsys.readouterr().out
    config = json.loads((dst / "compeft_config.json").read_text())
    assert config["factors"] == factors and config["balanced"] is (factors != "as-trained")
    spec = _tiny_spec(base_dir)
    expected = compress_compeft(load_peft_lora(src, spec, "s"), 0.2, 3.0, factors=factors).ternary()
    for key, signs in load_compeft(dst, spec, "c").ternary().items():
        assert torch.equal(signs.sign_A, expected[key].sign_A)
        assert torch.equal(signs.sign_B, expected[key].sign_B)
