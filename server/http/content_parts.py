"""Chat content parts loramux can read: text only, and a clear refusal for the rest.

`text_only` runs before the schema judges a message's `content`: a part of a kind a text-only
model cannot read (an image, audio, a file) is refused with a sentence saying so, rather than
with the schema's "Input should be 'text'". It does not know the rest of the request.
"""

from __future__ import annotations

from typing import Any

from adapters_store.errors import shown

# Chat content part types a text-only model cannot read, and what to call them.
_NOT_TEXT = {
    "image_url": "images are",
    "input_image": "images are",
    "image": "images are",
    "input_audio": "audio is",
    "audio": "audio is",
    "audio_url": "audio is",
    "video_url": "video is",
    "file": "files are",
    "input_file": "files are",
}


def text_only(content: Any) -> Any:
    """A chat message's `content` as sent, unless one of its parts is not text (ValueError)."""
    if not isinstance(content, list):
        return content
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind == "text":
            continue  # the schema judges these
        what = _NOT_TEXT.get(kind)
        if what is not None:
            raise ValueError(
                f"part {index} is {shown(kind)}: {what} not supported by loramux, which serves "
                'text-only models; send the text as {"type": "text", "text": ...} parts'
            )
        raise ValueError(
            f"part {index} has type {shown(kind)}, which loramux does not read; it reads text parts only "
            '({"type": "text", "text": ...})'
        )
    return content
