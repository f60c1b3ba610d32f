"""The API compatibility gate: this version's schema against the published one, and the checker
itself against each kind of breaking change (and the kinds of change that break nobody)."""

import copy
import json

import pytest

from sdcog_tools.schema_compat import SNAPSHOT, breaking_changes, current_schema


@pytest.fixture(scope="module")
def published():
    return json.loads(SNAPSHOT.read_text())


@pytest.fixture(scope="module")
def schema():
    return current_schema()


def test_this_version_takes_every_request_the_published_one_took(published, schema):
    problems = breaking_changes(published, schema)
    assert not problems, (
        "breaking API changes against release/published-schema.json:\n- "
        + "\n- ".join(problems)
        + "\nUndo them, or make them additive (a new optional input, a wider range, a new choice)."
    )


def changed(schema, edit):
    after = copy.deepcopy(schema)
    edit(after["components"]["schemas"])
    return after


def inputs(schemas):
    return schemas["Input"]["properties"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: inputs(s).pop("seed"), "input seed was removed"),
        (lambda s: inputs(s)["num_outputs"].update(type="number"), "num_outputs changed type"),
        (lambda s: inputs(s)["num_outputs"].update(maximum=2), "num_outputs lowered its maximum from 4 to 2"),
        (lambda s: inputs(s)["width"].update(minimum=128), "width raised its minimum from 64 to 128"),
        (lambda s: inputs(s)["prompt"].update(maximum=10), "prompt lowered its maximum from None to 10"),
        (lambda s: s["scheduler"]["enum"].remove("DDIM"), "scheduler no longer accepts 'DDIM'"),
        (lambda s: inputs(s)["image"].pop("format"), "image changed format from uri to None"),
        (lambda s: inputs(s)["prompt"].pop("default"), "prompt lost its default"),
        (
            lambda s: inputs(s).update(style={"type": "string", "title": "Style"}),
            "input style is new and required",
        ),
        (lambda s: s["Output"].update(type="string"), "the output changed"),
    ],
)
def test_each_kind_of_breaking_change_is_caught(schema, edit, message):
    problems = breaking_changes(schema, changed(schema, edit))
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: inputs(s).update(style={"type": "string", "default": "none", "title": "Style"}),
        lambda s: inputs(s)["num_outputs"].update(maximum=8),
        lambda s: inputs(s)["width"].update(minimum=32),
        lambda s: s["scheduler"]["enum"].append("Euler"),
        lambda s: inputs(s)["num_outputs"].update(default=2, description="More."),
    ],
)
def test_additive_changes_break_nobody(schema, edit):
    assert breaking_changes(schema, changed(schema, edit)) == []
