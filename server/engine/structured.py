"""Structured output: constraints compiled against the model's vocabulary, and each step's token masks.

`GrammarCompiler` (the preparation thread) turns a request's `StructuredOutput` into a `Grammar`:
json_object, json_schema, regex, choice or an EBNF grammar compiled by xgrammar against the
tokenizer's vocabulary, cached (bounded LRU) by the constraint itself, so a schema that many
requests share compiles once. A constraint the library cannot compile is the client's mistake:
InvalidRequest, saying what is wrong with it.

`GrammarMasks` (the engine thread) runs the constrained rows of a step: `begin` gives each one
its sequence's matcher and fills their token masks in a worker thread while the forward runs (a
matcher's state is known before the forward), `StepMasks.apply` sets the logits a row's grammar
does not allow to -inf (after penalties, before the sampler), and `StepMasks.advance` moves each
matcher past the token sampled for it. End-of-sequence tokens are allowed only where the grammar
accepts the text so far, and once the grammar is complete they are the only tokens allowed, so a
constrained answer ends with "stop" (or "length" when max_tokens comes first). A step without a
constrained row does none of this.

Why xgrammar: on SmolLM2's vocabulary its per-step masks take a few microseconds per row against
tens for llguidance (bench/grammar_bench.py, `libraries`; the figures are in bench/RESULTS.md).
JSON is generated on one line with ", " and ": " between items (xgrammar's any_whitespace=False):
with any whitespace allowed a weak or random model can emit whitespace for ever. Objects are
strict (no properties the schema does not name), as in OpenAI's strict mode. Rows past a grammar
that ended (ignore_eos) generate freely, as vLLM does.

It knows nothing about HTTP or gRPC, the scheduler, or how tokens are sampled.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from server.engine.request import STRUCTURED_KINDS, InvalidRequest, StructuredOutput

if TYPE_CHECKING:
    from server.engine.sequence import Sequence as EngineSequence

# Bounds on what one request may make the preparation thread compile (measured on SmolLM2's
# vocabulary, 2 cores: a flat 64 kB schema ~1.5 s; nesting costs superlinearly, 100 levels 0.3 s
# but 500 levels 19 s).
MAX_SPEC_CHARS = 64_000  # a schema, pattern, choice list or grammar
MAX_SCHEMA_DEPTH = 64  # objects and arrays nested in a JSON schema
MAX_CHOICES = 1024
MAX_CACHED_GRAMMARS = 256
_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar's C++ errors start with "[12:34:56] /path/to/file.cc:123: "
_ERROR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")
_WHAT = {
    "json_object": "JSON object",
    "json_schema": "JSON schema",
    "regex": "regular expression",
    "choice": "choice list",
    "grammar": "grammar",
}


@dataclass(frozen=True, eq=False)
class Grammar:
    """A constraint compiled against one tokenizer's vocabulary; `matcher()` starts one answer."""

    structured: StructuredOutput
    compiled: Any  # xgrammar.CompiledGrammar
    mask_vocab_size: int  # bits in a token mask: max(model logits, tokenizer vocabulary)

    def matcher(self) -> Any:
        import xgrammar

        return xgrammar.GrammarMatcher(self.compiled)


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one model's tokenizer; thread-safe, the library loads on first use.

    vocab_size is the width of the model's logits, which may exceed the tokenizer's vocabulary
    (padding): the extra ids are never allowed. stop_token_ids are the ids that end a generation.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: frozenset[int],
        max_cached: int = MAX_CACHED_GRAMMARS,
    ) -> None:
        self.tokenizer = tokenizer
        self.mask_vocab_size = max(vocab_size, len(tokenizer))
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[StructuredOutput, Grammar] = OrderedDict()

    def compile(self, structured: StructuredOutput) -> Grammar:
        """The compiled `structured`; raises InvalidRequest when it cannot be compiled."""
        with self._lock:
            grammar = self._cache.get(structured)
            if grammar is not None:
                self._cache.move_to_end(structured)
                return grammar
        grammar = Grammar(structured, self._compile(structured), self.mask_vocab_size)
        with self._lock:
            self._cache[structured] = grammar
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return grammar

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def _compile(self, structured: StructuredOutput) -> Any:
        kind, spec = structured.kind, structured.spec
        if kind not in STRUCTURED_KINDS:
            raise InvalidRequest(
                f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}; got {kind!r}"
            )
        what = _WHAT[kind]
        if len(spec) > MAX_SPEC_CHARS:
            raise InvalidRequest(f"the {what} is {len(spec)} characters long; at most {MAX_SPEC_CHARS}")
        if kind != "json_object" and not spec.strip():
            raise InvalidRequest(f"the {what} of the structured output is empty")
        compiler = self._library()
        try:
            if kind == "json_object":
                return _compile_json(compiler, _OBJECT_SCHEMA)
            if kind == "json_schema":
                _check_schema(spec)
                return _compile_json(compiler, spec)
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "choice":
                return compiler.compile_grammar(_choice_grammar(spec))
            return compiler.compile_grammar(spec)
        except InvalidRequest:
            raise
        except Exception as exc:  # the library's word on a constraint it cannot compile
            raise InvalidRequest(f"the {what} is invalid: {_library_message(exc)}") from None

    def _library(self) -> Any:
        """xgrammar's compiler for this vocabulary (~0.3 s to index the vocabulary, once)."""
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.mask_vocab_size, stop_token_ids=self.stop_token_ids
                )
                threads = max(1, min(4, os.cpu_count() or 1))
                # Our own LRU caches by the request's constraint; the library's cache would hold a second copy.
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
            return self._compiler


# xgrammar 0.2.9 writes a string with minLength or maxLength as EBNF `[^"\\\r\n]{m,n}`, which lets
# raw control characters into it (invalid JSON: they must be escaped): JSON's own rule for a
# string character excludes U+0000-U+001F. Found by tests/test_structured.py; llguidance gets it right.
_LOOSE_STRING_CHARACTER = r"[^\"\\\r\n]"
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\]"


def _compile_json(compiler: Any, schema: str) -> Any:
    """A JSON schema compiled on one line (", " and ": "), strings without raw control characters."""
    import xgrammar

    grammar = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False))
    return compiler.compile_grammar(grammar.replace(_LOOSE_STRING_CHARACTER, _JSON_STRING_CHARACTER))


def _check_schema(spec: str) -> None:
    try:
        schema = json.loads(spec)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequest(f"the JSON schema must be a JSON object, got {type(schema).__name__}")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(
            f"the JSON schema nests objects and arrays deeper than {MAX_SCHEMA_DEPTH} levels"
        )


def _depth(value: Any) -> int:
    """How deep JSON objects and arrays nest in `value` (without recursion: the input is the client's)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_SCHEMA_DEPTH:  # deeper than the limit is refused anyway: stop looking
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _choice_grammar(spec: str) -> str:
    """EBNF for "exactly one of these strings" (spec: a JSON list of strings)."""
    try:
        choices = json.loads(spec)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the choice list is not valid JSON: {exc}") from None
    if not isinstance(choices, list) or not choices:
        raise InvalidRequest("the choice list must be a non-empty list of strings")
    if len(choices) > MAX_CHOICES:
        raise InvalidRequest(f"the choice list holds {len(choices)} strings; at most {MAX_CHOICES}")
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise InvalidRequest(f"choice {index} must be a non-empty string, got {json.dumps(choice)[:64]}")
    # JSON string literals are EBNF string literals (same escapes); non-ASCII stays as UTF-8
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))


def _library_message(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    message = _ERROR_PREFIX.sub("", lines[0] if lines else "") or type(exc).__name__
    return message[:500]


# -- the engine's side -------------------------------------------------------------------------


@dataclass
class GrammarTimers:
    """Where the grammar's time goes, summed over steps with a constrained row (engine thread)."""

    steps: int = 0
    rows: int = 0
    fill_s: float = 0.0  # computing masks (in the worker, beside the forward)
    wait_s: float = 0.0  # the engine thread waiting for those masks after the forward
    apply_s: float = 0.0  # masking the logits
    advance_s: float = 0.0  # moving the matchers past the sampled tokens

    def clear(self) -> None:
        self.steps = self.rows = 0
        self.fill_s = self.wait_s = self.apply_s = self.advance_s = 0.0

    def per_step_ms(self) -> dict[str, float]:
        """Mean milliseconds per constrained step; `critical` is what the step itself waited."""
        n = max(self.steps, 1)
        critical = self.wait_s + self.apply_s + self.advance_s
        return {
            "fill": 1e3 * self.fill_s / n,
            "wait": 1e3 * self.wait_s / n,
            "apply": 1e3 * self.apply_s / n,
            "advance": 1e3 * self.advance_s / n,
            "critical": 1e3 * critical / n,
            "rows": self.rows / n,
        }


@dataclass
class StepMasks:
    """One step's constrained rows (indices into the step's sampled rows) and their matchers."""

    rows: list[int]
    matchers: list[Any]
    bitmask: torch.Tensor  # [num sampled, ceil(mask_vocab / 32)] int32; only `rows` are filled
    mask_vocab_size: int
    timers: GrammarTimers
    filled: Future[float] | None = None  # the worker's fill; its result is the time it took
    failure: str | None = None  # why the masks could not be made or applied: the constrained rows fail
    _waited: bool = field(default=False, repr=False)

    def wait(self) -> None:
        """Block until the masks are filled (the worker's time goes to `fill`, ours to `wait`)."""
        if self._waited:
            return
        self._waited = True
        if self.filled is not None:
            start = time.perf_counter()
            try:
                self.timers.fill_s += self.filled.result()
            except Exception as exc:  # these rows fail, not the step
                self.failure = f"structured output failed: {exc!r}"
            self.timers.wait_s += time.perf_counter() - start

    def apply(self, logits: torch.Tensor) -> None:  # [num sampled, vocab] in place
        """-inf wherever a constrained row's grammar does not allow the token. Never raises: a
        failure fails the constrained rows (in `advance`)."""
        import xgrammar

        self.wait()
        if self.failure is not None:
            return
        start = time.perf_counter()
        try:
            bitmask = self.bitmask
            if logits.device != bitmask.device:
                bitmask = bitmask.to(logits.device, non_blocking=True)
            vocab_size = min(logits.shape[-1], self.mask_vocab_size)
            xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=self.rows)
        except Exception as exc:
            self.failure = f"structured output failed: {exc!r}"
        self.timers.apply_s += time.perf_counter() - start

    def advance(self, tokens: Sequence[int], errors: dict[int, str]) -> dict[int, str]:
        """Move each matcher past its row's sampled token (-1: the row failed); `errors` plus any row
        whose token its grammar refused (only possible if the mask was not applied)."""
        if self.failure is not None:
            return {**errors, **{row: self.failure for row in self.rows}}
        start = time.perf_counter()
        refused: dict[int, str] = {}
        for row, matcher in zip(self.rows, self.matchers, strict=True):
            token = tokens[row]
            if token >= 0 and row not in errors and not matcher.accept_token(token):
                refused[row] = f"token {token} does not fit the request's structured output"
        self.timers.advance_s += time.perf_counter() - start
        return {**errors, **refused} if refused else errors


class GrammarMasks:
    """Makes each step's `StepMasks` (engine thread only). `overlap=False` fills on the engine thread."""

    def __init__(self, overlap: bool = True) -> None:
        self.overlap = overlap
        self.timers = GrammarTimers()
        self._bitmask = torch.empty(0, 0, dtype=torch.int32)
        self._worker: ThreadPoolExecutor | None = None  # made for the first constrained step

    def begin(self, sampled: Sequence[EngineSequence]) -> StepMasks | None:
        """The constrained rows of a step, their masks filling; None when no row is constrained."""
        rows: list[int] = []
        matchers: list[Any] = []
        mask_vocab_size = 0
        for row, seq in enumerate(sampled):
            grammar = seq.request.grammar
            if grammar is None:
                continue
            matcher = seq.grammar_matcher
            if matcher is None:
                matcher = seq.grammar_matcher = grammar.matcher()
            if matcher.is_terminated():  # it took an end token and runs on (ignore_eos): free text
                continue
            rows.append(row)
            matchers.append(matcher)
            mask_vocab_size = grammar.mask_vocab_size
        if not rows:
            return None
        self.timers.steps += 1
        self.timers.rows += len(rows)
        bitmask = self._buffer(len(sampled), (mask_vocab_size + 31) // 32)
        step = StepMasks(rows, matchers, bitmask, mask_vocab_size, self.timers)
        if self.overlap:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="loramux-grammar")
            step.filled = self._worker.submit(_fill, matchers, bitmask, rows)
        else:
            self.timers.fill_s += _fill(matchers, bitmask, rows)
        return step

    def _buffer(self, num_rows: int, words: int) -> torch.Tensor:
        """A [num_rows, words] int32 view of one buffer reused across steps (grown when too small)."""
        if self._bitmask.shape[0] < num_rows or self._bitmask.shape[1] != words:
            self._bitmask = torch.empty(max(num_rows, 8), words, dtype=torch.int32)
        return self._bitmask[:num_rows]


def _fill(matchers: list[Any], bitmask: torch.Tensor, rows: list[int]) -> float:
    """Fill row `rows[i]` of `bitmask` with `matchers[i]`'s next-token mask; the seconds it took.

    One row after another: on a few cores, xgrammar's batch fill spends more on its threads than
    the rows cost (bench/grammar_bench.py). No torch op runs here (no OpenMP pool for this thread)."""
    start = time.perf_counter()
    for row, matcher in zip(rows, matchers, strict=True):
        matcher.fill_next_token_bitmask(bitmask, row)
    return time.perf_counter() - start
