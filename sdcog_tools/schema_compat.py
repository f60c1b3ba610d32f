"""Does this version's API still take every request the published version took?

The checks cog-safe-push makes before it pushes a version (no input removed or retyped, no range
narrowed, no choice removed, no new required input, the same output type), and two it does not:
an input that had a default must keep one (else requests that left it out now fail), and a file
or secret input must keep its format. They run against `release/published-schema.json`, the
schema of the last release, so a breaking change fails the tests, not the users. After a
release, `script/schema-snapshot` writes the released schema there.

Usage: python -m sdcog_tools.schema_compat [--write]   (compare with, or update, the snapshot)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sdcog_tools.cog_schema import PROJECT_ROOT, build_schema, input_properties, load_predictor_info

SNAPSHOT = PROJECT_ROOT / "release" / "published-schema.json"


def _required(schema: dict[str, Any], name: str, prop: dict[str, Any]) -> bool:
    return name in schema["components"]["schemas"]["Input"].get("required", []) or "default" not in prop


def breaking_changes(published: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What a request valid for `published` could meet in `current`, one sentence each."""
    before, after = input_properties(published), input_properties(current)
    problems = []
    for name, old in before.items():
        new = after.get(name)
        if new is None:
            problems.append(f"input {name} was removed")
            continue
        if new.get("type") != old.get("type"):
            problems.append(f"input {name} changed type from {old.get('type')} to {new.get('type')}")
            continue
        if new.get("format", "") != old.get("format", ""):
            problems.append(f"input {name} changed format from {old.get('format')} to {new.get('format')}")
        if "minimum" in new and ("minimum" not in old or new["minimum"] > old["minimum"]):
            problems.append(f"input {name} raised its minimum from {old.get('minimum')} to {new['minimum']}")
        if "maximum" in new and ("maximum" not in old or new["maximum"] < old["maximum"]):
            problems.append(f"input {name} lowered its maximum from {old.get('maximum')} to {new['maximum']}")
        if "enum" in old:
            removed = [choice for choice in old["enum"] if choice not in new.get("enum", [])]
            if removed:
                problems.append(f"input {name} no longer accepts {', '.join(map(repr, removed))}")
        if _required(current, name, new) and not _required(published, name, old):
            problems.append(f"input {name} lost its default: requests that leave it out now fail")
    for name, new in after.items():
        if name not in before and _required(current, name, new):
            problems.append(f"input {name} is new and required: requests without it now fail")
    old_output = published["components"]["schemas"]["Output"]
    new_output = current["components"]["schemas"]["Output"]
    if new_output != old_output:
        problems.append(f"the output changed from {json.dumps(old_output)} to {json.dumps(new_output)}")
    return problems


def current_schema() -> dict[str, Any]:
    """The schema `cog build` would write for predict.py."""
    return build_schema(load_predictor_info())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write the current schema to {SNAPSHOT}")
    args = parser.parse_args(argv)
    schema = current_schema()
    if args.write:
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT.relative_to(PROJECT_ROOT)}")
        return 0
    problems = breaking_changes(json.loads(SNAPSHOT.read_text()), schema)
    for problem in problems:
        print(f"breaking: {problem}")
    print(f"{len(problems)} breaking change(s) against {SNAPSHOT.relative_to(PROJECT_ROOT)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
