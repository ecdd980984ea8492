"""`loramux eval` end to end against a live in-process server over a tiny random model.

The scores of a random model mean nothing; what is checked is the plumbing: every held-out
prompt is sent (as a user message, greedy, the task's max_tokens, a bounded number in flight),
each printed score is the task's metric over the texts the server returned, --compare-base
gives two rows, gRPC and HTTP both work, and an adapter the server cannot serve is a clear error
and exit status 1. `paired` (--against) is checked against counts and intervals computed here.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from server.engine.engine import Engine
from tasks import get_task
from tasks.evaluate import Answer, EvalResult, describe_paired, evaluate, paired
from tests.conftest import start_adapter_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_http_openai import QV4, Servers


@pytest.fixture(scope="module")
def engine(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("eval-adapters")
    _save_adapter(base, root / "qv4", QV4, seed=1)
    engine_ = start_adapter_engine(base, root)
    yield engine_
    engine_.shutdown()


@pytest.fixture(scope="module")
def servers(engine: Engine) -> Iterator[Servers]:
    running = Servers(engine)
    yield running
    running.close()


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_rows(
    rows: list[dict[str, Any]], answers_file: Path, task_name: str, limit: int | None, split: str = "heldout"
) -> None:
    task = get_task(task_name)
    heldout = {"validation": task.validation, "confirm": task.confirm}.get(split, task.heldout)()[:limit]
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    for row in rows:
        mine = [a for a in answers if a["model"] == row["model"]]
        assert [a["prompt"] for a in mine] == [e.prompt for e in heldout]  # every prompt, in order
        rescored = [task.score(a["answer"], e) for a, e in zip(mine, heldout, strict=True)]
        assert [a["score"] for a in mine] == rescored
        assert row["score"] == pytest.approx(sum(rescored) / len(rescored), abs=1e-4)
        assert row["n"] == len(heldout) and row["task"] == task_name and row["metric"] == task.metric


def test_grpc_compare_base_scores_every_heldout_prompt(
    servers: Servers, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    answers = tmp_path / "answers.jsonl"
    code, out, err = _eval(
        capsys,
        "--task",
        "sentiment",
        "--adapter",
        "qv4",
        "--compare-base",
        "--target",
        servers.grpc.target,
        "--json",
        "--answers",
        str(answers),
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [row["model"] for row in rows] == ["base", "qv4"]
    _check_rows(rows, answers, "sentiment", None)


def test_http_scores_what_the_server_returns(
    servers: Servers, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    answers = tmp_path / "answers.jsonl"
    code, out, err = _eval(
        capsys,
        "--task",
        "arith",
        "--adapter",
        "qv4",
        "--http",
        servers.url,
        "--limit",
        "5",
        "--json",
        "--answers",
        str(answers),
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [row["model"] for row in rows] == ["qv4"]
    _check_rows(rows, answers, "arith", 5)


def test_split_validation_scores_the_validation_set(
    servers: Servers, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    answers = tmp_path / "answers.jsonl"
    argv = ["--task", "extract", "--adapter", "qv4", "--target", servers.grpc.target, "--split", "validation"]
    code, out, err = _eval(capsys, *argv, "--limit", "4", "--json", "--answers", str(answers))
    assert code == 0, err
    _check_rows(json.loads(out), answers, "extract", 4, split="validation")


def test_split_confirm_scores_the_second_heldout_set_and_refuses_where_there_is_none(
    servers: Servers, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    answers = tmp_path / "answers.jsonl"
    argv = ["--task", "sql", "--adapter", "qv4", "--target", servers.grpc.target, "--split", "confirm"]
    code, out, err = _eval(capsys, *argv, "--limit", "3", "--json", "--answers", str(answers))
    assert code == 0, err
    _check_rows(json.loads(out), answers, "sql", 3, split="confirm")
    argv = ["--task", "arith", "--target", servers.grpc.target, "--split", "confirm"]
    code, out, err = _eval(capsys, *argv)
    assert code == 2 and "the arith task has no confirm set" in err


def test_table_output_names_task_model_and_metric(
    servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _eval(capsys, "--task", "shout", "--target", servers.grpc.target, "--limit", "2")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["task", "model", "metric", "score", "n", "seconds"]
    assert row.startswith("shout") and "base" in row and "uppercase share" in row


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_unknown_adapter_is_a_clear_error(
    servers: Servers, capsys: pytest.CaptureFixture[str], transport: str
) -> None:
    where = ["--target", servers.grpc.target] if transport == "grpc" else ["--http", servers.url]
    code, out, err = _eval(capsys, "--task", "arith", "--adapter", "nope", "--limit", "3", *where)
    assert code == 1 and out == ""
    assert "cannot serve adapter 'nope'" in err and err.count("\n") == 1


def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _eval(capsys, "--task", "arith", "--target", "127.0.0.1:1", "--timeout", "5")
    assert code == 1 and err.startswith("error: 127.0.0.1:1: UNAVAILABLE")


class _RecordingClient:
    """Answers every prompt with its own length after a pause; records calls and the most in flight."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    def complete(self, prompt: str, adapter: str, max_tokens: int) -> str:
        with self.lock:
            self.calls.append((prompt, adapter, max_tokens))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.01)
        with self.lock:
            self.in_flight -= 1
        return str(len(prompt))


def test_evaluate_sends_each_prompt_once_with_a_bounded_number_in_flight() -> None:
    task, client = get_task("arith"), _RecordingClient()
    result = evaluate(task, client, "calc", concurrency=3)
    assert sorted(prompt for prompt, _, _ in client.calls) == sorted(e.prompt for e in task.heldout())
    assert {(adapter, max_tokens) for _, adapter, max_tokens in client.calls} == {("calc", task.max_tokens)}
    assert 1 < client.most_in_flight <= 3
    assert [a.answer for a in result.answers] == [str(len(e.prompt)) for e in task.heldout()]
    assert result.model == "calc" and result.row()["n"] == len(task.heldout())


def _result(model: str, scores: list[float]) -> EvalResult:
    answers = tuple(Answer(f"prompt {i}", "", score) for i, score in enumerate(scores))
    return EvalResult("sql", model, "execution accuracy", sum(scores) / len(scores), 0.0, answers)


def test_paired_counts_ratio_and_difference() -> None:
    # 40 prompts: both right on 16, only the source on 6, only the compressed one on 4, neither on 14
    source = [1.0] * 16 + [1.0] * 6 + [0.0] * 4 + [0.0] * 14
    compressed = [1.0] * 16 + [0.0] * 6 + [1.0] * 4 + [0.0] * 14
    comparison = paired(_result("small", compressed), _result("lora", source))
    assert (comparison.against, comparison.higher, comparison.lower, comparison.same) == ("lora", 4, 6, 30)
    assert comparison.ratio == pytest.approx(20 / 22)
    assert comparison.difference == pytest.approx(-2 / 40)
    assert comparison.ratio_ci95 is not None
    low, high = comparison.ratio_ci95
    assert low < 20 / 22 < high
    # The difference's interval against the normal approximation over the per-prompt differences
    diffs = [c - s for c, s in zip(compressed, source, strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / len(diffs)) ** 0.5
    half = 1.96 * sd / len(diffs) ** 0.5
    d_low, d_high = comparison.difference_ci95
    assert d_low == pytest.approx(mean - half, abs=0.25 * half)
    assert d_high == pytest.approx(mean + half, abs=0.25 * half)
    # Four times the prompts with the same proportions: an interval about half as wide
    wide = paired(_result("small", compressed * 4), _result("lora", source * 4))
    assert wide.ratio == pytest.approx(comparison.ratio)
    assert wide.ratio_ci95 is not None
    ratio_width = high - low
    assert 0.4 < (wide.ratio_ci95[1] - wide.ratio_ci95[0]) / ratio_width < 0.6


def test_paired_identical_zero_and_mismatched() -> None:
    same = paired(_result("a", [1.0, 0.0, 0.5, 1.0]), _result("b", [1.0, 0.0, 0.5, 1.0]))
    assert (same.higher, same.lower, same.same, same.ratio) == (0, 0, 4, 1.0)
    assert same.ratio_ci95 == (1.0, 1.0) and same.difference_ci95 == (0.0, 0.0)
    zero = paired(_result("a", [1.0, 0.0]), _result("b", [0.0, 0.0]))
    assert zero.ratio is None and zero.ratio_ci95 is None and zero.higher == 1
    # the other right once in 30: about 36% of resamples miss that prompt, their ratio unbounded
    rare = paired(_result("a", [1.0] * 3 + [0.0] * 27), _result("b", [1.0] + [0.0] * 29))
    assert rare.ratio == 3.0 and rare.ratio_ci95 is not None and rare.ratio_ci95[1] == math.inf
    assert rare.fields()["ratio_ci95"] == [rare.ratio_ci95[0], None]
    assert "unbounded" in describe_paired("a", rare, 30)
    other = EvalResult("sql", "b", "m", 1.0, 0.0, (Answer("something else", "", 1.0),) * 2)
    with pytest.raises(ValueError, match="same prompts"):
        paired(_result("a", [1.0, 0.0]), other)


def test_cli_against_adds_the_paired_comparison(
    servers: Servers, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    where = ["--target", servers.grpc.target, "--limit", "6"]
    code, out, err = _eval(
        capsys, "--task", "shout", "--adapter", "qv4", "--against", "qv4", *where, "--json"
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [row["model"] for row in rows] == ["qv4", "qv4"]
    assert rows[1]["against"] == "qv4" and (rows[1]["higher"], rows[1]["lower"], rows[1]["same"]) == (0, 0, 6)
    code, out, err = _eval(capsys, "--task", "shout", "--adapter", "qv4", "--against", "qv4", *where)
    assert code == 0, err
    assert (
        out.strip().splitlines()[-1].startswith("qv4 vs qv4 on 6 prompts: higher on 0, lower on 0, same on 6")
    )
    code, out, err = _eval(capsys, "--task", "shout", "--against", "qv4", *where)
    assert code == 2 and out == "" and "name the adapter too" in err
