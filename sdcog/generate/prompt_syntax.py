"""AUTOMATIC1111's attention syntax: a prompt as (text, weight) fragments.

- `(words)` multiplies the attention to `words` by 1.1, `((words))` by 1.21, and so on;
- `[words]` divides it by 1.1;
- `(words:1.3)` sets the factor to 1.3 (0.5 weakens; nesting multiplies);
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters.

As in AUTOMATIC1111, a bracket left open applies its factor to the rest of the prompt, and a closing
bracket with nothing open is kept as text: a prompt is never refused for its brackets.
"""

from __future__ import annotations

import math
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


class PromptSyntaxError(ValueError):
    """A prompt whose attention weights cannot be used (the caller names the field)."""


MAX_WEIGHT = 100.0
"""The largest attention weight (in magnitude) a fragment may end up with: nested brackets multiply,
and 49 pairs of `( )` already make 1.1**49 = 106. A weight that far out only makes noise."""


@dataclass
class _Bracket:
    start: int
    """Index of the first text fragment it covers."""
    factor: float
    end: int | None = None
    """Index past the last text fragment it covers; None while open (then it runs to the end)."""


def parse_weighted_prompt(prompt: str) -> list[Fragment]:
    """The prompt's fragments, in order, with their weights.

    Linear in the prompt's length, however deeply brackets nest: the first pass records which
    fragments each bracket covers (a stack per bracket kind), the second sweeps the fragments once,
    keeping the product of the factors that cover the current one. Raises `PromptSyntaxError` when
    a weight's magnitude ends up over `MAX_WEIGHT`.
    """
    texts: list[str] = []
    groups: list[int] = []  # texts between the same two brackets share a group
    group = 0
    brackets: list[_Bracket] = []
    open_by_kind: dict[str, list[_Bracket]] = {"(": [], "[": []}

    def close(kind: str, factor: float) -> None:
        if not open_by_kind[kind]:  # nothing to close: literal text
            add(")" if kind == "(" else "]")
            return
        bracket = open_by_kind[kind].pop()  # the innermost bracket of that kind
        bracket.factor, bracket.end = factor, len(texts)

    def add(text: str) -> None:
        texts.append(text)
        groups.append(group)

    for match in _TOKEN.finditer(prompt):
        token = match.group(0)
        weight = match.group("weight")
        if weight is not None or token in ("(", ")", "[", "]"):
            group += 1
        if weight is not None:
            if open_by_kind["("]:
                close("(", float(weight))
            else:  # "words:1.3)" with no "(" open: text, as AUTOMATIC1111 reads it
                add(token)
        elif token in ("(", "["):
            bracket = _Bracket(len(texts), ROUND_FACTOR if token == "(" else SQUARE_FACTOR)
            brackets.append(bracket)
            open_by_kind[token].append(bracket)
        elif token == ")":
            close("(", ROUND_FACTOR)
        elif token == "]":
            close("[", SQUARE_FACTOR)
        else:
            add(token[1:] if token.startswith("\\") and len(token) == 2 else token)
    weights = _covering_products(brackets, texts)
    # Neighbours between the same brackets are one fragment ("time: 3 pm"); a bracket always
    # separates fragments, so "(cat:1.3)(dog:1.3)" stays two words, not "catdog".
    fragments: list[Fragment] = []
    for index, (text, weight) in enumerate(zip(texts, weights, strict=True)):
        if index and groups[index - 1] == groups[index] and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("")]


def _covering_products(brackets: list[_Bracket], texts: list[str]) -> list[float]:
    """For each text fragment, the product of the factors of the brackets covering it.

    One sweep: a bracket's factor joins the running product where its range starts and leaves it
    where it ends. The product is kept as a sum of logarithms (no overflow, and a factor can leave
    exactly), with zero and negative factors counted apart.
    """
    count = len(texts)
    starts: dict[int, list[float]] = {}
    ends: dict[int, list[float]] = {}
    for bracket in brackets:
        end = count if bracket.end is None else bracket.end
        if end > bracket.start:
            starts.setdefault(bracket.start, []).append(bracket.factor)
            ends.setdefault(end, []).append(bracket.factor)
    log_sum, zeros, negatives = 0.0, 0, 0
    weights: list[float] = []
    for index in range(count):
        for sign, factors in ((-1, ends.get(index, ())), (1, starts.get(index, ()))):
            for factor in factors:
                if factor == 0:
                    zeros += sign
                else:
                    log_sum += sign * math.log(abs(factor))
                    negatives += sign * (factor < 0)
        if zeros:
            weights.append(0.0)
            continue
        if log_sum > math.log(MAX_WEIGHT):
            raise PromptSyntaxError(
                f"gives {texts[index][:40]!r} an attention weight over {MAX_WEIGHT:g} in magnitude "
                "(nested brackets multiply their factors, 1.1 each): remove some brackets"
            )
        magnitude = float(f"{math.exp(log_sum):.12g}")  # 1.1 x 1.1 is 1.21, whatever the order
        weights.append(-magnitude if negatives % 2 else magnitude)
    return weights


def is_weighted(fragments: list[Fragment]) -> bool:
    return any(fragment.weight != 1.0 for fragment in fragments)


def plain_text(fragments: list[Fragment]) -> str:
    """The prompt without its attention syntax."""
    return "".join(fragment.text for fragment in fragments)
