"""Turn a request's input (text, token ids or a chat) into prompt token ids, within limits.

A caller gives exactly one of: raw prompt text (tokenized as is), token ids (checked against
the vocabulary) or chat messages (rendered with the tokenizer's chat template plus the
assistant's generation prompt). Every check raises `InvalidRequest` with a message that says
what was wrong and what to do; it quotes at most a bounded prefix of what the client sent.

This module knows the tokenizer's interface and the model's limits; it knows nothing about
protobuf, gRPC or HTTP, and nothing about sampling beyond `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters_store.errors import shown
from server.engine.request import CONTEXT_LENGTH_EXCEEDED, InvalidRequest

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_CHAT_MESSAGES = 1024
# Prompt text is capped before tokenizing it, so a huge string cannot tie up the server.
# Real text averages 3-5 characters per token; 32 leaves room for odd text.
CHARS_PER_TOKEN_CAP = 32


@dataclass(frozen=True)
class PromptInput:
    """Exactly one of the three fields is set (`text is not None`, or a non-empty tuple)."""

    text: str | None = None
    token_ids: tuple[int, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs


def max_prompt_chars(max_model_len: int) -> int:
    """Most characters of prompt text (all chat contents together) for this context length."""
    return CHARS_PER_TOKEN_CAP * max_model_len


def check_input(prompt: PromptInput, max_model_len: int) -> None:
    """Check the input's shape before any tokenizing: one form, non-empty, not huge."""
    given = [
        name
        for name, present in (
            ("prompt", prompt.text is not None),
            ("token_ids", bool(prompt.token_ids)),
            ("messages", bool(prompt.messages)),
        )
        if present
    ]
    if not given:
        raise InvalidRequest("no input: set exactly one of prompt, token_ids or messages")
    if len(given) > 1:
        raise InvalidRequest(f"set exactly one of prompt, token_ids or messages, got {' and '.join(given)}")
    if prompt.text is not None and not prompt.text:
        raise InvalidRequest("prompt is empty: give some text to complete")
    if len(prompt.messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequest(f"at most {MAX_CHAT_MESSAGES} chat messages, got {len(prompt.messages)}")
    for index, (role, _content) in enumerate(prompt.messages):
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{index}].role is {shown(role)}; use one of {', '.join(sorted(CHAT_ROLES))}"
            )
    num_chars = len(prompt.text or "") + sum(len(content) for _role, content in prompt.messages)
    limit = max_prompt_chars(max_model_len)
    if num_chars > limit:
        raise InvalidRequest(
            f"prompt is {num_chars} characters, more than the limit of {limit} "
            f"({CHARS_PER_TOKEN_CAP} per token of max_model_len {max_model_len}); shorten it"
        )


def tokenize(tokenizer: Any, prompt: PromptInput) -> tuple[int, ...]:
    """The prompt's token ids. Runs the tokenizer, so callers keep it off the event loop."""
    if prompt.token_ids:
        return prompt.token_ids
    if prompt.text is not None:
        return tuple(tokenizer.encode(prompt.text))
    return chat_prompt_ids(tokenizer, prompt.messages)


def chat_prompt_ids(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> tuple[int, ...]:
    """The ids the model sees for a chat: the template plus the assistant's generation prompt.

    `loramux train` builds its training prompts with this function too, so that an adapter is
    trained on exactly the ids it is served with.
    """
    return chat_ids(tokenizer, messages, add_generation_prompt=True)


def chat_ids(
    tokenizer: Any, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool
) -> tuple[int, ...]:
    """The chat template's ids for (role, content) pairs; InvalidRequest if the template refuses them."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template; send prompt or token_ids instead")
    conversation = [{"role": role, "content": content} for role, content in messages]
    try:
        # sanitize_control_tokens: a user who writes "<|im_start|>" gets text, not a control token.
        encoded = tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            sanitize_control_tokens=True,
        )
    except Exception as exc:  # the template's own checks (e.g. "roles must alternate")
        raise InvalidRequest(f"the chat template refused these messages: {exc}") from exc
    # transformers 5 returns a BatchEncoding (a Mapping) where 4.x returned a list.
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return tuple(int(token) for token in ids)


def check_prompt_tokens(
    token_ids: Sequence[int], max_tokens: int, vocab_size: int, max_model_len: int
) -> None:
    """At least one token, inside the vocabulary, and prompt + max_tokens within the context length."""
    if not token_ids:  # e.g. text of control characters the tokenizer drops ("\x04")
        raise InvalidRequest("the prompt tokenizes to no tokens; give text the model can read")
    for index, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"token_ids[{index}] = {token} is outside the vocabulary [0, {vocab_size})")
    if len(token_ids) + max_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) = {len(token_ids) + max_tokens} "
            f"{CONTEXT_LENGTH_EXCEEDED} max_model_len={max_model_len}; "
            "shorten the prompt or lower max_tokens"
        )
