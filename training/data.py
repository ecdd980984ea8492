"""Training rows: JSONL lines -> chat turns -> (input ids, labels), the way the server renders chats.

A line is one JSON object in either form (other keys are ignored):

    {"prompt": "...", "response": "..."}              one user message and the answer;
                                                      an optional "system" string comes first
    {"messages": [{"role": ..., "content": ...}, ...]} any chat whose last message is the
                                                      assistant's answer (roles: system, user,
                                                      assistant, tool)

Blank lines are skipped. The prompt ids are `server.prompts.chat_prompt_ids` of the messages
before the answer, exactly what `loramux serve` feeds the model for that chat. The answer's ids
are cut from the template's rendering of the whole conversation: what follows the prompt, up to
and including the first end-of-turn token that is an EOS id of the model (what the served model
emits to stop). Only those tokens carry labels; every other label is IGNORE_INDEX. A row the
template renders differently from its generation prompt is refused rather than trained on.

Every refused row raises DataError naming the file and its 1-based line. This module knows the
tokenizer's interface and the JSONL format; it knows nothing of models or optimizers.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.errors import shown
from server.engine.request import InvalidRequest
from server.prompts import CHAT_ROLES, chat_ids, chat_prompt_ids
from training.config import TrainingError

IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers' loss) skips
ROW_FORMS = '{"prompt": str, "response": str} or {"messages": [{"role": str, "content": str}, ...]}'


class DataError(TrainingError):
    """A training file or row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ChatRow:
    line: int  # 1-based, in the file
    messages: tuple[tuple[str, str], ...]  # (role, content) before the answer
    response: str  # the assistant's answer


@dataclass(frozen=True)
class Example:
    line: int
    input_ids: tuple[int, ...]  # prompt ids + answer ids (ending with the end-of-turn token)
    labels: tuple[int, ...]  # IGNORE_INDEX over the prompt, the ids themselves over the answer


def read_rows(path: Path) -> list[ChatRow]:
    """Every row of a JSONL file, checked; DataError names the first bad line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"--data {path}: no such file") from None
    except OSError as exc:
        raise DataError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    rows = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        try:
            rows.append(parse_row(text, number))
        except ValueError as exc:
            raise DataError(f"{path} line {number}: {exc}") from None
    if not rows:
        raise DataError(f"--data {path} holds no rows; write one JSON object per line: {ROW_FORMS}")
    return rows


def parse_row(text: str, line: int) -> ChatRow:
    """One JSONL line as a chat; ValueError says what is wrong with it (the caller adds the line)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, {ROW_FORMS}; got a {_json_type(row)}")
    if "messages" in row:
        if "prompt" in row or "response" in row:
            raise ValueError('give either "messages" or "prompt" and "response", not both')
        return _parse_messages(row["messages"], line)
    missing = [key for key in ("prompt", "response") if key not in row]
    if missing:
        raise ValueError(f'missing "{missing[0]}"; each row is {ROW_FORMS}')
    messages = []
    if "system" in row:
        messages.append(("system", _text(row["system"], '"system"')))
    messages.append(("user", _text(row["prompt"], '"prompt"')))
    return ChatRow(line, tuple(messages), _text(row["response"], '"response"'))


def _parse_messages(messages: Any, line: int) -> ChatRow:
    if not isinstance(messages, list):
        raise ValueError(
            f'"messages" must be a list of {{"role", "content"}} objects, got a {_json_type(messages)}'
        )
    if len(messages) < 2:
        raise ValueError('"messages" needs at least a prompt message and the assistant\'s answer last')
    pairs = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(
                f'{where} must be an object with "role" and "content", got a {_json_type(message)}'
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f'{where} has no "{key}"')
        role = message["role"]
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(
                f"{where}.role is {shown(str(role))}; use one of {', '.join(sorted(CHAT_ROLES))}"
            )
        pairs.append((role, _text(message["content"], f"{where}.content")))
    if pairs[-1][0] != "assistant":
        raise ValueError(
            f'the last message is the answer to learn, so its role must be "assistant", got "{pairs[-1][0]}"'
        )
    return ChatRow(line, tuple(pairs[:-1]), pairs[-1][1])


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got a {_json_type(value)}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def tokenize_rows(
    tokenizer: Any, rows: Sequence[ChatRow], end_of_turn_ids: Collection[int], max_length: int, path: Path
) -> list[Example]:
    """Every row's ids and labels; DataError names the first row that cannot be used."""
    examples = []
    for row in rows:
        try:
            example = tokenize_row(tokenizer, row, end_of_turn_ids)
        except ValueError as exc:
            raise DataError(f"{path} line {row.line}: {exc}") from None
        if len(example.input_ids) > max_length:
            answer = sum(label != IGNORE_INDEX for label in example.labels)
            prompt = len(example.input_ids) - answer
            raise DataError(
                f"{path} line {row.line}: {len(example.input_ids)} tokens (prompt {prompt} + answer {answer}), "
                f"{len(example.input_ids) - max_length} more than --max-length {max_length}; "
                "shorten the row or raise --max-length"
            )
        examples.append(example)
    return examples


def tokenize_row(tokenizer: Any, row: ChatRow, end_of_turn_ids: Collection[int]) -> Example:
    """The row's ids through the chat template; ValueError if the template cannot serve it."""
    try:
        prompt_ids = chat_prompt_ids(tokenizer, row.messages)
        full_ids = chat_ids(
            tokenizer, (*row.messages, ("assistant", row.response)), add_generation_prompt=False
        )
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    input_ids, labels = answer_labels(prompt_ids, full_ids, end_of_turn_ids)
    return Example(row.line, input_ids, labels)


def answer_labels(
    prompt_ids: Sequence[int], full_ids: Sequence[int], end_of_turn_ids: Collection[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input ids, labels) of one turn: the prompt, then the answer up to its end-of-turn token.

    prompt_ids: the template with the generation prompt (what the server feeds the model);
    full_ids: the template of the conversation including the answer. The answer is what
    full_ids adds after prompt_ids, cut after its first end-of-turn id (the template may
    render more, e.g. a newline, that the model never generates).
    """
    prompt, full = tuple(prompt_ids), tuple(full_ids)
    if full[: len(prompt)] != prompt:
        raise ValueError(
            "the chat template renders the conversation with its answer differently from the prompt the "
            "server would send (the answer's first characters merge into the prompt's last token?); "
            "change the start of the answer"
        )
    tail = full[len(prompt) :]
    end = next((index for index, token in enumerate(tail) if token in end_of_turn_ids), None)
    if end is None:
        raise ValueError(
            f"the chat template does not end the answer with an end-of-turn token of the model "
            f"(EOS ids {sorted(end_of_turn_ids)}), so a served adapter would not learn to stop"
        )
    if end == 0:
        raise ValueError("the answer renders as no tokens")
    answer = tail[: end + 1]
    return prompt + answer, (IGNORE_INDEX,) * len(prompt) + answer
