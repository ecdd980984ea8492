"""Example prompts an adapter is routed by: its directory's `examples.jsonl`, or prompts sent at run time.

One JSON object per line with a `"prompt"` string (other keys, such as `"response"`, are ignored);
blank lines are skipped. A file that is not valid gets one error naming the file and the 1-based
line, and the adapter is then routed as if it had no examples. Limits keep one adapter from
costing the router more than the others: at most MAX_EXAMPLES_READ prompts are read, each at most
MAX_PROMPT_CHARS characters.

It knows files and strings; nothing of features, models or the server (and imports no torch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_FILE = "examples.jsonl"
MAX_EXAMPLES_READ = 256
MAX_PROMPT_CHARS = 4000
MAX_FILE_BYTES = 4 << 20


class ExamplesError(ValueError):
    """Example prompts that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Examples:
    prompts: tuple[str, ...]
    digest: str  # sha256 of the file as read ("" when there is no file)


def check_prompts(prompts: Sequence[str], where: str = "example_prompts") -> tuple[str, ...]:
    """The prompts as given, or ExamplesError naming the first unusable one."""
    if not prompts:
        raise ExamplesError(f"{where}: give at least one example prompt")
    if len(prompts) > MAX_EXAMPLES_READ:
        raise ExamplesError(
            f"{where}: at most {MAX_EXAMPLES_READ} example prompts at once, got {len(prompts)}"
        )
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ExamplesError(f"{where}[{index}]: an example prompt must be non-empty text")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ExamplesError(
                f"{where}[{index}]: {len(prompt)} characters; an example prompt may have at most {MAX_PROMPT_CHARS}"
            )
    return tuple(prompts)


def read_examples(directory: Path) -> Examples:
    """The adapter's `examples.jsonl` (Examples((), "") when it has none)."""
    path = directory / EXAMPLES_FILE
    if not path.is_file():
        return Examples((), "")
    prompts, data = read_prompts_file(path, EXAMPLES_FILE)
    if not prompts:
        return Examples((), "")
    return Examples(check_prompts(prompts, EXAMPLES_FILE), "sha256:" + hashlib.sha256(data).hexdigest())


def read_prompts_file(path: Path, label: str) -> tuple[tuple[str, ...], bytes]:
    """The "prompt" strings of a JSONL file (at most MAX_EXAMPLES_READ) and the bytes read;
    ExamplesError naming `label` and the 1-based line."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ExamplesError(f"{label} is larger than {MAX_FILE_BYTES >> 20} MiB")
    data = path.read_bytes()
    prompts: list[str] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExamplesError(f"{label} line {number}: not JSON ({exc})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise ExamplesError(f'{label} line {number}: expected an object with a "prompt" string')
        prompts.append(prompt)
        if len(prompts) == MAX_EXAMPLES_READ:
            break
    return tuple(prompts), data
