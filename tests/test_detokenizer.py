"""Incremental detokenization: pieces add up to the full decode; stop strings cut and hold back."""

from __future__ import annotations

from server.engine.detokenizer import Detokenizer


def _stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, [1, 2, 3], stop)
    pieces = []
    for token in ids:
        detok.add(token)
        pieces.append(detok.take(final=False))
        if detok.stopped:
            break
    pieces.append(detok.take(final=True))
    return pieces, detok


def test_pieces_concatenate_to_the_whole_decode_including_multibyte(tokenizer) -> None:
    text = "Grüße aus Köln — 東京 🚀 and plain words."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never a half character


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer) -> None:
    text = "The answer is forty two, said the computer."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, detok = _stream(tokenizer, ids, stop=("forty two",))
    assert detok.stopped
    assert "".join(pieces) == "The answer is "
    assert all("forty" not in p for p in pieces)


def test_held_back_prefix_is_released_when_it_cannot_become_a_stop(tokenizer) -> None:
    text = "one two three four"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, detok = _stream(tokenizer, ids, stop=("two thousand",))
    assert not detok.stopped
    assert "".join(pieces) == text
