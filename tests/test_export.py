"""`loramux export --to peft-lora` and the served `mos` format, with PEFT as the oracle.

A random MoS adapter (tests/adapters_store/mos_cases.py) is served by the engine and compared with
transformers + PEFT running the LoRA that `loramux export` wrote from it: the logits of a mixed
batch (MoS, a plain PEFT LoRA, the base model) and greedy generation. Exports of both formats
load back with identical factors and scales, in loramux and in PEFT.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store import MosLayout, load_adapter
from adapters_store.export import exact_alpha
from adapters_store.spec import BaseModelSpec
from server import cli
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.batch import DecodeSeq, StepBatch
from server.model.kv_cache import KVCache
from tests.adapters_store.adapter_cases import peft_factors
from tests.adapters_store.mos_cases import edit_mos_config, random_mos
from tests.conftest import start_adapter_engine
from tests.test_engine import submit, wait_idle

CPU = torch.device("cpu")
# The tiny Llama of conftest: 2 layers, hidden 64, intermediate 112, q 64, k/v 32.
SPEC = BaseModelSpec.llama(
    num_layers=2, hidden_size=64, intermediate_size=112, q_size=64, kv_size=32, max_rank=8
)
# N = 4 * 2 * 4 = 32 pool rows: 24 public, 4 private per layer; each table picks r * l = 16.
LAYOUT = MosLayout(r=4, R=4, shards=4, private_rank=1, num_layers=2)
# A LoRA that needs every part of the exported config: a layer subset, rank_pattern, alpha_pattern, rsLoRA.
LORA = dict(
    r=8,
    lora_alpha=6,
    use_rslora=True,
    target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    layers_to_transform=[1],
    rank_pattern={"gate_proj": 2},
    alpha_pattern={"up_proj": 3},
)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _save_lora(base_dir: Path, target: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**LORA))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    model.save_pretrained(target)


def _export(src: Path, dst: Path, base_dir: Path, *extra: str) -> int:
    return cli.main(["export", "--to", "peft-lora", str(src), str(dst), "--model", str(base_dir), *extra])


@pytest.fixture(scope="module")
def setup(make_tiny_model, tmp_path_factory) -> dict[str, Path]:
    """base: the tiny Llama; root: adapters `mos` and `plain` (a PEFT LoRA); mos_peft / lora_peft: their exports."""
    base_dir = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("adapter-root")
    random_mos(root / "mos", SPEC, LAYOUT, lora_alpha=8, std=0.15, seed=3)
    _save_lora(base_dir, root / "plain")
    out = tmp_path_factory.mktemp("exported")
    assert _export(root / "mos", out / "mos", base_dir) == 0
    assert _export(root / "plain", out / "plain", base_dir) == 0
    return {"base": base_dir, "root": root, "mos_peft": out / "mos", "lora_peft": out / "plain"}


@pytest.fixture(scope="module")
def peft_model(setup) -> Any:
    """transformers + PEFT with the exported MoS as `mos` and the original PEFT LoRA as `plain`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, setup["mos_peft"], adapter_name="mos")
    model.load_adapter(setup["root"] / "plain", adapter_name="plain")
    return model.eval()


@pytest.fixture(scope="module")
def engine(setup):
    engine_ = start_adapter_engine(setup["base"], setup["root"])  # 2 slots of rank <= 8
    yield engine_
    engine_.shutdown()


def test_export_writes_a_plain_peft_config(setup, tmp_path: Path, capsys) -> None:
    assert _export(setup["root"] / "mos", tmp_path / "out", setup["base"]) == 0
    assert capsys.readouterr().out == (
        f"wrote {tmp_path / 'out'} (peft-lora, float32: 14 modules of rank <= 4) from the mos adapter "
        f"{setup['root'] / 'mos'}\n"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "source.json",  # what it was made from (adapters_store/lineage.py): the router's versions
    ]
    record = json.loads((tmp_path / "out" / "source.json").read_text())
    mos_checksum = (
        "sha256:" + hashlib.sha256((setup["root"] / "mos" / "mos_model.safetensors").read_bytes()).hexdigest()
    )
    assert record == {
        "source": {"name": "mos", "format": "mos", "checksum": mos_checksum},
        "original": mos_checksum,
        "original_bytes": (setup["root"] / "mos" / "mos_model.safetensors").stat().st_size,
    }
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == list(SPEC.projections)
    assert config["rank_pattern"] == config["alpha_pattern"] == {}


def test_exports_and_mos_files_take_the_umask_s_modes(setup, tmp_path: Path) -> None:
    # safetensors' save_file writes 0600 and mkdtemp makes 0700: a server running as another user
    # could not read an export (or a saved MoS adapter) written under umask 022.
    previous = os.umask(0o022)
    try:
        assert _export(setup["root"] / "mos", tmp_path / "out", setup["base"]) == 0
        random_mos(tmp_path / "mos", SPEC, LAYOUT, lora_alpha=8, std=0.15, seed=4)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    for directory in (tmp_path / "out", tmp_path / "mos"):
        assert {f.name: f.stat().st_mode & 0o777 for f in directory.iterdir()} == {
            f.name: 0o644 for f in directory.iterdir()
        }


def test_mos_export_loads_back_with_identical_weights(setup) -> None:
    mos = load_adapter(setup["root"] / "mos", SPEC, "mos")
    exported = load_adapter(setup["mos_peft"], SPEC, "back")
    assert (mos.format, exported.format) == ("mos", "peft-lora")
    _assert_same_weights(exported.lora_weights(), mos.lora_weights())


def test_peft_lora_export_round_trips_in_loramux_and_in_peft(setup) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = load_adapter(setup["root"] / "plain", SPEC, "plain")
    exported = load_adapter(setup["lora_peft"], SPEC, "back")
    _assert_same_weights(exported.lora_weights(), original.lora_weights())
    assert {key[0] for key in exported.lora_weights()} == {1}  # layers_to_transform kept
    config = json.loads((setup["lora_peft"] / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["rank_pattern"] and config["alpha_pattern"]
    # PEFT itself rebuilds the same modules, factors and scales from both directories.
    models = []
    for directory in (setup["root"] / "plain", setup["lora_peft"]):
        base = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(peft_factors(PeftModel.from_pretrained(base, directory)))
    assert set(models[0]) == set(models[1])
    for key, (a, b, scaling) in models[0].items():
        a2, b2, scaling2 = models[1][key]
        assert torch.equal(a, a2) and torch.equal(b, b2) and scaling == scaling2, key


def test_float16_export_holds_the_rounded_factors(setup, tmp_path: Path) -> None:
    assert _export(setup["root"] / "mos", tmp_path / "half", setup["base"], "--dtype", "float16") == 0
    mos = load_adapter(setup["root"] / "mos", SPEC, "mos").lora_weights()
    back = load_adapter(tmp_path / "half", SPEC, "half").lora_weights()
    for key, weights in mos.items():
        assert torch.equal(back[key].A, weights.A.half().float())
        assert torch.equal(back[key].B, weights.B.half().float())
        assert back[key].scale == weights.scale


def test_exact_alpha_gives_back_the_scale_bit_for_bit() -> None:
    """Exact for every scale that is some alpha / r; within one ulp for any other (rsLoRA's)."""
    rng = random.Random(0)
    for _ in range(3000):
        rank = rng.randrange(1, 300)
        alpha = rng.choice([1, 8, 16, 0.3, rng.uniform(-500, 500), rng.uniform(0, 1e-2)])
        scale = alpha / rank
        assert exact_alpha(scale, rank) / rank == scale, (alpha, rank)
        scale = rng.choice([0.1, 1 / 3, math.sqrt(2), alpha / math.sqrt(rank), rng.uniform(0, 1e-3)])
        assert abs(exact_alpha(scale, rank) / rank - scale) <= math.ulp(scale), (scale, rank)


def test_export_errors_exit_1_with_a_message(setup, tmp_path: Path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert _export(setup["root"] / "mos", taken, setup["base"]) == 1
    assert (
        capsys.readouterr().err
        == f"error: {taken} already exists and is not an empty directory; choose a new one\n"
    )
    assert _export(tmp_path / "nothing", tmp_path / "o1", setup["base"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'} is not a directory\n"
    (tmp_path / "empty").mkdir()
    assert _export(tmp_path / "empty", tmp_path / "o1", setup["base"]) == 1
    assert "holds no adapter loramux recognises: expected adapter_config.json" in capsys.readouterr().err
    bad = random_mos(tmp_path / "bad", SPEC, LAYOUT)
    edit_mos_config(bad, num_layers=3)
    assert _export(bad, tmp_path / "o2", setup["base"]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: {bad}/mos_config.json: num_layers = 3 but the base model"
    )
    assert _export(bad, tmp_path / "o3", tmp_path / "no-model") == 1
    assert "no such directory" in capsys.readouterr().err
    assert not any(
        p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir()
    )  # nothing half-written
    with pytest.raises(SystemExit):
        cli.main(["export", "--to", "mos", str(bad), str(tmp_path / "o4")])


def test_served_mos_and_lora_logits_equal_peft_on_the_export(engine: Engine, peft_model) -> None:
    """One prefill and one decode step over rows of MoS, LoRA and the base model mixed."""
    adapters = ["mos", "plain", "", "mos", "plain"]
    rng = random.Random(1)
    prompts = [[rng.randrange(5, 4000) for _ in range(7)] for _ in adapters]
    manager = engine.adapters
    assert manager is not None
    loaded = {name: manager.prefetch(name).result() for name in ("mos", "plain")}
    slot_of = {name: manager.slots.acquire(ready) for name, ready in loaded.items()}
    slot_of[""] = -1
    try:
        model, arch = engine.model, engine.model.arch
        kv = KVCache(arch.num_layers, len(prompts), arch.num_kv_heads, arch.head_dim, 32, torch.float32, CPU)
        slots = [slot_of[a] for a in adapters]
        pairs = [[(s, 1.0)] if s >= 0 else [] for s in slots]
        prefill = StepBatch.build(
            [],
            [(i, 0, p[:-1], True) for i, p in enumerate(prompts)],
            CPU,
            manager.slots.step([pair for pair, p in zip(pairs, prompts, strict=True) for _ in p[:-1]], CPU),
        )
        ours_prefill = model(prefill, kv)
        decode = StepBatch.build(
            [DecodeSeq(i, len(p) - 1, p[-1]) for i, p in enumerate(prompts)],
            [],
            CPU,
            manager.slots.step(pairs, CPU),
        )
        ours_decode = model(decode, kv)
        with torch.no_grad():
            theirs = peft_model(
                torch.tensor(prompts), adapter_names=[a or "__base__" for a in adapters]
            ).logits
        torch.testing.assert_close(ours_prefill, theirs[:, -2], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours_decode, theirs[:, -1], atol=1e-4, rtol=0)
        base_row = theirs[2, -1]
        assert (theirs[0, -1] - base_row).abs().max() > 1e-2  # the MoS adapter really changes the output
    finally:
        for name in loaded:
            manager.slots.release(slot_of[name])


def _peft_greedy(peft_model: Any, adapter: str, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(input_ids=ids, max_new_tokens=GREEDY.max_tokens, do_sample=False)
        else:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_mos_beside_lora_in_one_batch_gives_each_request_what_it_gets_alone(
    engine: Engine, peft_model
) -> None:
    prompt = [17, 300, 42, 901, 5, 77, 1200]
    names = ["mos", "plain", "", "mos"]
    alone = {}
    for name in ("mos", "plain", ""):
        alone[name] = submit(engine, f"alone-{name or 'base'}", prompt, GREEDY, adapter=name).wait().tokens
        wait_idle(engine)
    sinks = [submit(engine, f"together-{i}", prompt, GREEDY, adapter=n) for i, n in enumerate(names)]
    for name, sink in zip(names, sinks, strict=True):
        assert sink.wait().tokens == alone[name], name
    wait_idle(engine)
    for name in ("mos", "plain", ""):
        assert alone[name] == _peft_greedy(peft_model, name, prompt), name
    assert alone["mos"] != alone[""]


def _assert_same_weights(got: Any, expected: Any) -> None:
    assert set(got) == set(expected)
    for key, weights in expected.items():
        assert torch.equal(got[key].A, weights.A), key
        assert torch.equal(got[key].B, weights.B), key
        assert got[key].scale == weights.scale, key  # exactly: alpha / r reproduces it bit for bit
