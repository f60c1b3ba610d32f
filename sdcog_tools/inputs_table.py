"""The README's table of inputs, rendered from the model's OpenAPI schema.

The descriptions, defaults, ranges and choices live in one place, predict.py's `Input`
declarations; this renders them as Markdown, from the schema `cog build` would write
(`sdcog_tools.cog_schema`), between two markers in the README. `tests/test_inputs_table.py` fails when
the README's copy is out of date.

    python -m sdcog_tools.inputs_table [--ref predict.py:Predictor] [--write README.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from sdcog_tools.cog_schema import DEFAULT_REF, build_schema, input_properties, load_predictor_info

START_MARKER = "<!-- inputs-table:start -->"
END_MARKER = "<!-- inputs-table:end -->"
COLUMNS = ("input", "type", "default", "range or choices", "description")


def _cell(text: str) -> str:
    """Plain text in a table cell: one line; `|` (which would end the cell) and Markdown that would
    hide or restyle the text (`<owner>` reads as an HTML tag, `*` as emphasis) are escaped."""
    text = " ".join(text.split())
    return re.sub(r"([\\|<*])", r"\\\1", text)


def _code(value: str) -> str:
    """`value` as inline code in a table cell (a `|` inside still needs escaping in a table)."""
    value = " ".join(value.split()).replace("|", "\\|")
    if not value:
        return '`""`'
    if "`" not in value:
        return f"`{value}`"
    fence = "`" * (max(len(run) for run in re.findall("`+", value)) + 1)
    return f"{fence} {value} {fence}"


def _json_text(value: Any) -> str:
    """A schema value as text: strings as they are, everything else as JSON (`false`, `0.8`)."""
    return value if isinstance(value, str) else json.dumps(value)


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "choice"
    if prop.get("x-cog-secret"):
        return "secret"
    if prop.get("type") == "array":
        return "list of " + _type(prop.get("items", {}))
    if prop.get("format") == "uri":
        return "file (URL or data URI)"
    return prop.get("type", "any")


def _default(name: str, prop: dict[str, Any], required: list[str]) -> str:
    if name in required:
        return "required"
    if prop.get("default") is None:
        return "none"
    return _code(_json_text(prop["default"]))


def _range_or_choices(prop: dict[str, Any]) -> str:
    choices = prop.get("enum")
    if choices is not None:
        return ", ".join(_code(_json_text(choice)) for choice in choices)
    low, high = prop.get("minimum"), prop.get("maximum")
    if low is not None and high is not None:
        separator = " to " if low < 0 or high < 0 else "-"
        return f"{low}{separator}{high}"
    if low is not None:
        return f"at least {low}"
    if high is not None:
        return f"at most {high}"
    return ""


def inputs_table(schema: dict[str, Any]) -> str:
    """A Markdown table of the schema's inputs, in x-order, ending with a newline."""
    required = schema["components"]["schemas"]["Input"].get("required", [])
    properties = input_properties(schema)
    names = sorted(properties, key=lambda name: properties[name].get("x-order", len(properties)))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name in names:
        prop = properties[name]
        cells = (
            _code(name),
            _type(prop),
            _default(name, prop, required),
            _range_or_choices(prop),
            _cell(prop.get("description", "")),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _marker_positions(text: str) -> tuple[int, int]:
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0 or end < start or text.count(START_MARKER) != 1 or text.count(END_MARKER) != 1:
        raise ValueError(f"expected one {START_MARKER} followed by one {END_MARKER}")
    return start + len(START_MARKER), end


def read_block(text: str) -> str:
    """What stands between the markers, without the newline after the start marker."""
    start, end = _marker_positions(text)
    block = text[start:end]
    return block[1:] if block.startswith("\n") else block


def replace_block(text: str, table: str) -> str:
    """`text` with `table` between the markers (each marker on its own line around it)."""
    start, end = _marker_positions(text)
    return text[:start] + "\n" + table + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdcog_tools.inputs_table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ref", default=None, help="predictor reference (default predict.py:Predictor)")
    parser.add_argument(
        "--write",
        type=Path,
        metavar="README",
        help=f"replace the table between {START_MARKER} and {END_MARKER}",
    )
    args = parser.parse_args(argv)
    table = inputs_table(build_schema(load_predictor_info(args.ref or DEFAULT_REF)))
    if args.write is None:
        sys.stdout.write(table)
        return 0
    text = args.write.read_text(encoding="utf-8")
    try:
        updated = replace_block(text, table)
    except ValueError as error:
        print(f"{args.write}: {error}", file=sys.stderr)
        return 1
    if updated != text:
        args.write.write_text(updated, encoding="utf-8")
        print(f"{args.write}: inputs table updated")
    else:
        print(f"{args.write}: inputs table already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
