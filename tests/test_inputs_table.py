"""The README's table of inputs: generated from the schema, and in step with predict.py."""

from pathlib import Path

import pytest

from sdcog_tools.cog_schema import PROJECT_ROOT, build_schema, load_predictor_info
from sdcog_tools.inputs_table import END_MARKER, START_MARKER, inputs_table, main, read_block, replace_block

README = PROJECT_ROOT / "README.md"


@pytest.fixture(scope="module")
def schema():
    return build_schema(load_predictor_info())


def rows(table: str) -> list[list[str]]:
    """The table's body rows, split into cells (on `|` that is not escaped)."""
    lines = table.strip().split("\n")[2:]
    return [[cell.strip() for cell in _split(line)] for line in lines]


def _split(line: str) -> list[str]:
    cells, current, escaped = [], "", False
    for char in line.strip()[1:-1]:
        if char == "|" and not escaped:
            cells.append(current)
            current = ""
        else:
            current += char
        escaped = char == "\\" and not escaped
    return cells + [current]


def test_the_readme_table_is_the_generated_one(schema):
    readme = README.read_text(encoding="utf-8")
    assert read_block(readme) == inputs_table(schema), (
        "README.md's inputs table is out of date with predict.py's Input declarations: "
        "run script/inputs-table and commit README.md"
    )


def test_every_input_appears_once_in_x_order(schema):
    properties = schema["components"]["schemas"]["Input"]["properties"]
    names = [row[0].strip("`") for row in rows(inputs_table(schema))]
    assert sorted(names) == sorted(properties)
    assert len(names) == len(set(names))
    assert names == sorted(properties, key=lambda name: properties[name]["x-order"])
    assert all(len(row) == 5 for row in rows(inputs_table(schema)))


HAND_MADE = {
    "components": {
        "schemas": {
            "Input": {
                "title": "Input",
                "type": "object",
                "required": ["must"],
                "properties": {
                    "size": {
                        "x-order": 1,
                        "title": "Size",
                        "type": "integer",
                        "default": 512,
                        "minimum": 64,
                        "maximum": 2048,
                        "description": "Size in pixels.",
                    },
                    "photo": {
                        "x-order": 0,
                        "title": "Photo",
                        "type": "string",
                        "format": "uri",
                        "nullable": True,
                        "default": None,
                        "description": "An image.",
                    },
                    "token": {
                        "x-order": 3,
                        "title": "Token",
                        "type": "string",
                        "format": "password",
                        "writeOnly": True,
                        "x-cog-secret": True,
                        "nullable": True,
                        "default": None,
                        "description": "A secret | never logged.",
                    },
                    "mode": {
                        "x-order": 2,
                        "allOf": [{"$ref": "#/components/schemas/mode"}],
                        "default": "b|c",
                        "description": "Pick one.",
                    },
                    "scale": {
                        "x-order": 4,
                        "title": "Scale",
                        "type": "number",
                        "default": 0.5,
                        "minimum": 0,
                        "maximum": 1.5,
                        "description": "A <owner>/<repo> reference, or outpaint_* pixels.",
                    },
                    "flag": {"x-order": 5, "type": "boolean", "default": False, "description": "On or off."},
                    "must": {"x-order": 6, "type": "string", "description": "Required."},
                },
            },
            "mode": {
                "title": "mode",
                "description": "An enumeration.",
                "enum": ["a", "b|c"],
                "type": "string",
            },
        }
    }
}


def test_the_renderer_on_a_hand_made_schema():
    table = inputs_table(HAND_MADE)
    lines = table.split("\n")
    assert lines[0] == "| input | type | default | range or choices | description |"
    assert lines[1] == "|---|---|---|---|---|"
    assert table.endswith("\n")
    assert rows(table) == [
        ["`photo`", "file (URL or data URI)", "none", "", "An image."],
        ["`size`", "integer", "`512`", "64-2048", "Size in pixels."],
        ["`mode`", "choice", "`b\\|c`", "`a`, `b\\|c`", "Pick one."],
        ["`token`", "secret", "none", "", "A secret \\| never logged."],
        ["`scale`", "number", "`0.5`", "0-1.5", "A \\<owner>/\\<repo> reference, or outpaint_\\* pixels."],
        ["`flag`", "boolean", "`false`", "", "On or off."],
        ["`must`", "string", "required", "", "Required."],
    ]


def test_a_pipe_in_a_description_is_escaped():
    schema = {
        "components": {
            "schemas": {
                "Input": {
                    "properties": {
                        "x": {"x-order": 0, "type": "string", "description": "a | b || c\\|d"},
                    }
                }
            }
        }
    }
    row = inputs_table(schema).split("\n")[2]
    assert row == "| `x` | string | none |  | a \\| b \\|\\| c\\\\\\|d |"
    # Every `|` of the description is escaped: the row still has exactly five cells.
    assert len(_split(row)) == 5


def test_write_replaces_only_the_block_between_the_markers(tmp_path: Path, schema):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Title\n\nBefore.\n\n{START_MARKER}\n| old |\n{END_MARKER}\n\nAfter.\n", encoding="utf-8"
    )
    assert main(["--write", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text == f"# Title\n\nBefore.\n\n{START_MARKER}\n{inputs_table(schema)}{END_MARKER}\n\nAfter.\n"
    assert read_block(text) == inputs_table(schema)


def test_missing_or_misplaced_markers_are_refused():
    with pytest.raises(ValueError):
        replace_block("no markers here", "| table |\n")
    with pytest.raises(ValueError):
        read_block(f"{END_MARKER}\n{START_MARKER}\n")
    with pytest.raises(ValueError):
        read_block(f"{START_MARKER}\n{START_MARKER}\n{END_MARKER}\n")
