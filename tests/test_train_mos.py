"""`loramux train --method mos`: the loss falls, the files are exactly the `mos` layout (pools, index
tables drawn as the format says: each layer's private rows plus distinct public ones, A and B
independently), the same seed gives the same bytes, and bad MoS settings are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from adapters_store.mos import CONFIG_FILE as MOS_CONFIG_FILE
from adapters_store.mos import WEIGHTS_FILE as MOS_WEIGHTS_FILE
from adapters_store.mos import MosLayout
from server import cli
from server.engine.request import SamplingParams
from server.prompts import chat_prompt_ids
from tests.conftest import start_adapter_engine
from tests.test_engine import submit, wait_idle
from tests.test_train import EOS, base_dir, data_file  # noqa: F401 -- shared module fixtures
from training import TrainConfig, TrainingError
from training.mos import check_layout
from training.trainer import TRAINING_FILE, train

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the tiny model: hidden 64, intermediate 112, 4 heads of 16, 2 kv heads: (in, out) per projection
FEATURES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
FEATURES |= {"gate_proj": (64, 112), "up_proj": (64, 112), "down_proj": (112, 64)}
LAYERS, R, L_SHARDS, P, RANK = 2, 3, 4, 0.5, 4
N = R * LAYERS * L_SHARDS  # 24 rows: 20 public, then 2 private rows per layer
PUBLIC = int((R - P) * LAYERS * L_SHARDS)


def _config(base: Path, data: Path, out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        method="mos", rank=RANK, alpha=8, shards=L_SHARDS, equivalent_rank=R, private_rank=P,
        steps=80, lr=1e-2, batch_size=8, seed=0, max_length=128, threads=1,
    )  # fmt: skip
    return TrainConfig(data=data, out=out, model=str(base), **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained_mos(base_dir: Path, data_file: Path, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("mos-root") / "toy-mos"
    train(_config(base_dir, data_file, out))
    return out


def test_the_loss_falls_and_training_json_counts_the_pool_parameters(trained_mos: Path) -> None:
    summary = json.loads((trained_mos / TRAINING_FILE).read_text())
    assert summary["method"] == "mos" and len(summary["losses"]) == 80
    assert summary["final_loss"] < 0.5 * summary["initial_loss"], summary["losses"]
    # R * L * (in + out) per projection: as many as a LoRA of rank R, whatever the per-layer rank
    assert summary["parameters"] == sum(R * LAYERS * (i + o) for i, o in FEATURES.values())


def test_the_files_are_the_mos_layout(trained_mos: Path, base_dir: Path) -> None:  # noqa: F811
    config = json.loads((trained_mos / MOS_CONFIG_FILE).read_text())
    assert config == {
        "format": "mos", "base_model": base_dir.name, "r": RANK, "R": R, "shards_per_vector": L_SHARDS,
        "private_rank": P, "lora_alpha": 8, "target_modules": list(PROJECTIONS), "num_layers": LAYERS,
    }  # fmt: skip
    tensors = load_file(trained_mos / MOS_WEIGHTS_FILE)
    expected = {f"pool.{p}.{ab}" for p in PROJECTIONS for ab in "AB"}
    expected |= {f"index.{i}.{p}.{ab}" for i in range(LAYERS) for p in PROJECTIONS for ab in "AB"}
    assert set(tensors) == expected
    for projection, (in_features, out_features) in FEATURES.items():
        pool_a, pool_b = tensors[f"pool.{projection}.A"], tensors[f"pool.{projection}.B"]
        assert pool_a.shape == (N, in_features // L_SHARDS) and pool_a.dtype == torch.float16
        assert pool_b.shape == (N, out_features // L_SHARDS) and pool_b.dtype == torch.float16
        assert pool_b.abs().sum() > 0  # trained away from its zero init
        for layer in range(LAYERS):
            own = set(range(PUBLIC + layer * 2, PUBLIC + layer * 2 + 2))
            tables = [tensors[f"index.{layer}.{projection}.{ab}"] for ab in "AB"]
            for table in tables:
                assert table.dtype == torch.int32 and table.shape == (RANK * L_SHARDS,)
                rows = table.tolist()
                assert len(set(rows)) == len(rows)  # distinct rows
                assert own <= set(rows)  # the layer's private rows ...
                assert all(row < PUBLIC for row in set(rows) - own)  # ... and public ones, no other's
            assert not torch.equal(tables[0], tables[1])  # A and B drawn independently


def test_the_same_seed_gives_the_same_bytes(base_dir: Path, data_file: Path, tmp_path: Path) -> None:  # noqa: F811
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        outs[name] = tmp_path / name
        train(_config(base_dir, data_file, outs[name], steps=2, seed=seed))
    for file in (MOS_CONFIG_FILE, MOS_WEIGHTS_FILE):
        assert (outs["a"] / file).read_bytes() == (outs["b"] / file).read_bytes(), file
    assert (outs["a"] / MOS_WEIGHTS_FILE).read_bytes() != (outs["c"] / MOS_WEIGHTS_FILE).read_bytes()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "dora"}, "--method must be one of lora, mos"),
        ({"shards": 0}, "--shards must be >= 1"),
        ({"private_rank": 4.0}, r"--private-rank \(4.0\) must be at most --equivalent-rank"),
        ({"equivalent_rank": float("inf")}, "--equivalent-rank must be a number >= 0"),
    ],
)
def test_bad_mos_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        TrainConfig(data=Path("d.jsonl"), out=Path("out"), **{"method": "mos", **overrides})


@pytest.mark.parametrize(
    "layout, message",
    [
        (MosLayout(r=4, R=0.7, shards=4, private_rank=0.25, num_layers=29), r"\(R - p\) \* L \* l = 52.2 "),
        (MosLayout(r=4, R=1.3, shards=4, private_rank=0.3, num_layers=2), r"p \* l = 1.2 "),
        (MosLayout(r=1, R=2, shards=2, private_rank=1.5, num_layers=2), "picks only r \\* l = 2"),
        (MosLayout(r=8, R=1, shards=4, private_rank=0, num_layers=2), "needs 32 distinct public rows"),
    ],
)
def test_layouts_that_cannot_be_drawn_are_refused(layout: MosLayout, message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        check_layout(layout)


def test_shards_that_do_not_divide_a_projection_are_refused(
    base_dir: Path,  # noqa: F811
    data_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    with pytest.raises(TrainingError, match="--shards 3 does not divide q_proj's input size 64"):
        train(_config(base_dir, data_file, tmp_path / "o", shards=3, equivalent_rank=2, private_rank=0))
    assert not (tmp_path / "o").exists()  # a failed run leaves no empty --out behind


def test_the_cli_passes_the_mos_flags(base_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    out = tmp_path / "cli-mos"
    argv = ["train", "--method", "mos", "--data", str(data_file), "--out", str(out), "--model", str(base_dir)]
    argv += ["--rank", "2", "--shards", "4", "--equivalent-rank", "2", "--private-rank", "0.5"]
    assert cli.main([*argv, "--steps", "2", "--threads", "1", "--targets", "q_proj,v_proj"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    config = json.loads((out / MOS_CONFIG_FILE).read_text())
    assert (config["r"], config["R"], config["private_rank"], config["target_modules"]) == (
        2, 2, 0.5, ["q_proj", "v_proj"]
    )  # fmt: skip
    assert cli.main([*argv[:-2], "--private-rank", "5"]) == 2
    assert "--private-rank (5.0) must be at most --equivalent-rank (2.0)" in capsys.readouterr().err


def test_served_greedy_output_equals_the_training_time_layers(
    trained_mos: Path,
    base_dir: Path,  # noqa: F811
    tokenizer,
) -> None:
    """loramux serving the saved directory answers as the trainer's own MoS layers do (with the saved,
    fp16-rounded pools put back in them): the trainer and the server agree on what the layout means."""
    from transformers import AutoModelForCausalLM

    from training.mos import MosAdapterModule

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = _config(base_dir, Path("unused"), Path("unused"))
    module = MosAdapterModule(model, config, list(PROJECTIONS))
    saved = load_file(trained_mos / MOS_WEIGHTS_FILE)
    with torch.no_grad():
        for projection, (pool_a, pool_b) in module.pools.items():
            pool_a.copy_(saved[f"pool.{projection}.A"].float())
            pool_b.copy_(saved[f"pool.{projection}.B"].float())
    for (layer, projection), (index_a, index_b) in module.indices.items():  # same seed: same tables
        assert torch.equal(index_a, saved[f"index.{layer}.{projection}.A"].long())
        assert torch.equal(index_b, saved[f"index.{layer}.{projection}.B"].long())
    model.eval()
    prompts = [chat_prompt_ids(tokenizer, [("user", f"Color of box {i}?")]) for i in (1, 5, 30)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=EOS
            )
            expected.append(out[0, len(prompt) :].tolist())
    engine = start_adapter_engine(base_dir, trained_mos.parent)
    try:
        greedy = SamplingParams(max_tokens=10, temperature=0.0)
        sinks = [
            submit(engine, f"mos-{i}", list(p), greedy, adapter="toy-mos") for i, p in enumerate(prompts)
        ]
        served = [sink.wait().tokens for sink in sinks]
        wait_idle(engine)
    finally:
        engine.shutdown()
    assert served == expected
    for answer in served[:2]:  # it learnt the rows' form (with a third of the test LoRA's parameters)
        text = tokenizer.decode(answer)
        assert text.startswith("Box ") and text.endswith(".<|im_end|>"), text
