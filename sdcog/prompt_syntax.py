"""AUTOMATIC1111's attention syntax: a prompt as (text, weight) fragments.

- `(words)` multiplies the attention to `words` by 1.1, `((words))` by 1.21, and so on;
- `[words]` divides it by 1.1;
- `(words:1.3)` sets the factor to 1.3 (0.5 weakens; nesting multiplies);
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters.

As in AUTOMATIC1111, a bracket left open applies its factor to the rest of the prompt, and a closing
bracket with nothing open is kept as text: a prompt is never refused for its brackets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

_TOKEN = re.compile(
    r"""
    \\[\\()\[\]]                                  # an escaped bracket or backslash
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # the end of (words:1.3)
    | [()\[\]]                                    # a bracket
    | [^\\()\[\]:]+                               # plain text
    | [\\:]                                       # a lone backslash or colon
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float = 1.0


def parse_weighted_prompt(prompt: str) -> list[Fragment]:
    """The prompt's fragments, in order, with their weights."""
    texts: list[str] = []
    weights: list[float] = []
    groups: list[int] = []  # texts between the same two brackets share a group
    group = 0
    open_brackets: list[tuple[str, int]] = []  # (bracket, index of its first fragment)

    def close(bracket: str, factor: float) -> None:
        for position, (kind, start) in reversed(list(enumerate(open_brackets))):
            if kind == bracket:
                del open_brackets[position]
                for index in range(start, len(weights)):
                    weights[index] *= factor
                return
        add(")" if bracket == "(" else "]")  # nothing to close: literal text

    def add(text: str) -> None:
        texts.append(text)
        weights.append(1.0)
        groups.append(group)

    for match in _TOKEN.finditer(prompt):
        token = match.group(0)
        if match.group("weight") is not None or token in ("(", ")", "[", "]"):
            group += 1
        if match.group("weight") is not None:
            if any(kind == "(" for kind, _ in open_brackets):
                close("(", float(match.group("weight")))
            else:  # "words:1.3)" with no "(" open: text, as AUTOMATIC1111 reads it
                add(token)
        elif token in ("(", "["):
            open_brackets.append((token, len(texts)))
        elif token == ")":
            close("(", ROUND_FACTOR)
        elif token == "]":
            close("[", SQUARE_FACTOR)
        else:
            add(token[1:] if token.startswith("\\") and len(token) == 2 else token)
    for kind, start in open_brackets:  # left open: the factor runs to the end
        factor = ROUND_FACTOR if kind == "(" else SQUARE_FACTOR
        for index in range(start, len(weights)):
            weights[index] *= factor
    # Neighbours between the same brackets are one fragment ("time: 3 pm"); a bracket always
    # separates fragments, so "(cat:1.3)(dog:1.3)" stays two words, not "catdog".
    fragments: list[Fragment] = []
    for index, (text, weight) in enumerate(zip(texts, weights, strict=True)):
        if index and groups[index - 1] == groups[index] and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("")]


def is_weighted(fragments: list[Fragment]) -> bool:
    return any(fragment.weight != 1.0 for fragment in fragments)


def plain_text(fragments: list[Fragment]) -> str:
    """The prompt without its attention syntax."""
    return "".join(fragment.text for fragment in fragments)
