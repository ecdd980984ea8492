"""Structured output: which grammar library, and what constraints cost the engine.

Two parts (`--part`, default both):

- `libraries`: xgrammar against llguidance on the default model's real vocabulary (SmolLM2,
  49,152 tokens): the tokenizer's set-up, the compile time of a few JSON schemas, `json_object`, a
  regex and a choice, the time to compute one row's token mask at each step of a valid answer
  (the per-step cost that matters: it is paid for every constrained row of every step), a batch
  of 8 rows' masks, and the resident memory each library adds. Each library runs in its own
  process so that their memory does not mix; a library that is not installed is skipped
  (loramux depends on the one it chose, xgrammar; `pip install llguidance==1.9.1` to compare).
- `throughput`: the engine on SmolLM2 (the default model, embedded: nothing downloads), batch 32
  at the API's default temperature 1.0, all 32 requests free against 8 schema-constrained ones
  among 24 free ones; the two sides alternate, `--repeats` times each, in one process, and the
  median of each is kept. The bar is >= 0.8x. It also reports the grammar's own time per step
  (the engine's `GrammarMasks` timers: filling, applying, advancing).

Flags belong to this module (`add_arguments`, `main`); `loramux bench grammar` runs it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import time
from typing import Any

# -- what both parts constrain -----------------------------------------------------------------

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["name", "age", "color", "tags"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 10},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "quantity"],
                },
                "minItems": 1,
                "maxItems": 4,
            },
            "paid": {"type": "boolean"},
        },
        "required": ["id", "items", "paid"],
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
            "attendees": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["title", "day", "attendees", "priority"],
    },
}

# A valid answer per case: the path along which the per-step mask cost is measured.
ANSWERS: dict[str, str] = {
    "person": '{"name": "Ann Smith", "age": 31, "color": "red", "tags": ["alpha", "beta"]}',
    "order": '{"id": "ABC-1234", "items": [{"sku": "pen-01", "quantity": 3}, '
    '{"sku": "ink", "quantity": 12}], "paid": true}',
    "event": '{"title": "Weekly planning of the adapters team", "day": "wed", '
    '"attendees": ["ann", "bob", "carla"], "priority": 2}',
    "json_object": '{"answer": "forty-two", "confidence": 0.93, "sources": ["a", "b"], "ok": true}',
    "regex": "2026-12-03 alice@example.com",
    "choice": "positive",
}
REGEX = r"\d{4}-\d{2}-\d{2} [a-z]{1,12}@[a-z]{1,12}\.(com|org|net)"
CHOICES = ["positive", "negative", "neutral"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=["libraries", "throughput", "all"], default="all")
    parser.add_argument("--batch", type=int, default=32, help="throughput: requests per side (default 32)")
    parser.add_argument("--constrained", type=int, default=8, help="throughput: schema-constrained requests")
    parser.add_argument("--max-tokens", type=int, default=48, help="throughput: tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="throughput: runs per side, interleaved")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {}
    if args.part in ("libraries", "all"):
        results["libraries"] = compare_libraries()
    if args.part in ("throughput", "all"):
        results["throughput"] = throughput(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0


# -- libraries ---------------------------------------------------------------------------------


def compare_libraries() -> dict[str, Any]:
    """Each library's figures, measured in a fresh process each."""
    spawn = multiprocessing.get_context("spawn")
    figures = {}
    for library in ("xgrammar", "llguidance"):
        with spawn.Pool(1) as pool:
            figures[library] = pool.apply(library_figures, (library,))
    return figures


def library_figures(library: str) -> dict[str, Any]:
    """Compile times, per-step mask times and memory of one library on SmolLM2's vocabulary."""
    try:
        backend = _XGrammar() if library == "xgrammar" else _LLGuidance()
    except ImportError as exc:
        return {"skipped": f"not installed ({exc})"}
    import torch

    tokenizer = _smollm2_tokenizer()
    vocab_size = len(tokenizer)
    rss_before = _rss_mib()
    start = time.perf_counter()
    backend.setup(tokenizer, vocab_size)
    setup_s = time.perf_counter() - start
    cases = {name: ("json_schema", json.dumps(schema)) for name, schema in SCHEMAS.items()}
    cases |= {"json_object": ("json_object", ""), "regex": ("regex", REGEX), "choice": ("choice", "")}
    compile_ms: dict[str, float] = {}
    grammars = {}
    for name, (kind, spec) in cases.items():
        start = time.perf_counter()
        grammars[name] = backend.compile(kind, spec)
        compile_ms[name] = (time.perf_counter() - start) * 1e3
    bitmask = torch.full((8, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    step_us: dict[str, dict[str, float]] = {}
    for name, grammar in grammars.items():
        token_ids = tokenizer.encode(ANSWERS[name], add_special_tokens=False)
        times = []
        for _ in range(5):  # fresh matchers: the first pass pays any lazy work, later ones do not
            matcher = backend.matcher(grammar)
            for token in token_ids:
                start = time.perf_counter()
                backend.fill(matcher, bitmask, 0)
                times.append((time.perf_counter() - start) * 1e6)
                if not backend.accept(matcher, token):
                    raise RuntimeError(f"{library} refused token {token} of the valid answer to {name}")
        first = times[: len(token_ids)]
        later = times[len(token_ids) :]
        step_us[name] = {
            "first_pass_mean": statistics.mean(first),
            "mean": statistics.mean(later),
            "p50": statistics.median(later),
            "max": max(later),
        }
    batch_us = _batch_fill(backend, grammars, tokenizer, bitmask)
    return {
        "setup_s": setup_s,
        "compile_ms": compile_ms,
        "mask_us_per_row_step": step_us,
        "mask_us_batch8_step": batch_us,
        "rss_added_mib": _rss_mib() - rss_before,
    }


def _batch_fill(backend: Any, grammars: dict[str, Any], tokenizer: Any, bitmask: Any) -> float:
    """Mean time of one step's masks for 8 rows (the person/order/event schemas, mixed), in us."""
    names = ["person", "order", "event", "json_object"] * 2
    paths = [tokenizer.encode(ANSWERS[n], add_special_tokens=False) for n in names]
    steps = min(len(p) for p in paths)
    times = []
    for _ in range(5):
        matchers = [backend.matcher(grammars[n]) for n in names]
        for step in range(steps):
            start = time.perf_counter()
            backend.fill_batch(matchers, bitmask)
            times.append((time.perf_counter() - start) * 1e6)
            for matcher, path in zip(matchers, paths, strict=True):
                backend.accept(matcher, path[step])
    return statistics.mean(times[steps:])


class _XGrammar:
    def __init__(self) -> None:
        import xgrammar

        self.xgr = xgrammar

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        xgr = self.xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, kind: str, spec: str) -> Any:
        if kind == "json_schema":
            return self.compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in CHOICES))

    def matcher(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class _LLGuidance:
    # The same output shape as xgrammar's any_whitespace=False: one line, ", " and ": ".
    JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def __init__(self) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = self.llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.executor = self.llg.LLExecutor(num_threads=2)

    def compile(self, kind: str, spec: str) -> Any:
        matcher_cls = self.llg.LLMatcher
        if kind == "json_schema":
            grammar = matcher_cls.grammar_from_json_schema(spec, overrides=self.JSON_OPTIONS)  # type: ignore[arg-type]
        elif kind == "json_object":
            grammar = matcher_cls.grammar_from_json_schema('{"type": "object"}', overrides=self.JSON_OPTIONS)  # type: ignore[arg-type]
        elif kind == "regex":
            grammar = matcher_cls.grammar_from_regex(spec)
        else:
            grammar = self.llg.grammar_from("choice", json.dumps(CHOICES))
        error = matcher_cls.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        # llguidance builds its lexer when a matcher is made: that is its compile step
        matcher_cls(self.tokenizer, grammar)
        return grammar

    def matcher(self, grammar: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        pairs = [(m, i) for i, m in enumerate(matchers)]
        self.llg.torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from server.model.loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(None)[1])


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


# -- throughput --------------------------------------------------------------------------------


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Batch `args.batch` at T=1.0: all free against `args.constrained` schema-constrained, interleaved."""
    import torch

    from server.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams, StructuredOutput
    from server.model.loader import load_model
    from server.preparation import RequestInput, RequestPreparer
    from server.prompts import PromptInput

    config = EngineConfig(
        max_running=args.batch, max_queue=4 * args.batch, max_model_len=512, max_batched_tokens=512
    )
    engine = Engine(load_model(None, torch.device("cpu"), torch.float32, config.max_model_len), config)
    engine.start()
    preparer = RequestPreparer.for_engine(engine)
    schemas = [json.dumps(long_schema(s)) for s in SCHEMAS.values()]
    free = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True)

    def requests(constrained: int) -> list[Any]:
        prepared = []
        for i in range(args.batch):
            params = free
            prompt = f"Write record number {i} of the catalogue as JSON."  # the same on both sides
            if i < constrained:
                spec = StructuredOutput("json_schema", schemas[i % len(schemas)])
                params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, structured=spec)
            prepared.append(preparer.prepare(RequestInput(PromptInput(text=prompt), params, f"r{i}")))
        return prepared

    try:
        sides: dict[str, list[float]] = {"free": [], "constrained": []}
        grammar_ms: list[dict[str, float]] = []
        tokens_per_run: dict[str, list[int]] = {"free": [], "constrained": []}
        run_batch(engine, requests(0))  # warm-up (and the tokenizer info of the first compile)
        run_batch(engine, requests(args.constrained))
        for _ in range(args.repeats):
            sides["free"].append(run_batch(engine, requests(0), tokens_per_run["free"]))
            masks = engine.runner.grammar
            masks.timers.clear()
            constrained = requests(args.constrained)
            sides["constrained"].append(run_batch(engine, constrained, tokens_per_run["constrained"]))
            grammar_ms.append(masks.timers.per_step_ms())
    finally:
        engine.shutdown()
    free_tps = statistics.median(sides["free"])
    constrained_tps = statistics.median(sides["constrained"])
    return {
        "batch": args.batch,
        "constrained": args.constrained,
        "max_tokens": args.max_tokens,
        "tokens_per_s": {"free": free_tps, "constrained": constrained_tps},
        "tokens_per_run": tokens_per_run,
        "runs": sides,
        "ratio": constrained_tps / free_tps,
        "grammar_ms_per_step": {key: statistics.median(m[key] for m in grammar_ms) for key in grammar_ms[0]},
    }


def long_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with a required list of at least 16 notes: no answer ends before max_tokens, so both
    sides generate the same number of tokens in full batches."""
    notes = {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 40}, "minItems": 16}
    return {
        **schema,
        "properties": {**schema["properties"], "notes": notes},
        "required": [*schema["required"], "notes"],
    }


def run_batch(engine: Any, requests: list[Any], tokens_out: list[int] | None = None) -> float:
    """Submit every request at once and wait: generated tokens per second."""
    import threading

    done = threading.Event()
    left = [len(requests)]
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def sink(out: Any) -> None:  # on the engine thread: a raise here would only abort that request
        with lock:
            tokens[0] += len(out.token_ids)
            if out.finished:
                left[0] -= 1
                if out.error:
                    errors.append(out.error)
                if not left[0]:
                    done.set()

    start = time.perf_counter()
    for request in requests:
        engine.submit(request, sink)
    done.wait()
    if errors:  # a failed request finishes early: its time would flatter the figure
        raise RuntimeError(f"{len(errors)} of {len(requests)} bench requests failed, first: {errors[0]}")
    if tokens_out is not None:
        tokens_out.append(tokens[0])
    return tokens[0] / (time.perf_counter() - start)


def _print(results: dict[str, Any]) -> None:
    for library, figures in results.get("libraries", {}).items():
        print(f"== {library}")
        if "skipped" in figures:
            print(f"  skipped: {figures['skipped']}")
            continue
        print(
            f"  tokenizer set-up {figures['setup_s']:.2f} s, memory added {figures['rss_added_mib']:.0f} MiB"
        )
        for name, ms in figures["compile_ms"].items():
            step = figures["mask_us_per_row_step"][name]
            print(
                f"  {name:12s} compile {ms:8.2f} ms | mask per row-step: mean {step['mean']:7.1f} us "
                f"p50 {step['p50']:6.1f} max {step['max']:7.1f} (first pass {step['first_pass_mean']:7.1f})"
            )
        print(f"  8 rows' masks per step: {figures['mask_us_batch8_step']:.1f} us")
    if "throughput" in results:
        t = results["throughput"]
        tps = t["tokens_per_s"]
        print(
            f"== throughput, batch {t['batch']} ({t['constrained']} constrained), {t['max_tokens']} tokens: "
            f"free {tps['free']:.1f} tok/s, constrained {tps['constrained']:.1f} tok/s, ratio {t['ratio']:.3f}"
        )
        print(
            "  grammar per step (ms): "
            + ", ".join(f"{k} {v:.3f}" for k, v in t["grammar_ms_per_step"].items())
        )
