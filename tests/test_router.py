"""The router's core (server/router/): what it reads of a prompt, the selector's arithmetic, the
weight-only prototypes, its saved tables, and how well it routes the demo tasks' held-out prompts.

Oracles: transformers' hidden states for the features, direct formulas (torch.mean/var, the
scatter and Mahalanobis distance written out, torch.linalg.svd of B A) for the selector and the
prototypes, torch.optim.Adam and autograd for the selector's training, the weights before and
after and torch's FLOP counter for what an add touches, and the demo tasks' hand-written held-out
prompts for routing accuracy (measured figures: bench/RESULTS.md "Router")."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from adapters_store import AdapterRoots, AdapterStore
from adapters_store.adapter import LoraWeights
from server.config import RouterConfig
from server.model.loader import load_model
from server.prompts import chat_prompt_ids
from server.router.decision import Candidate, RouteDecision
from server.router.examples import ExamplesError, check_prompts, read_examples
from server.router.features import FeatureReader, chat_template_edges
from server.router.prototypes import adapter_vectors, arrow_scores, calibrated, module_scores
from server.router.router import Router, StoreSource
from server.router.selector import (
    BATCH,
    CONFUSABLE,
    LEARNING_RATE,
    MAX_CALIBRATION,
    SHRINKAGE,
    RowAdam,
    Selector,
    cross_entropy_gradient,
)
from server.router.state import TableFiles
from tasks import TASK_NAMES, get_task
from tasks.synthetic import synthetic_tasks

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
OFFTOPIC = Path(__file__).resolve().parent.parent / "tasks" / "heldout" / "offtopic.jsonl"
CONTENT = ("sql", "sentiment", "extract", "arith")


# -- features ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(make_tiny_model: Any) -> Any:
    return load_model(str(make_tiny_model(kind="llama", kv_heads=2)), torch.device("cpu"), torch.float32, 512)


def _render(tokenizer: Any) -> Any:
    return lambda content: chat_prompt_ids(tokenizer, [("user", content)])


def test_the_feature_is_transformers_hidden_state_pooled_over_the_prompts_own_tokens(tiny: Any) -> None:
    from transformers import AutoModelForCausalLM

    render = _render(tiny.tokenizer)
    prefix, suffix = chat_template_edges(render)
    assert (
        prefix and suffix and render("x")[: len(prefix)] == prefix and render("x")[-len(suffix) :] == suffix
    )
    ids = render("How many people work in Legal?")
    hf = AutoModelForCausalLM.from_pretrained(tiny.directory, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    own = slice(len(prefix), len(ids) - len(suffix))
    for layer in (0, 1, 2):  # 2 = the last layer: its input is the final norm's
        norm = hf.model.norm if layer == 2 else hf.model.layers[layer].input_layernorm
        expected = norm(hidden[layer][0]).detach()[own].mean(0)
        reading = FeatureReader(tiny.model, layer, (prefix, suffix)).read(ids)
        if layer == 2:  # transformers' last hidden state is already normed
            expected = hidden[2][0][own].mean(0)
        torch.testing.assert_close(reading.feature, expected, atol=2e-5, rtol=1e-4)
    # the template prefix's K/V are cached and reused: the same taps as reading it all
    cached = FeatureReader(tiny.model, 1, (prefix, suffix)).read(ids, prototype_layers=2)
    full, _, _ = tiny.model.prefix(torch.tensor(ids), 2)
    for (a, m), (fa, fm) in zip(cached.taps, full, strict=True):
        torch.testing.assert_close(a, fa[own], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m, fm[own], atol=1e-5, rtol=1e-5)


def test_a_long_prompt_is_read_whole(tiny: Any) -> None:
    """The KV cache of a read holds the whole prompt, however long (the engine's starts at 128)."""
    reader = FeatureReader(tiny.model, 2, chat_template_edges(_render(tiny.tokenizer)))
    ids = _render(tiny.tokenizer)("word " * 300)
    assert len(ids) > 300
    reading = reader.read(ids, prototype_layers=2)
    assert reading.feature.isfinite().all() and reading.taps[1][0].shape[0] > 290


def test_a_prompt_without_the_template_is_pooled_whole(tiny: Any) -> None:
    reader = FeatureReader(tiny.model, 1, chat_template_edges(_render(tiny.tokenizer)))
    ids = tiny.tokenizer.encode("plain text, no chat template")
    assert reader.content_span(ids) == slice(0, len(ids))
    with pytest.raises(ValueError, match="router layer"):
        FeatureReader(tiny.model, 3)


# -- selector ------------------------------------------------------------------------------------


def _clusters(count: int, n: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(count, dim, generator=g) * 3
    return {f"a{i}": centers[i] + torch.randn(n, dim, generator=g) for i in range(count)}


def test_the_selectors_statistics_and_distances_are_the_formulas() -> None:
    data = _clusters(3, 24, 8, seed=1)
    selector = Selector(8)
    for name, x in data.items():
        selector.learn(name, x, steps=50)
    train = {name: x[torch.arange(len(x)) % 4 != 3] for name, x in data.items()}  # a quarter held back
    everything = torch.cat(list(train.values()))
    torch.testing.assert_close(selector.mean, everything.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(selector.m2 / (len(everything) - 1), everything.var(0), atol=1e-4, rtol=1e-4)
    scatter = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in train.values())
    torch.testing.assert_close(selector.scatter.float(), scatter, atol=1e-3, rtol=1e-4)
    covariance = scatter / (len(everything) - 3)
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * covariance.diagonal().mean() * torch.eye(8)
    point = torch.randn(8)
    for i, x in enumerate(train.values()):
        d = point - x.mean(0)
        assert math.isclose(
            float(selector.distances(point[None])[0, i]),
            float(d @ torch.linalg.inv(covariance) @ d),
            rel_tol=1e-4,
        )
    # the temperature minimizes the held-back examples' NLL
    held = torch.cat([x[torch.arange(len(x)) % 4 == 3] for x in data.values()])
    labels = torch.arange(3).repeat_interleave(6)
    logits = selector.logits(held)
    # the head: the LDA discriminant (-d^2 / 2 up to what every adapter shares) plus the trained correction
    d2 = selector.distances(held)
    shared = 0.5 * ((held @ selector.precision) * held).sum(1, keepdim=True)
    correction = selector.standardized(held) @ selector.weight.T + selector.bias
    torch.testing.assert_close(logits, -0.5 * d2 + shared + correction, atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(
        selector.scores(held[0]).probabilities,
        torch.softmax((-0.5 * d2[0] + correction[0]) / selector.temperature, 0),
    )

    def nll(t: float) -> float:
        return float(F.cross_entropy(logits / t, labels))

    t = selector.temperature
    assert nll(t) <= min(nll(t * 1.2), nll(t / 1.2)) + 1e-6


def test_learning_costs_the_same_steps_whatever_the_number_of_adapters() -> None:
    data = _clusters(12, 16, 16, seed=2)
    selector = Selector(16)
    reports = [selector.learn(name, x, steps=40) for name, x in data.items()]
    assert {r.steps for r in reports} == {40}
    assert [r.replay for r in reports] == [0] + [40 * (BATCH - BATCH // 2)] * 11
    assert [r.calibration for r in reports] == [0] + [4 * k for k in range(2, 13)]  # 4 held back each
    right = sum(
        int(selector.scores(x).probabilities.argmax()) == i
        for i, x in enumerate(c.mean(0) for c in data.values())
    )
    assert right == 12  # every cluster's centre goes to its own adapter, the first ones included
    selector.forget("a0")
    assert "a0" not in selector.classes and selector.weight.shape == (11, 16)
    assert int(selector.scores(data["a5"].mean(0)).probabilities.argmax()) == selector.classes.index("a5")


def _grown(count: int, dim: int) -> tuple[Selector, dict[str, torch.Tensor]]:
    """A selector that learned `count` clusters (4 examples each: 1 held back), cheaply (1 step),
    and the examples of one more."""
    data = _clusters(count + 1, 4, dim, seed=5)
    selector = Selector(dim)
    for name in list(data)[:count]:
        selector.learn(name, data[name], steps=1)
    return selector, data


def test_a_training_step_trains_only_the_adapters_in_its_softmax() -> None:
    selector, data = _grown(64, 8)
    weight, bias = selector.weight.clone(), selector.bias.clone()
    report = selector.learn("new", data["a64"], steps=1)
    changed = ((selector.weight[:64] != weight) | (selector.bias[:64] != bias).unsqueeze(1)).any(1)
    # of 64, only the (at most BATCH // 2) adapters its replay drew and the CONFUSABLE ones
    assert CONFUSABLE <= int(changed.sum()) == report.rows_per_step - 1 <= BATCH - BATCH // 2 + CONFUSABLE
    assert selector.weight[64].abs().sum() > 0  # and the new adapter's own


def test_a_training_step_costs_the_same_with_4x_the_adapters() -> None:
    """The FLOPs of 100 more training steps in an add (torch's counter of matmul FLOPs: no clock,
    nothing to flake) with 48 and 192 adapters: each step's softmax spans the adapters in its batch
    and the CONFUSABLE ones only (at most BATCH // 2 + 1 + CONFUSABLE), so a step's three matmuls
    (discriminant, correction, gradient) cost at most 6 x BATCH x (dim + 1) x that many FLOPs
    whatever the number of adapters. (A step spanning every adapter costs 3.4x as much at 192 as
    at 48.) What an add does once beyond its steps is fitted on at most MAX_CALIBRATION held-back
    examples."""
    from torch.utils.flop_counter import FlopCounterMode

    dim = 32
    per_step = {}
    for count in (48, 192):
        selector, data = _grown(count, dim)
        flops = []
        for steps in (100, 200):
            with FlopCounterMode(display=False) as counter:
                report = selector.copy().learn("new", data[f"a{count}"], steps=steps)
            flops.append(counter.get_total_flops())
            assert report.calibration == count + 1 <= MAX_CALIBRATION  # 1 held back per adapter
        per_step[count] = (flops[1] - flops[0]) / 100  # the add's once-only work cancels
    assert per_step[192] <= 6 * BATCH * (dim + 1) * (BATCH // 2 + 1 + CONFUSABLE), per_step
    assert per_step[192] < 1.4 * per_step[48], per_step  # 24-25 and 30-31 adapters per step


def test_row_adam_is_adam_for_the_rows_it_steps() -> None:
    """Against torch.optim.Adam: rows stepped every time follow Adam exactly, a row stepped every
    other time follows Adam run on its own steps, rows never stepped stay as they were."""
    g = torch.Generator().manual_seed(7)
    table = torch.randn(3, 5, generator=g)
    grads = torch.randn(6, 3, 5, generator=g)
    rows = RowAdam(table)
    dense = table[:2].clone().requires_grad_(True)
    alone = table[2:].clone().requires_grad_(True)  # row 2, stepped at even steps only
    optimizers = [torch.optim.Adam([dense], lr=LEARNING_RATE), torch.optim.Adam([alone], lr=LEARNING_RATE)]
    for step, grad in enumerate(grads):
        every = torch.tensor([0, 1, 2] if step % 2 == 0 else [0, 1])
        rows.step(every, grad[every])
        dense.grad = grad[:2].clone()
        optimizers[0].step()
        if step % 2 == 0:
            alone.grad = grad[2:].clone()
            optimizers[1].step()
    torch.testing.assert_close(rows.table, torch.cat([dense, alone]).detach(), atol=1e-6, rtol=1e-5)
    untouched = RowAdam(table)
    untouched.step(torch.tensor([1]), grads[0, 1:2])
    assert torch.equal(untouched.table[[0, 2]], table[[0, 2]]) and not torch.equal(
        untouched.table[1], table[1]
    )


def test_the_cross_entropy_gradient_is_autograds() -> None:
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(7, 4, generator=g, requires_grad=True)
    targets = torch.tensor([0, 3, 3, 1, 2, 0, 1])
    F.cross_entropy(logits, targets).backward()
    assert logits.grad is not None
    torch.testing.assert_close(cross_entropy_gradient(logits.detach(), targets), logits.grad)


# -- prototypes ----------------------------------------------------------------------------------


def test_prototypes_are_the_top_right_singular_vectors_of_b_a() -> None:
    g = torch.Generator().manual_seed(3)
    weights = {
        (0, "q_proj"): LoraWeights(torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g), 2.0),
        (1, "up_proj"): LoraWeights(torch.randn(2, 16, generator=g), torch.randn(40, 2, generator=g), 1.0),
        (1, "o_proj"): LoraWeights(torch.randn(2, 24, generator=g), torch.randn(16, 2, generator=g), 1.0),
        (5, "q_proj"): LoraWeights(torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g), 1.0),
    }
    vectors = adapter_vectors(weights, num_layers=2)
    assert set(vectors) == {(0, "q_proj"), (1, "up_proj")}  # o_proj does not read the residual stream
    for key, v in vectors.items():
        top = torch.linalg.svd(weights[key].B @ weights[key].A).Vh[0]
        assert float((v @ top).abs()) == pytest.approx(1.0, abs=1e-5)
    taps = [(torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)) for _ in range(2)]
    scores = module_scores(vectors, taps)
    x = taps[1][1]
    assert scores[(1, "up_proj")] == pytest.approx(
        float((F.normalize(x, dim=1) @ vectors[(1, "up_proj")]).abs().mean()), rel=1e-5
    )
    reference = [
        [(torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)) for _ in range(2)]
        for _ in range(6)
    ]
    prototypes = calibrated(vectors, reference)
    expected = sum((scores[k] - prototypes.mean[k]) / prototypes.spread[k] for k in vectors) / len(vectors)
    assert float(arrow_scores([prototypes], taps)[0]) == pytest.approx(expected, rel=1e-4)


# -- examples ------------------------------------------------------------------------------------


def test_examples_files_and_prompts_are_checked(tmp_path: Path) -> None:
    assert read_examples(tmp_path).prompts == ()
    (tmp_path / "examples.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    examples = read_examples(tmp_path)
    assert examples.prompts == ("a", "c") and examples.digest.startswith("sha256:")
    for bad, why in (('{"prompt": 3}\n', "line 1"), ('{"prompt": "a"}\nnot json\n', "line 2: not JSON")):
        (tmp_path / "examples.jsonl").write_text(bad)
        with pytest.raises(ExamplesError, match=why):
            read_examples(tmp_path)
    for prompts, why in (
        ([], "at least one"),
        (["  "], r"\[0\]: an example prompt must be"),
        (["x" * 5000], "at most 4000"),
    ):
        with pytest.raises(ExamplesError, match=why):
            check_prompts(prompts)


def test_a_decision_mixes_its_top_candidates_by_renormalized_score() -> None:
    decision = RouteDecision(
        (Candidate("a", 0.6, "examples"), Candidate("b", 0.3, "examples"), Candidate("c", 0.1, "examples")),
        False,
        "",
        0.0,
    )
    assert decision.mixture(1) == (("a", 1.0),)
    mixed = decision.mixture(2)
    assert [n for n, _ in mixed] == ["a", "b"] and [w for _, w in mixed] == pytest.approx([2 / 3, 1 / 3])
    assert RouteDecision(decision.candidates, True, "below threshold", 0.0).mixture(2) == ()
    negligible = RouteDecision(
        (Candidate("a", 0.995, "examples"), Candidate("b", 0.005, "examples")), False, "", 0
    )
    assert negligible.mixture(2) == (("a", 1.0),)  # under 1% of the mixture: left out
    config = RouterConfig(adapters=("*", "!*-mos", "!*-compeft-*"))
    assert config.allows("sql") and not config.allows("sql-mos") and not config.allows("sql-compeft-10")


# -- the router on the default model -------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Any:
    return load_model(None, torch.device("cpu"), torch.float32, 512)


def _router(loaded: Any, root: Path, patterns: tuple[str, ...], state: Path | None = None) -> Router:
    store = AdapterStore(loaded.model.arch.adapter_spec(16), AdapterRoots([root]), 1 << 30)
    config = RouterConfig(adapters=patterns, state_path=str(state) if state else None)
    reader = FeatureReader(loaded.model, config.layer, chat_template_edges(_render(loaded.tokenizer)))
    return Router("smol", reader, loaded.tokenizer, StoreSource(store), config)


@pytest.fixture(scope="module")
def demo_router(smol: Any) -> Router:
    router = _router(smol, ADAPTERS, TASK_NAMES)
    report = router.reconcile()
    assert sorted(report.learned) == sorted(TASK_NAMES) and not report.refused
    return router


def _picks(router: Router, loaded: Any, prompts: list[str]) -> list[str]:
    decisions = [router.route(_render(loaded.tokenizer)(p)) for p in prompts]
    return ["" if d.fallback else d.candidates[0].adapter for d in decisions]


def test_the_demo_tasks_held_out_prompts_go_to_their_adapter(demo_router: Router, smol: Any) -> None:
    right = total = 0
    for name in CONTENT:
        picks = _picks(demo_router, smol, [e.prompt for e in get_task(name).heldout()])
        right += sum(p == name for p in picks)
        total += len(picks)
    assert right / total >= 0.95, f"{right}/{total}"  # measured 316/326 (bench/RESULTS.md "Router")


def test_out_of_domain_prompts_go_to_the_base_model(demo_router: Router, smol: Any) -> None:
    router = _router(smol, ADAPTERS, CONTENT)  # the four content adapters: shout's questions are off topic
    router.tables = demo_router.tables.copy()
    router.forget("shout")
    outside = [json.loads(line)["prompt"] for line in OFFTOPIC.read_text().splitlines()]
    outside += [e.prompt for e in get_task("shout").heldout()]
    inside = [e.prompt for name in CONTENT for e in get_task(name).heldout()]
    out_picks, in_picks = _picks(router, smol, outside), _picks(router, smol, inside)
    # measured 45 of 100 (34 of the first 66: 39 before sql's examples had chatty openings, which
    # widened its domain; bench/RESULTS.md "Router")
    assert out_picks.count("") >= 0.4 * len(outside), out_picks
    assert in_picks.count("") <= 0.05 * len(inside)  # measured 8 of 326


def test_adapters_added_one_by_one_stay_routable(smol: Any) -> None:
    router = _router(smol, ADAPTERS, ("synth-*",))
    tasks = synthetic_tasks(8)
    reports = [router.learn(t.name, t.prompts(40, seed=0)) for t in tasks]
    assert len({r.steps for r in reports}) == 1 and len({r.replay for r in reports[1:]}) == 1
    render = _render(smol.tokenizer)
    top1 = {
        t.name: sum(router.route(render(p)).candidates[0].adapter == t.name for p in t.prompts(10, seed=1))
        for t in tasks
    }
    assert sum(top1.values()) >= 0.85 * 80, top1
    assert top1[tasks[0].name] + top1[tasks[1].name] >= 16, top1  # the first ones did not collapse


def test_weight_only_routing_beats_chance_on_every_demo_task(smol: Any, tmp_path: Path) -> None:
    for name in TASK_NAMES:
        shutil.copytree(ADAPTERS / name, tmp_path / name, ignore=shutil.ignore_patterns("examples.jsonl"))
    router = _router(smol, tmp_path, TASK_NAMES)
    report = router.reconcile()
    assert sorted(report.weight_only) == sorted(TASK_NAMES) and not router.tables.selector.classes
    for name in TASK_NAMES:
        prompts = [e.prompt for e in get_task(name).heldout()][:8]
        decisions = [router.route(_render(smol.tokenizer)(p)) for p in prompts]
        assert all(d.candidates[0].by == "weights" for d in decisions)
        right = sum(d.candidates[0].adapter == name for d in decisions)
        assert right / len(prompts) > 1 / len(TASK_NAMES), f"{name}: {right}/{len(prompts)}"


# -- saved tables and reconciling ----------------------------------------------------------------


def test_tables_are_saved_reloaded_and_reconciled(smol: Any, tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state" / "router.safetensors"
    for name in ("sql", "arith"):
        shutil.copytree(ADAPTERS / name, root / name)
    lines = (ADAPTERS / "sql" / "examples.jsonl").read_text().splitlines()
    (root / "sql" / "examples.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (root / "arith" / "examples.jsonl").write_text(
        "\n".join((ADAPTERS / "arith" / "examples.jsonl").read_text().splitlines()[:40]) + "\n"
    )
    router = _router(smol, root, ("*",), state)
    assert sorted(router.reconcile().learned) == ["arith", "sql"]
    router.learn("sql", ["show me the payroll of the finance team"])
    prompt = _render(smol.tokenizer)("How many engineers earn over 100k?")
    before = router.route(prompt)

    again = _router(smol, root, ("*",), state)
    assert again.restore()
    saved = again.tables
    after = again.route(prompt)
    assert [(c.adapter, round(c.score, 5)) for c in after.candidates] == [
        (c.adapter, round(c.score, 5)) for c in before.candidates
    ]
    assert saved.known["sql"].runtime_prompts == ("show me the payroll of the finance team",)
    # nothing changed on disk: nothing is learned again
    report = again.reconcile()
    assert report.learned == () and report.forgotten == ()
    # a changed examples file is learned again, a removed adapter forgotten, a broken file refused
    (root / "arith" / "examples.jsonl").write_text('{"prompt": "what is 2 + 2"}\n{"prompt": "add 3 and 9"}\n')
    shutil.rmtree(root / "sql")
    shutil.copytree(ADAPTERS / "sentiment", root / "sentiment")
    (root / "sentiment" / "examples.jsonl").write_text("not json\n")
    report = again.reconcile()
    assert report.learned == ("arith",) and report.forgotten == ("sql",)
    assert report.refused[0][0] == "sentiment" and "line 1" in report.refused[0][1]
    assert "sentiment" in report.weight_only and again.tables.selector.classes == ["arith"]
    mixed = again.route(prompt)  # by weights: sentiment against the group of adapters with examples
    assert {(c.adapter, c.by) for c in mixed.candidates} == {("arith", "examples"), ("sentiment", "weights")}
    assert sum(c.score for c in mixed.candidates) == pytest.approx(1.0, abs=1e-5)
    # another model or setting: the saved tables are not used
    assert TableFiles(state).load({**again.state_key(), "layer": 5}, again.reader.dim) is None
    assert TableFiles(state).load(again.state_key(), again.reader.dim) is not None
    state.with_suffix(".safetensors").write_bytes(b"garbage")
    assert TableFiles(state).load(again.state_key(), again.reader.dim) is None


def test_a_reconcile_stopped_by_a_shutdown_returns_after_its_adapter_and_publishes_nothing(
    smol: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    for name in ("arith", "sql"):
        shutil.copytree(ADAPTERS / name, root / name)
    router = _router(smol, root, ("*",))
    before = router.tables
    synced: list[str] = []
    sync = router._sync_examples

    def sync_then_shutdown(tables: Any, name: str, directory: Path, learned: list[str]) -> str:
        synced.append(name)
        why = sync(tables, name, directory, learned)
        router.stop()  # SIGTERM arrives while the first adapter is being learned
        return why

    monkeypatch.setattr(router, "_sync_examples", sync_then_shutdown)
    report = router.reconcile()
    assert report.stopped and synced == ["arith"] and router.tables is before
    assert router.reconcile().stopped and synced == ["arith"]  # later ones do nothing


def test_the_background_reconciler_waits_for_a_reconcile_under_way_when_stopped() -> None:
    from server.serve_commands import BackgroundReconciler

    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    class SlowRouter:
        config = RouterConfig(rescan_s=0.05)

        def reconcile(self, names: Any) -> None:
            started.set()
            release.wait(10)
            finished.set()

        def stop(self) -> None:
            release.set()  # as Router.stop: the reconcile returns after the adapter it is on

        def routable_counts(self) -> tuple[int, int]:
            return (0, 0)

        def changed(self) -> set[str]:
            return set()

    reconciler = BackgroundReconciler(SlowRouter())  # type: ignore[arg-type]
    assert started.wait(10) and not finished.is_set()
    reconciler.stop(timeout_s=10)
    assert finished.is_set()  # stop() returned only once the reconcile had
