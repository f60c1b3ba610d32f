"""AUTOMATIC1111's infotext: the generation parameters as text, the way its "PNG Info" tab reads them.

The prompt on the first line, then `Negative prompt: ...`, then one line of `Key: value` fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping


def _quote(value: object) -> str:
    """Quote a value as AUTOMATIC1111 does (JSON string when it holds a comma, colon or newline), and
    also when it starts with a quote, so every value parses back."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


NEGATIVE_PREFIX = "Negative prompt:"
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")
"""Runs of Unicode whitespace (line breaks among them), as CLIP's tokenizer matches them: Python's
`\\s` also matches the separators \\x1c-\\x1f, which CLIP reads as tokens."""


def infotext_line(text: str) -> str:
    """`text` as one line of infotext that readers cannot take for anything but prompt text.

    The format has no escapes, and AUTOMATIC1111's reader splits it into lines: a line break in a
    prompt could plant a `Negative prompt:` or `Steps: ...` line. Each run of whitespace (line
    breaks included) becomes one space, and a line that would start with `Negative prompt:` starts
    with `negative prompt:` instead. CLIP's tokenizer does the same to every prompt (it collapses
    whitespace and lowercases), so the line encodes to the prompt's own tokens. The exact text is
    kept beside the infotext (see `sdcog.write.outputs`).
    """
    line = _WHITESPACE.sub(" ", text).strip()
    if line.startswith(NEGATIVE_PREFIX):
        line = line[0].lower() + line[1:]
    return line


JPEG_PROMPT_BYTES = 60_000
"""The prompt lines' share of a JPEG's EXIF, which one 64 KB segment holds (JPEG's own limit): the
rest is for the fields line and the EXIF structure."""


def prompt_lines_utf16_bytes(prompt: str, negative_prompt: str) -> int:
    """What the prompt lines of an infotext take in UTF-16 (how EXIF UserComment holds them)."""
    return 2 * (len(infotext_line(prompt)) + len(infotext_line(negative_prompt)))


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """AUTOMATIC1111 infotext: prompt line, optional `Negative prompt:` line, then `Key: value, ...`.

    Each prompt is written as one line (see `infotext_line`), so the last line is always the fields.
    """
    lines = [infotext_line(prompt)]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {infotext_line(negative_prompt)}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def parse_infotext_fields(infotext: str) -> dict[str, str]:
    """The `Key: value` pairs of an infotext's last line (quoted values unquoted)."""
    last_line = infotext.rsplit("\n", 1)[-1]
    fields: dict[str, str] = {}
    position = 0
    while position < len(last_line):
        colon = last_line.index(": ", position)
        key = last_line[position:colon].strip()
        position = colon + 2
        if last_line.startswith('"', position):
            value, consumed = json.JSONDecoder().raw_decode(last_line, position)
            position = consumed
        else:
            end = last_line.find(",", position)
            end = len(last_line) if end == -1 else end
            value, position = last_line[position:end], end
        fields[key] = value
        position = last_line.find(",", position)
        position = len(last_line) if position == -1 else position + 1
    return fields
