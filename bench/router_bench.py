"""`loramux bench router`: how well and how cheaply the router picks adapters, on the default model.

Parts (`--parts`, default all), each printed as JSON lines and summarized at the end:
- `sweep`: which layer and pooling the selector should read. Per decoder layer (0-4, then every
  4th, and the last: the normed residual stream entering it) and pooling (mean over all tokens, mean over the prompt's own
  tokens without the chat template's, last token), a head trained on the demo adapters'
  `examples.jsonl` and scored on the tasks' hand-written held-out prompts; and, for four
  adapters (sql, sentiment, extract, arith), how well the distance to their examples tells
  out-of-domain prompts (tasks/heldout/offtopic.jsonl and shout's held-out) from their own
  held-out ones (AUROC), for the Mahalanobis distance, nearest-neighbour cosine and the
  softmax's top probability.
- `accuracy`: the router as served (reconcile over the five demo adapters): top-1 accuracy on
  held-out prompts (the bar is over the four content tasks), fallbacks; then with the four
  content adapters only, how many out-of-domain prompts fall back and how many held-out ones do.
- `metric`: each content task's metric with `auto` against the metric with its adapter named
  (greedy; a prompt routed to its own adapter gets exactly the named answer, so only misrouted
  prompts are generated again with what `auto` chose).
- `growth`: synthetic tasks (tasks/synthetic.py) added one by one up to `--max-adapters`:
  steps, head rows trained per step, calibration examples and seconds per add, top-1 accuracy
  over all tasks so far and over the first two; and the time to save the tables after each add,
  as the server does (`save_s`: one TableFiles kept, only the new adapter's file written) beside
  rewriting every adapter's file (`save_all_s`, a fresh TableFiles each time: what one-file
  tables cost), with the bytes each wrote.
- `weights`: weight-only routing (Arrow prototypes, no examples) per demo task, beside the selector.
- `versions`: the five demo LoRAs without examples, each beside a copy of its ComPEFT 0.1 and a
  `loramux export` of that copy, routed by weights: how many held-out prompts go to their task
  (its LoRA or a version of it) rather than the base model, with versions routed as their original
  (as served) and as separate candidates (as before: the copies split the probability).
- `cost`: routing time per request against the prefill time of the same prompt (our model, on the
  benchmark's threads), over the held-out prompts; and routing as served, on one intra-op thread
  (the preparation thread's), against the same prefill.
An in-process benchmark: it drives the model and router directly, not over the wire.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters_store import AdapterRoots, AdapterStore
from server.config import AdapterConfig, EngineConfig, RouterConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import RequestOutput, SamplingParams
from server.model.batch import StepBatch
from server.model.kv_cache import KVCache
from server.preparation import RequestInput, RequestPreparer
from server.prompts import PromptInput, chat_prompt_ids
from server.router.features import FeatureReader, chat_template_edges
from server.router.router import Router, StoreSource
from server.router.state import TableFiles
from server.router.variants import Variants
from tasks import TASK_NAMES, get_task
from tasks.synthetic import synthetic_tasks

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
OFFTOPIC = Path(__file__).resolve().parent.parent / "tasks" / "heldout" / "offtopic.jsonl"
CONTENT_TASKS = ("sql", "sentiment", "extract", "arith")
PARTS = ("sweep", "accuracy", "metric", "growth", "weights", "versions", "cost")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {','.join(PARTS)}")
    parser.add_argument(
        "--max-adapters", type=int, default=64, help="growth: synthetic adapters (default 64)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def offtopic_prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in OFFTOPIC.read_text().splitlines() if line.strip()]


class Setup:
    """The default model, its tokenizer, and a reader of prompts as the server's router reads them."""

    def __init__(self) -> None:
        engine = build_engine_for_bench()
        self.engine = engine
        self.model, self.tokenizer = engine.model, engine.tokenizer
        self.edges = chat_template_edges(self.render)

    def render(self, prompt: str) -> tuple[int, ...]:
        return chat_prompt_ids(self.tokenizer, [("user", prompt)])

    def router(self, adapters: Sequence[str], root: Path = ADAPTERS, **settings: Any) -> Router:
        store = AdapterStore(self.model.arch.adapter_spec(16), AdapterRoots([root]), 1 << 30)
        config = RouterConfig(adapters=tuple(adapters), **settings)
        reader = FeatureReader(self.model, config.layer, self.edges)
        return Router("bench", reader, self.tokenizer, StoreSource(store), config)


def build_engine_for_bench() -> Engine:
    from server.runtime import build_engine

    config = ServerConfig(
        device="cpu",
        engine=EngineConfig(max_running=16, max_queue=256, max_model_len=512, max_batched_tokens=256),
        adapters=AdapterConfig(roots=(str(ADAPTERS),), max_slots=len(TASK_NAMES), max_rank=8),
    )
    return build_engine(config)


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def heldout(name: str) -> list[str]:
    return [e.prompt for e in get_task(name).heldout()]


# -- sweep ---------------------------------------------------------------------------------------


def sweep(setup: Setup) -> None:
    model = setup.model
    layers = model.arch.num_layers
    prefix, suffix = setup.edges

    def states(prompt: str) -> dict[str, list[torch.Tensor]]:
        ids = setup.render(prompt)
        taps, residual, _ = model.prefix(torch.tensor(ids), layers)
        normed = [a for a, _ in taps] + [model.norm(residual)]
        own = slice(len(prefix), len(ids) - len(suffix))
        return {
            "mean": [h.float().mean(0) for h in normed],
            "content": [h[own].float().mean(0) for h in normed],
            "last": [h[-1].float() for h in normed],
        }

    train = {t: [states(p) for p in examples(t)] for t in TASK_NAMES}
    test = {t: [states(p) for p in heldout(t)] for t in TASK_NAMES}
    outside = [states(p) for p in offtopic_prompts()] + test["shout"]
    for pooling in ("mean", "content", "last"):
        for layer in sorted({0, 1, 2, 3, 4, 6, 8, 12, 16, 20, 24, layers}):
            accuracy, _ = _fit_and_score(train, test, pooling, layer, TASK_NAMES)
            _, aurocs = _fit_and_score(train, test, pooling, layer, CONTENT_TASKS, outside)
            emit({"part": "sweep", "pooling": pooling, "layer": layer, "content_top1": accuracy, **aurocs})


def examples(name: str) -> list[str]:
    lines = (ADAPTERS / name / "examples.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def _fit_and_score(
    train: dict[str, list[dict[str, list[torch.Tensor]]]],
    test: dict[str, list[dict[str, list[torch.Tensor]]]],
    pooling: str,
    layer: int,
    classes: Sequence[str],
    outside: Sequence[dict[str, list[torch.Tensor]]] = (),
) -> tuple[float, dict[str, float]]:
    """A full-batch softmax head on standardized features: top-1 over CONTENT_TASKS' held-out,
    and AUROCs of in-domain vs `outside` scores."""

    def matrix(rows: dict[str, list[dict[str, list[torch.Tensor]]]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = [r[pooling][layer] for c in classes for r in rows[c]]
        y = [i for i, c in enumerate(classes) for _ in rows[c]]
        return torch.stack(x), torch.tensor(y)

    x_train, y_train = matrix(train)
    x_test, y_test = matrix(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-4
    weight = torch.zeros(x_train.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(300):
        logits = ((x_train - mean) / std) @ weight + bias
        loss = F.cross_entropy(logits, y_train) + 1e-2 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (((x_test - mean) / std) @ weight + bias).argmax(1)
        content = torch.tensor([classes[int(y)] in CONTENT_TASKS for y in y_test])
        accuracy = float((predicted == y_test)[content].float().mean())
        if not outside:
            return round(accuracy, 4), {}
        x_out = torch.stack([r[pooling][layer] for r in outside])
        means = torch.stack([x_train[y_train == i].mean(0) for i in range(len(classes))])
        centered = x_train - means[y_train]
        covariance = centered.T @ centered / (len(x_train) - len(classes))
        covariance = 0.5 * covariance + 0.5 * covariance.diagonal().mean() * torch.eye(len(mean))
        precision = torch.linalg.inv(covariance)
        units = F.normalize(x_train, dim=1)

        def scores(x: torch.Tensor) -> dict[str, torch.Tensor]:
            d = x.unsqueeze(1) - means
            return {
                "mahalanobis": -torch.einsum("ncd,de,nce->nc", d, precision, d).min(1).values,
                "cosine_knn": (F.normalize(x, dim=1) @ units.T).max(1).values,
                "softmax": torch.softmax(((x - mean) / std) @ weight + bias, 1).max(1).values,
            }

        inside, out = scores(x_test[content]), scores(x_out)
        return round(accuracy, 4), {f"auroc_{k}": round(auroc(inside[k], out[k]), 3) for k in inside}


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an in-domain score > an out-of-domain one), ties counting half."""
    greater = (inside[:, None] > outside[None, :]).float().mean()
    ties = (inside[:, None] == outside[None, :]).float().mean()
    return float(greater + 0.5 * ties)


# -- accuracy ------------------------------------------------------------------------------------


def accuracy(setup: Setup) -> dict[str, Any]:
    router = setup.router(TASK_NAMES)
    report = router.reconcile()
    emit({"part": "accuracy", "reconcile_s": round(report.seconds, 1), "learned": len(report.learned)})
    picks: dict[str, list[str]] = {}
    for name in TASK_NAMES:
        prompts = heldout(name)
        decisions = [router.route(setup.render(p)) for p in prompts]
        picks[name] = ["" if d.fallback else d.candidates[0].adapter for d in decisions]
        right = sum(p == name for p in picks[name])
        # which prompts went elsewhere (their row in the held-out file, from 0; "" = the base model)
        misrouted = [[i, prompts[i], pick] for i, pick in enumerate(picks[name]) if pick != name]
        emit(
            {
                "part": "accuracy",
                "task": name,
                "prompts": len(decisions),
                "top1": round(right / len(decisions), 4),
                "fallbacks": sum(d.fallback for d in decisions),
                "top1_ignoring_fallback": round(
                    sum(d.candidates[0].adapter == name for d in decisions) / len(decisions), 4
                ),
                "misrouted": misrouted if name in CONTENT_TASKS else len(misrouted),
            }
        )
    content = [p == t for t in CONTENT_TASKS for p in picks[t]]
    summary = {"content_top1": round(sum(content) / len(content), 4)}
    four = setup.router(CONTENT_TASKS)
    four.reconcile()
    outside = [four.route(setup.render(p)) for p in offtopic_prompts() + heldout("shout")]
    inside = [four.route(setup.render(p)) for t in CONTENT_TASKS for p in heldout(t)]
    summary |= {
        "outside_prompts": len(outside),
        "outside_fallbacks": sum(d.fallback for d in outside),
        "inside_prompts": len(inside),
        "inside_fallbacks": sum(d.fallback for d in inside),
        "inside_top1_four_adapters": round(
            sum(
                (not d.fallback) and d.candidates[0].adapter == t
                for t, d in zip([t for t in CONTENT_TASKS for _ in heldout(t)], inside, strict=True)
            )
            / len(inside),
            4,
        ),
    }
    emit({"part": "accuracy", **summary})
    return {"picks": picks, **summary}


# -- metric --------------------------------------------------------------------------------------


def generate(
    engine: Engine,
    prompts: Sequence[tuple[int, ...]],
    choices: Sequence[tuple[tuple[str, float], ...]],
    max_tokens: int,
) -> list[str]:
    """Greedy answers, each prompt with its adapter choice ((): base model), all submitted at once."""
    preparer = RequestPreparer.for_engine(engine)
    texts = [""] * len(prompts)
    done = threading.Semaphore(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    def sink_for(i: int) -> Callable[[RequestOutput], None]:
        def sink(out: RequestOutput) -> None:
            texts[i] += out.text
            if out.finished:
                done.release()

        return sink

    for i, (ids, choice) in enumerate(zip(prompts, choices, strict=True)):
        name, mixture = (choice[0][0], ()) if len(choice) == 1 else ("", choice)
        given = RequestInput(PromptInput(token_ids=ids), params, f"router-bench-{i}", name, mixture)
        engine.submit(preparer.prepare(given), sink_for(i))
    for _ in prompts:
        done.acquire()
    return texts


def metric(setup: Setup, picks: dict[str, list[str]]) -> dict[str, Any]:
    engine = setup.engine
    summary = {}
    for name in CONTENT_TASKS:
        task = get_task(name)
        rows = task.heldout()
        ids = [setup.render(e.prompt) for e in rows]
        named = generate(engine, ids, [((name, 1.0),)] * len(rows), task.max_tokens)
        missed = [i for i, pick in enumerate(picks[name]) if pick != name]
        again = generate(
            engine,
            [ids[i] for i in missed],
            [((picks[name][i], 1.0),) if picks[name][i] else () for i in missed],
            task.max_tokens,
        )
        auto = list(named)
        for i, text in zip(missed, again, strict=True):
            auto[i] = text
        named_scores = [task.score(t, e) for t, e in zip(named, rows, strict=True)]
        auto_scores = [task.score(t, e) for t, e in zip(auto, rows, strict=True)]
        named_score, auto_score = sum(named_scores) / len(rows), sum(auto_scores) / len(rows)
        ratio = auto_score / named_score if named_score else 1.0
        summary[name] = round(ratio, 4)
        emit(
            {
                "part": "metric",
                "task": name,
                "named": round(named_score, 4),
                "auto": round(auto_score, 4),
                "auto_vs_named": round(ratio, 4),
                "misrouted": len(missed),
                "rows": {"named": named_scores, "auto": auto_scores},  # per held-out row, in file order
            }
        )
    return summary


# -- growth --------------------------------------------------------------------------------------


def growth(setup: Setup, max_adapters: int) -> None:
    tasks = synthetic_tasks(max_adapters)
    router = setup.router(["*"])
    test = {t.name: [setup.render(p) for p in t.prompts(20, seed=1)] for t in tasks}
    checkpoints = {2, 4, 8, 16, 32, 64, 128, max_adapters}
    directory = Path(tempfile.mkdtemp(prefix="loramux-router-bench-"))
    kept = TableFiles(directory / "kept" / "router.safetensors")
    for count, task in enumerate(tasks, start=1):
        started = time.perf_counter()
        report = router.learn(task.name, task.prompts(40, seed=0))
        seconds = time.perf_counter() - started
        save_s, save_bytes = _timed_save(kept, router)
        shutil.rmtree(directory / "all", ignore_errors=True)
        save_all_s, save_all_bytes = _timed_save(TableFiles(directory / "all" / "router.safetensors"), router)
        row: dict[str, Any] = {
            "part": "growth",
            "adapters": count,
            "steps": report.steps,
            "replay": report.replay,
            "rows_per_step": report.rows_per_step,
            "calibration": report.calibration,
            "train_s": round(report.seconds, 3),
            "add_s": round(seconds, 3),
            "save_s": round(save_s, 4),
            "save_bytes": save_bytes,
            "save_all_s": round(save_all_s, 4),
            "save_all_bytes": save_all_bytes,
        }
        if count in checkpoints and count >= 2:

            def top1(names: Sequence[str]) -> float:
                right = [router.route(ids).candidates[0].adapter == n for n in names for ids in test[n]]
                return round(sum(right) / len(right), 4)

            seen = [t.name for t in tasks[:count]]
            row |= {"top1_all": top1(seen), "top1_first_two": top1(seen[:2])}
        emit(row)
    shutil.rmtree(directory, ignore_errors=True)


def _timed_save(files: TableFiles, router: Router) -> tuple[float, int]:
    """Seconds to save the router's tables into `files`, and the bytes of the files it wrote."""
    folder = files.path.parent
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}
    started = time.perf_counter()
    files.save(router.tables, router.state_key())
    seconds = time.perf_counter() - started
    written = [p for p in folder.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    return seconds, sum(p.stat().st_size for p in written)


# -- weights -------------------------------------------------------------------------------------


def weights(setup: Setup) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for name in TASK_NAMES:  # the adapters without their examples
            shutil.copytree(ADAPTERS / name, root / name, ignore=shutil.ignore_patterns("examples.jsonl"))
        router = setup.router(TASK_NAMES, root=root)
        report = router.reconcile()
        emit(
            {
                "part": "weights",
                "reconcile_s": round(report.seconds, 1),
                "weight_only": len(report.weight_only),
            }
        )
        summary = {}
        for name in TASK_NAMES:
            decisions = [router.route(setup.render(p)) for p in heldout(name)]
            top1 = sum(d.candidates[0].adapter == name for d in decisions) / len(decisions)
            summary[name] = round(top1, 4)
            emit(
                {
                    "part": "weights",
                    "task": name,
                    "top1": round(top1, 4),
                    "chance": round(1 / len(TASK_NAMES), 4),
                    "route_ms": round(1000 * statistics.median(d.seconds for d in decisions), 1),
                }
            )
    return summary


# -- versions ------------------------------------------------------------------------------------


class _Separate(Variants):
    """No adapter is a version of another: every copy its own candidate (before versions)."""

    def of(self, routable: Any, refused: Any = None) -> dict[str, str]:
        return {}


def versions(setup: Setup) -> dict[str, float]:
    from server import cli

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for name in TASK_NAMES:
            plain = shutil.ignore_patterns("examples.jsonl")
            shutil.copytree(ADAPTERS / name, root / name, ignore=plain)
            shutil.copytree(ADAPTERS / f"{name}-compeft-10", root / f"{name}-c10", ignore=plain)
            exported = [
                "export",
                "--to",
                "peft-lora",
                str(root / f"{name}-c10"),
                str(root / f"{name}-c10-peft"),
            ]
            assert cli.main(exported) == 0
        summary = {}
        for mode in ("as served", "separate"):
            router = setup.router(("*",), root=root)
            if mode == "separate":
                router._variants = _Separate()
            report = router.reconcile()
            right = fallbacks = total = 0
            route_s = []
            for name in TASK_NAMES:
                ours = {name, f"{name}-c10", f"{name}-c10-peft"}
                for prompt in heldout(name):
                    decision = router.route(setup.render(prompt))
                    right += not decision.fallback and decision.candidates[0].adapter in ours
                    fallbacks += decision.fallback
                    total += 1
                    route_s.append(decision.seconds)
            row = {
                "part": "versions",
                "mode": mode,
                "candidates": len(report.weight_only),
                "to_their_task": round(right / total, 4),
                "fallbacks": round(fallbacks / total, 4),
                "prompts": total,
                "route_ms": round(1000 * statistics.median(route_s), 1),
            }
            emit(row)
            summary[mode] = row["to_their_task"]
    return summary


# -- cost ----------------------------------------------------------------------------------------


def cost(setup: Setup) -> dict[str, float]:
    router = setup.router(TASK_NAMES)
    router.reconcile()
    model = setup.model
    arch = model.arch
    prompts = [setup.render(p) for name in TASK_NAMES for p in heldout(name)]
    kv = KVCache(arch.num_layers, 1, arch.num_kv_heads, arch.head_dim, 512, model.dtype, torch.device("cpu"))

    def prefill(ids: Sequence[int]) -> None:
        model(StepBatch.build([], [(0, 0, list(ids), True)], torch.device("cpu")), kv)

    def timed(call: Callable[[Sequence[int]], Any]) -> list[float]:
        seconds = []
        for ids in prompts:
            started = time.perf_counter()
            call(ids)
            seconds.append(time.perf_counter() - started)
        return seconds

    for ids in prompts[:5]:  # warm up both paths
        router.route(ids)
        prefill(ids)
    route_s, prefill_s = timed(router.route), timed(prefill)
    # As served: routing runs on the preparation thread, on one intra-op thread (server.grpc_service).
    with ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(1)) as one_thread:
        one_thread.submit(timed, router.route).result()  # warm-up
        served_s = one_thread.submit(timed, router.route).result()
    summary = {
        "prompts": len(prompts),
        "median_tokens": statistics.median(len(p) for p in prompts),
        "prefill_ms_median": round(1000 * statistics.median(prefill_s), 2),
        "route_ms_median": round(1000 * statistics.median(route_s), 2),
        "route_over_prefill": round(sum(route_s) / sum(prefill_s), 4),
        "route_1thread_ms_median": round(1000 * statistics.median(served_s), 2),
        "route_1thread_over_prefill": round(sum(served_s) / sum(prefill_s), 4),
    }
    emit({"part": "cost", **summary})
    return summary


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown parts {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        return 2
    setup = Setup()
    emit({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()})
    picks: dict[str, list[str]] | None = None
    if "sweep" in parts:
        sweep(setup)
    if "accuracy" in parts or "metric" in parts:
        picks = accuracy(setup)["picks"]
    if "metric" in parts:
        assert picks is not None
        setup.engine.start()
        try:
            metric(setup, picks)
        finally:
            setup.engine.shutdown()
    if "growth" in parts:
        growth(setup, args.max_adapters)
    if "weights" in parts:
        weights(setup)
    if "versions" in parts:
        versions(setup)
    if "cost" in parts:
        cost(setup)
    return 0
