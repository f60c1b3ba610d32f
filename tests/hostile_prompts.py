"""Prompts a hostile or careless user sends: deeply nested, very long, weights out of range.

Each maps a name to (prompt, what must happen): "refused" (an InputError naming the prompt's field,
within milliseconds of the request arriving) or "runs" (generated like any prompt). Shared by
tests/test_prompts.py (the Python API) and tests/test_fuzz.py (the real server).
"""

from sdcog.resolve.request import MAX_PROMPT_CHARS

NESTING = 6_000
"""Deep enough for a quadratic parser to take seconds, short enough to pass the character limit."""
HALF = NESTING // 2

HOSTILE_PROMPTS: dict[str, tuple[str, str]] = {
    # Issue 16: 72 KB of "(a" kept the worker busy for 55 s before being refused.
    "bracket staircase, 72 KB": ("(a" * 24_000 + ")" * 24_000, "refused"),
    "bracket staircase under the character limit": ("(a" * NESTING + ")" * NESTING, "refused"),
    "deep nesting around one word": ("(" * NESTING + "a" + ")" * NESTING, "refused"),
    "nesting that cancels out": ("([" * HALF + "a" + ")" * HALF + "]" * HALF, "runs"),
    "interleaved brackets": ("(" * 3000 + "[" * 3000 + "a" + ")" * 3000 + "]" * 3000, "runs"),
    "only brackets": ("(" * (MAX_PROMPT_CHARS // 2) + ")" * (MAX_PROMPT_CHARS // 2), "runs"),
    "unclosed brackets": ("(" * MAX_PROMPT_CHARS, "runs"),
    "a weight of 10^500": ("(a:" + "9" * 500 + ")", "refused"),
    "a weight of 0 and a negative one": ("a (b:0) (c:-1.5) d", "runs"),
    "one character over the limit": ("a" * (MAX_PROMPT_CHARS + 1), "refused"),
    "1 MB of spaces": (" " * 1_000_000, "refused"),
    "1 MB of brackets": ("(" * 500_000 + ")" * 500_000, "refused"),
    "whitespace up to the limit": ("a" + " " * (MAX_PROMPT_CHARS - 2) + "b", "runs"),
}
