"""`loramux bench make-adapters`: random PEFT LoRA adapters for scaling runs, checked against
independent oracles: the base checkpoint's own weight shapes, PEFT loading them (every tensor
lands, the output moves, two adapters differ), loramux's adapter store validating them, and an
engine serving them token for token like PEFT. Plus reproducibility, refusing a non-empty
--out, no half adapter after an interruption, and clear errors for bad flags."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from bench import make_adapters_bench as make_adapters
from tests.conftest import start_adapter_engine
from tests.test_engine import submit, wait_idle

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(capsys: pytest.CaptureFixture[str], *flags: Any) -> tuple[int, str, str]:
    """The benchmark as `loramux bench make-adapters FLAGS` runs it: (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="loramux bench make-adapters")
    make_adapters.add_arguments(parser)
    code = make_adapters.main(parser.parse_args([str(flag) for flag in flags]))
    out, err = capsys.readouterr()
    return code, out, err


def weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """The base checkpoint's tensor shapes, by name (the oracle for the factors' shapes)."""
    shapes = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="np") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})  # noqa: SIM118
    return shapes


@pytest.fixture(scope="module")
def base_dir(make_tiny_model: Any) -> Path:
    return make_tiny_model(kind="llama", kv_heads=2, tied=False)  # GQA: k/v narrower than q


@pytest.fixture(scope="module")
def root(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three all-linear rank-4 adapters with the default dtype (float16), seed 0."""
    out = tmp_path_factory.mktemp("made") / "adapters"
    parser = argparse.ArgumentParser()
    make_adapters.add_arguments(parser)
    flags = [
        "--count",
        "3",
        "--rank",
        "4",
        "--targets",
        "all-linear",
        "--model",
        str(base_dir),
        "--out",
        str(out),
    ]
    assert make_adapters.main(parser.parse_args(flags)) == 0
    return out


def test_writes_count_adapters_with_peft_names_and_base_model_shapes(base_dir: Path, root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == ["adapter-0000", "adapter-0001", "adapter-0002"]
    base = weight_shapes(base_dir)
    num_layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    for adapter in root.iterdir():
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, list(ALL))
        assert config["base_model_name_or_path"] == str(base_dir.resolve())
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        expected = {}
        for layer in range(num_layers):
            for block, projections in (("self_attn", ALL[:4]), ("mlp", ALL[4:])):
                for projection in projections:
                    module = f"model.layers.{layer}.{block}.{projection}"
                    out_features, in_features = base[f"{module}.weight"]
                    expected[f"base_model.model.{module}.lora_A.weight"] = (4, in_features)
                    expected[f"base_model.model.{module}.lora_B.weight"] = (out_features, 4)
        assert {key: t.shape for key, t in tensors.items()} == expected
        assert all(t.dtype == np.float16 and np.count_nonzero(t) > 0.99 * t.size for t in tensors.values())


def test_factor_sizes_follow_the_documented_strength(base_dir: Path, tmp_path: Path, capsys) -> None:
    """std(A) = 1 / sqrt(in), std(B) = strength / (scale * sqrt(r)), so the delta is ~strength * rms(x)."""
    rank, alpha, strength = 8, 4.0, 0.3
    out = tmp_path / "out"
    code, _, _ = run(
        capsys, "--count", 1, "--rank", rank, "--alpha", alpha, "--strength", strength,
        "--targets", "down_proj,q_proj", "--dtype", "float32", "--model", base_dir, "--out", out,
    )  # fmt: skip
    assert code == 0
    tensors = load_file(str(out / "adapter-0000" / "adapter_model.safetensors"))
    assert {key.split(".")[-3] for key in tensors} == {"q_proj", "down_proj"}
    assert all(t.dtype == np.float32 for t in tensors.values())
    for projection in ("q_proj", "down_proj"):
        a = np.concatenate([t.ravel() for k, t in tensors.items() if f"{projection}.lora_A" in k])
        b = np.concatenate([t.ravel() for k, t in tensors.items() if f"{projection}.lora_B" in k])
        in_features = next(t.shape[1] for k, t in tensors.items() if f"{projection}.lora_A" in k)
        assert a.std() == pytest.approx(1 / math.sqrt(in_features), rel=0.1)
        assert b.std() == pytest.approx(strength / (alpha / rank * math.sqrt(rank)), rel=0.1)
        assert abs(a.mean()) < 0.1 * a.std() and abs(b.mean()) < 0.1 * b.std()
    # ... and on a real input the delta is about strength * rms(x)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    x = np.random.default_rng(1).standard_normal(
        (64, tensors[f"{prefix}.lora_A.weight"].shape[1]), np.float32
    )
    delta = (alpha / rank) * x @ tensors[f"{prefix}.lora_A.weight"].T @ tensors[f"{prefix}.lora_B.weight"].T
    assert np.sqrt((delta**2).mean()) == pytest.approx(strength * np.sqrt((x**2).mean()), rel=0.15)


def test_peft_loads_every_tensor_and_the_output_changes(base_dir: Path, root: Path) -> None:
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = root / "adapter-0000"
    config = json.loads((adapter / "adapter_config.json").read_text())
    peft_config = LoraConfig.from_pretrained(str(adapter)).to_dict()
    peft_config["target_modules"] = sorted(peft_config["target_modules"])  # PEFT keeps a set
    config["target_modules"] = sorted(config["target_modules"])
    assert {key: peft_config[key] for key in config} == config  # LoraConfig fields, read back as written

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[17, 300, 42, 901, 5, 77, 1200, 3]])
    with torch.no_grad():
        base_logits = base(ids).logits[0]
    model = PeftModel.from_pretrained(base, adapter, adapter_name="a0").eval()
    model.load_adapter(root / "adapter-0001", adapter_name="a1")
    state = model.state_dict()
    for key, value in load_file(str(adapter / "adapter_model.safetensors")).items():
        loaded = state[key.replace(".weight", ".a0.weight")]  # PEFT put every saved factor in place
        np.testing.assert_array_equal(loaded.numpy(), value.astype(np.float32))
    with torch.no_grad():
        logits = {}
        for name in ("a0", "a1"):
            model.set_adapter(name)
            logits[name] = model(ids).logits[0]
    for name, ours in logits.items():
        # Moves the logits far beyond float noise, yet less than the logits vary themselves (on this
        # tiny random model ~0.3 of their spread; the module doc has the numbers on SmolLM2).
        assert (ours - base_logits).abs().max().item() > 0.1, name
        assert ((ours - base_logits).std() / base_logits.std()).item() < 0.6, name
    assert (logits["a0"] - logits["a1"]).abs().max().item() > 1e-2  # two adapters, two outputs


def test_same_seed_writes_identical_files_and_other_seeds_or_indices_differ(
    base_dir: Path, tmp_path: Path, capsys
) -> None:
    def weights(seed: int, out: str) -> list[bytes]:
        code, _, _ = run(
            capsys, "--count", 3, "--rank", 2, "--seed", seed, "--model", base_dir, "--out", tmp_path / out
        )
        assert code == 0
        adapters = sorted((tmp_path / out).iterdir())
        return [(a / "adapter_model.safetensors").read_bytes() for a in adapters]

    first, again, other = weights(7, "first"), weights(7, "again"), weights(8, "other")
    assert first == again
    for name in ("adapter_config.json", "README.md"):
        assert (tmp_path / "first/adapter-0002" / name).read_bytes() == (
            tmp_path / "again/adapter-0002" / name
        ).read_bytes()
    every = first + other  # no two (seed, index) pairs share weights, adjacent seeds included
    assert len(set(every)) == len(every)


def test_loramux_store_validates_them_and_reads_the_same_factors(base_dir: Path, root: Path) -> None:
    from transformers import AutoConfig

    from adapters_store import AdapterRoots, AdapterStore, LoraAdapter
    from server.model.arch import ModelArch

    spec = ModelArch.from_hf_config(AutoConfig.from_pretrained(base_dir)).adapter_spec(max_rank=8)
    store = AdapterStore(spec, AdapterRoots([root]), 64 << 20)
    assert [stored.name for stored in store.list()] == ["adapter-0000", "adapter-0001", "adapter-0002"]
    adapter = store.get("adapter-0001")
    assert isinstance(adapter, LoraAdapter) and adapter.format == "peft-lora"
    assert adapter.rank == 4 and adapter.target_modules == ALL
    assert adapter.layers == tuple(range(spec.num_layers))
    tensors = load_file(str(root / "adapter-0001" / "adapter_model.safetensors"))
    for (layer, projection), module in adapter.modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if projection in ALL[:4] else 'mlp'}.{projection}"
        np.testing.assert_array_equal(module.A.numpy(), tensors[f"{prefix}.lora_A.weight"].astype(np.float32))
        np.testing.assert_array_equal(module.B.numpy(), tensors[f"{prefix}.lora_B.weight"].astype(np.float32))
        assert module.scale == 2.0  # alpha 8 / rank 4


def test_an_engine_serves_them_token_for_token_like_peft(base_dir: Path, root: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.engine.request import SamplingParams

    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompt = [17, 300, 42, 901, 5, 77, 1200]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, root / "adapter-0000", adapter_name="adapter-0000").eval()
    peft_model.load_adapter(root / "adapter-0002", adapter_name="adapter-0002")
    expected = {}
    with torch.no_grad():
        for name in ("adapter-0000", "adapter-0002"):
            peft_model.set_adapter(name)
            out = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
            expected[name] = out[0, len(prompt) :].tolist()
    engine = start_adapter_engine(base_dir, root)
    try:
        sinks = {name: submit(engine, f"r-{name}", prompt, greedy, adapter=name) for name in expected}
        for name, sink in sinks.items():
            assert sink.wait().tokens == expected[name], name
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_refuses_a_non_empty_out_unless_force(base_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "--count", 2, "--rank", 2, "--model", base_dir, "--out", out)
    assert code == 2 and "not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    code, stdout, _ = run(capsys, "--count", 2, "--rank", 2, "--model", base_dir, "--out", out, "--force")
    assert code == 0 and "keep.txt" in stdout  # told that the server would see it too
    before = (out / "adapter-0001" / "adapter_model.safetensors").read_bytes()
    code, _, _ = run(
        capsys, "--count", 2, "--rank", 2, "--seed", 5, "--model", base_dir, "--out", out, "--force"
    )
    assert code == 0
    assert (out / "adapter-0001" / "adapter_model.safetensors").read_bytes() != before  # replaced
    assert sorted(p.name for p in out.iterdir()) == ["adapter-0000", "adapter-0001", "keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"

    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = run(capsys, "--count", 1, "--model", base_dir, "--out", a_file)
    assert code == 2 and "not a directory" in err


def test_an_interrupted_run_leaves_no_half_adapter(
    base_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    real = make_adapters.save_file
    calls = []

    def interrupted(*args: Any, **kwargs: Any) -> None:
        calls.append(args[1])
        if len(calls) == 3:
            real(*args, **kwargs)  # the third adapter's weights are on disk, its config is not
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(make_adapters, "save_file", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(capsys, "--count", 5, "--rank", 2, "--model", base_dir, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter-0000", "adapter-0001"]  # no staging left either
    for adapter in out.iterdir():
        assert {p.name for p in adapter.iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--count", "0"], "--count must be >= 1"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--targets", "q_proj,qkv_proj"], "unknown target module 'qkv_proj'"),
        (["--targets", ","], "no target modules"),
        (["--alpha", "0"], "--alpha must be a positive number"),
        (["--strength", "nan"], "--strength must be a positive number"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--prefix", "../up"], "--prefix '../up'"),
        (["--model", "/nonexistent/model"], "no such directory"),
    ],
)
def test_bad_flags_exit_2_with_a_message_and_write_nothing(
    base_dir: Path, tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    defaults = {"--count": "2", "--rank": "2", "--model": str(base_dir)}
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    args = [item for flag, value in {**defaults, **given}.items() for item in (flag, value)]
    code, _, err = run(capsys, *args, "--out", tmp_path / "out")
    assert code == 2
    assert message in err and err.startswith("loramux bench make-adapters: error:")
    assert not (tmp_path / "out").exists()


def test_argparse_errors_exit_2(tmp_path: Path, capsys) -> None:
    for flags in (["--out", str(tmp_path)], ["--count", "1", "--out", str(tmp_path), "--dtype", "bfloat16"]):
        with pytest.raises(SystemExit) as exc:
            run(capsys, *flags)
        assert exc.value.code == 2


def test_loramux_bench_make_adapters_dispatches_to_this_module(
    base_dir: Path, tmp_path: Path, capsys
) -> None:
    """`loramux bench make-adapters` imports bench.make_adapters_bench (dashes to underscores)."""
    from server.cli import _cmd_bench

    extra = ["--count", "1", "--rank", "2", "--model", str(base_dir), "--out", str(tmp_path / "out")]
    assert _cmd_bench(argparse.Namespace(bench_command="make-adapters"), extra) == 0
    assert "wrote 1 adapters" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter-0000" / "adapter_model.safetensors").is_file()
