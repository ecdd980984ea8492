"""The shape every demo task has: examples, a generator of training rows, a held-out set, a metric.

A task's training rows come from its generator (`Task.generate(rng, n)`, seeded, with many
templates); its held-out rows come from a hand-written file, `tasks/heldout/<name>.jsonl`, one
`{"prompt": ..., "response": ...}` per line, written apart from the generator so that a score on
it says how the adapter does on inputs phrased by someone else; its validation rows, for choosing
settings, from another such file, `tasks/validation/<name>.jsonl`. `generate` never returns a
prompt of the held-out set. The metric is `Task.score(answer, example)` in [0, 1].

This module knows nothing of any one task, of training, or of a server.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One user message (the input alone, no instruction) and the response the adapter should give.

    For held-out rows `response` is the reference: the SQL query, the label, the JSON object, the
    number (shout needs none and has "").
    """

    prompt: str
    response: str

    def as_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response}


@dataclass(frozen=True)
class Task:
    """A demo task. `sample(rng)` draws one training example; `score(answer, example)` is in [0, 1]."""

    name: str
    summary: str
    metric: str  # the metric's name, as `loramux eval` prints it
    max_tokens: int  # enough for any right answer; what `loramux eval` asks for
    sample: Callable[[random.Random], Example]
    score: Callable[[str, Example], float]

    def generate(self, rng: random.Random, n: int) -> list[Example]:
        """n training examples with distinct prompts, none of them a held-out prompt.

        Distinct as strings: a question asked again in other case or punctuation counts as new
        (that is surface variety); a held-out prompt is kept out in every such form.
        """
        heldout = {prompt_key(example.prompt) for example in self.heldout()}
        seen: set[str] = set()
        examples: list[Example] = []
        for _ in range(50 * n + 1000):
            if len(examples) == n:
                return examples
            example = self.sample(rng)
            if example.prompt not in seen and prompt_key(example.prompt) not in heldout:
                seen.add(example.prompt)
                examples.append(example)
        raise ValueError(f"the {self.name} generator ran out of distinct prompts after {len(examples)}")

    def heldout(self) -> list[Example]:
        """The hand-written held-out set (tasks/heldout/<name>.jsonl)."""
        return list(self._heldout)

    def validation(self) -> list[Example]:
        """The hand-written validation set (tasks/validation/<name>.jsonl): for choosing settings
        (ComPEFT's alpha), so that the held-out set is only ever measured. Written apart from the
        generator and from the held-out set; no prompt of either (tests/test_tasks.py)."""
        return list(self._validation)

    @cached_property
    def _heldout(self) -> tuple[Example, ...]:
        return _read_rows("heldout", self.name)

    def confirm(self) -> list[Example]:
        """A second hand-written held-out set, written after the first results to settle a close
        call with more prompts (tasks/confirm/<name>.jsonl; empty for a task without one). Written
        apart from the generator, the held-out and the validation sets (tests/test_tasks.py) and
        scored once, never chosen by."""
        return list(self._confirm)

    @cached_property
    def _validation(self) -> tuple[Example, ...]:
        return _read_rows("validation", self.name)

    @cached_property
    def _confirm(self) -> tuple[Example, ...]:
        return _read_rows("confirm", self.name, missing_ok=True)


def _read_rows(folder: str, name: str, missing_ok: bool = False) -> tuple[Example, ...]:
    resource = resources.files("tasks").joinpath(folder).joinpath(f"{name}.jsonl")
    if missing_ok and not resource.is_file():
        return ()
    text = resource.read_text("utf-8")
    rows = (json.loads(line) for line in text.splitlines() if line.strip())
    return tuple(Example(row["prompt"], row.get("response", "")) for row in rows)


def prompt_key(prompt: str) -> str:
    """A prompt with case, punctuation and spacing removed: two prompts that differ only there are one."""
    return " ".join(re.sub(r"[^\w\s]", " ", prompt.lower()).split())


def write_jsonl(path: str | Path, rows: Iterable[dict[str, object]]) -> int:
    """Write rows as JSON lines (UTF-8, not ASCII-escaped); returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def strip_fences(answer: str) -> str:
    """An answer without surrounding whitespace and Markdown code fences (```sql ... ```)."""
    text = answer.strip()
    fenced = re.fullmatch(r"```[\w-]*\s*\n?(.*?)\n?\s*```", text, flags=re.DOTALL)
    return fenced.group(1).strip() if fenced else text


# -- surface variation shared by the generators --------------------------------------------


def vary_surface(rng: random.Random, text: str) -> str:
    """The same text as people type it: sometimes lower-cased, without its final mark, or spaced oddly."""
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.2 and text[:1].isalpha():
        text = text[0].lower() + text[1:]
    roll = rng.random()
    if roll < 0.2 and text[-1:] in ".?!":
        text = text[:-1]
    elif roll < 0.25 and text[-1:] == "?":
        text = text[:-1] + "??"
    return text


def pick(rng: random.Random, options: Iterable[str]) -> str:
    return rng.choice(list(options))
