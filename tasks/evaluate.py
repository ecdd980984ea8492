"""`loramux eval`: run a task's held-out set against a running server and print its metric.

Each held-out prompt goes to the server as one chat request whose user message is the prompt
alone, greedy (temperature 0), with the task's `max_tokens`, a bounded number in flight; the
answers are scored with the task's own metric (`Task.score`), so the number measures what the
server serves. Two transports: the gRPC API (`--target`) or the OpenAI HTTP API (`--http`, plain
urllib: the base model is the id `/v1/models` lists without a parent). `--compare-base` runs
the base model too and prints both rows. `--against NAME` also runs adapter NAME and compares the
two prompt by prompt (`paired`): on how many prompts each scores higher, and the score ratio and
difference with 95% paired-bootstrap intervals, which say whether a gap (a compressed adapter against
its source, say) is larger than the set's size can tell. `evaluate` scores any examples the same
way (tasks.compeft_alpha passes generated validation rows).

This module knows the server only through its APIs; argparse lives in server/cli.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tasks import Example, Task, get_task, write_jsonl


class EvalError(Exception):
    """A request the server refused or could not answer; the message says which and why."""


class HttpStatusError(EvalError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Completions(Protocol):
    def complete(self, prompt: str, adapter: str, max_tokens: int) -> str:
        """The greedy answer to one user message; adapter "" = the base model."""
        ...


@dataclass(frozen=True)
class Answer:
    prompt: str
    answer: str
    score: float


@dataclass(frozen=True)
class EvalResult:
    task: str
    model: str  # "base" or the adapter's name
    metric: str
    score: float  # the mean of the answers' scores
    seconds: float
    answers: tuple[Answer, ...]

    def row(self) -> dict[str, object]:
        return {
            "task": self.task,
            "model": self.model,
            "metric": self.metric,
            "score": round(self.score, 4),
            "n": len(self.answers),
            "seconds": round(self.seconds, 2),
        }


def evaluate(
    task: Task,
    client: Completions,
    adapter: str,
    *,
    examples: Sequence[Example] | None = None,
    limit: int | None = None,
    concurrency: int = 8,
) -> EvalResult:
    """Send `examples` (default: the task's held-out set; the first `limit`) through `client` and
    score the answers with the task's metric."""
    examples = list(task.heldout() if examples is None else examples)[:limit]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(client.complete, e.prompt, adapter, task.max_tokens) for e in examples]
        try:
            texts = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    seconds = time.monotonic() - start
    answers = tuple(
        Answer(e.prompt, text, task.score(text, e)) for e, text in zip(examples, texts, strict=True)
    )
    score = sum(a.score for a in answers) / len(answers) if answers else 0.0
    return EvalResult(task.name, adapter or "base", task.metric, score, seconds, answers)


@dataclass(frozen=True)
class Paired:
    """`result` against `against`, the same prompts in the same order, prompt by prompt."""

    against: str
    higher: int  # prompts on which result scored higher than against
    lower: int
    same: int
    ratio: float | None  # result's mean score / against's (None: against scored 0)
    ratio_ci95: tuple[float, float] | None  # upper bound inf: unbounded; None: no ratio at all
    difference: float  # result's mean score - against's
    difference_ci95: tuple[float, float]

    def fields(self) -> dict[str, object]:
        def rounded(pair: tuple[float, float] | None) -> list[float | None] | None:
            """JSON has no infinity: an unbounded end is null."""
            if pair is None:
                return None
            return [round(v, 4) if math.isfinite(v) else None for v in pair]

        return {
            "against": self.against,
            "higher": self.higher,
            "lower": self.lower,
            "same": self.same,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "ratio_ci95": rounded(self.ratio_ci95),
            "difference": round(self.difference, 4),
            "difference_ci95": rounded(self.difference_ci95),
        }


BOOTSTRAP_RESAMPLES = 10_000


def paired(
    result: EvalResult, against: EvalResult, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Paired:
    """Compare two results on the same prompts: counts of higher / lower / same, and the ratio and
    difference of mean scores with percentile intervals from `resamples` paired bootstrap resamples
    (prompts drawn with replacement, both models' scores of a prompt kept together)."""
    if [a.prompt for a in result.answers] != [a.prompt for a in against.answers]:
        raise ValueError("paired comparison needs the same prompts in the same order")
    if not result.answers:
        raise ValueError("paired comparison needs at least one prompt")
    mine = [a.score for a in result.answers]
    theirs = [a.score for a in against.answers]
    n = len(mine)
    rng = random.Random(seed)
    ratios: list[float] = []
    differences: list[float] = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        total_mine, total_theirs = sum(mine[i] for i in picks), sum(theirs[i] for i in picks)
        differences.append((total_mine - total_theirs) / n)
        if total_theirs > 0:
            ratios.append(total_mine / total_theirs)
        elif total_mine > 0:  # the other scored nothing in this resample: an unbounded ratio
            ratios.append(math.inf)
        # both 0: no ratio; such a resample says nothing of it and is left out
    ratio_ci = _interval(ratios) if sum(theirs) > 0 and ratios else None
    return Paired(
        against=against.model,
        higher=sum(m > t for m, t in zip(mine, theirs, strict=True)),
        lower=sum(m < t for m, t in zip(mine, theirs, strict=True)),
        same=sum(m == t for m, t in zip(mine, theirs, strict=True)),
        ratio=sum(mine) / sum(theirs) if sum(theirs) > 0 else None,
        ratio_ci95=ratio_ci,
        difference=(sum(mine) - sum(theirs)) / n,
        difference_ci95=_interval(differences),
    )


def _interval(values: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles (nearest rank)."""
    ordered = sorted(values)
    last = len(ordered) - 1
    return ordered[round(0.025 * last)], ordered[round(0.975 * last)]


def describe_paired(model: str, comparison: Paired, n: int) -> str:
    """One line for the table output."""
    ratio = "undefined (it scored 0)" if comparison.ratio is None else f"{comparison.ratio:.3f}"
    if comparison.ratio_ci95 is not None:
        low, high = comparison.ratio_ci95
        upper = f"{high:.3f}" if math.isfinite(high) else "unbounded"
        ratio += f" (95% paired bootstrap {low:.3f}-{upper})"
    low, high = comparison.difference_ci95
    return (
        f"{model} vs {comparison.against} on {n} prompts: higher on {comparison.higher}, lower on "
        f"{comparison.lower}, same on {comparison.same}; score ratio {ratio}; difference "
        f"{comparison.difference:+.4f} ({low:+.4f} to {high:+.4f})"
    )


# -- transports ----------------------------------------------------------------------------


class GrpcCompletions:
    """Generate calls on one channel (thread-safe) to a loramux gRPC server."""

    def __init__(self, target: str, api_key: str | None, timeout: float) -> None:
        import grpc

        from loramux.v1 import inference_pb2_grpc as pb_grpc
        from server.auth import bearer_metadata

        self.target, self.timeout = target, timeout
        self.metadata = bearer_metadata(api_key)
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def complete(self, prompt: str, adapter: str, max_tokens: int) -> str:
        import grpc

        from loramux.v1 import inference_pb2 as pb

        request = pb.GenerateRequest(adapter=adapter, max_tokens=max_tokens, temperature=0.0)
        request.messages.add(role="user", content=prompt)
        try:
            response = self.stub.Generate(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:
                raise EvalError(
                    f"the server at {self.target} cannot serve adapter {adapter!r}: {details}"
                ) from None
            raise EvalError(f"{self.target}: {code.name}: {details}") from None
        return str(response.text)

    def close(self) -> None:
        self.channel.close()


class HttpCompletions:
    """POST /v1/chat/completions to an OpenAI-compatible server (urllib: no extra dependency)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url, self.api_key, self.timeout = url.rstrip("/").removesuffix("/v1"), api_key, timeout
        self.base_model = self._base_model()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            raise HttpStatusError(
                err.code, f"{self.url}{path}: HTTP {err.code}: {_error_message(err)}"
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise EvalError(f"cannot reach {self.url}: {getattr(err, 'reason', err)}") from None

    def _base_model(self) -> str:
        cards = self._call("GET", "/v1/models").get("data", [])
        for card in cards:
            if not card.get("parent"):
                return str(card["id"])
        raise EvalError(f"{self.url}/v1/models lists no base model")

    def complete(self, prompt: str, adapter: str, max_tokens: int) -> str:
        body = {
            "model": adapter or self.base_model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        try:
            answer = self._call("POST", "/v1/chat/completions", body)
        except HttpStatusError as err:
            if err.status == 404:
                raise EvalError(f"the server at {self.url} cannot serve adapter {adapter!r}: {err}") from None
            raise
        return str(answer["choices"][0]["message"]["content"] or "")

    def close(self) -> None:
        pass


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read(4096))["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(err.reason)


# -- the command ---------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    """Evaluate (base and) adapter on the task's held-out (or validation) set; 0 done, 1 a request failed."""
    task = get_task(args.task)
    examples = {"validation": task.validation, "confirm": task.confirm}.get(args.split, task.heldout)()
    if not examples:
        print(f"error: the {args.task} task has no {args.split} set", file=sys.stderr)
        return 2
    if args.against and not args.adapter:
        print("error: --against compares with --adapter: name the adapter too", file=sys.stderr)
        return 2
    models = (
        ([""] if args.compare_base or not args.adapter else [])
        + ([args.against] if args.against else [])
        + ([args.adapter] if args.adapter else [])
    )
    results: list[EvalResult] = []
    try:
        client: GrpcCompletions | HttpCompletions = (
            HttpCompletions(args.http, args.api_key, args.timeout)
            if args.http
            else GrpcCompletions(args.target, args.api_key, args.timeout)
        )
        try:
            for adapter in models:
                results.append(
                    evaluate(
                        task,
                        client,
                        adapter,
                        examples=examples,
                        limit=args.limit,
                        concurrency=args.concurrency,
                    )
                )
        finally:
            client.close()
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.answers:
        write_jsonl(
            args.answers,
            (
                {"model": r.model, "prompt": a.prompt, "answer": a.answer, "score": a.score}
                for r in results
                for a in r.answers
            ),
        )
    rows = [result.row() for result in results]
    comparison = paired(results[-1], results[-2]) if args.against else None
    if comparison is not None:
        rows[-1] |= comparison.fields()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        if comparison is not None:
            print(describe_paired(results[-1].model, comparison, len(results[-1].answers)))
    return 0


def format_table(rows: list[dict[str, object]]) -> str:
    columns = ("task", "model", "metric", "score", "n", "seconds")
    cells = [list(columns)] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )
