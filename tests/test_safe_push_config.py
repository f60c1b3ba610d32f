"""cog-safe-push.yaml, the release gate's configuration: valid for cog-safe-push, its cases valid
for this model's schema and covering every mode, and its error cases failing as they expect."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from sdcog.model.weights import PROJECT_ROOT
from sdcog_tools.schema_compat import current_schema, input_properties

CONFIG = yaml.safe_load((PROJECT_ROOT / "cog-safe-push.yaml").read_text())
CASES = CONFIG["predict"]["test_cases"]
CHECKERS = ("exact_string", "match_url", "match_prompt", "jq_query", "error_contains")
ERROR_CASES = [case for case in CASES if "error_contains" in case]


@pytest.fixture(scope="module")
def properties():
    return input_properties(current_schema())


def test_the_file_is_valid_for_cog_safe_push():
    schema = json.loads((Path(__file__).parent / "cog_safe_push_config.schema.json").read_text())
    jsonschema.validate(CONFIG, schema)
    for case in CASES:
        assert sum(case.get(checker) is not None for checker in CHECKERS) <= 1, case
    assert CONFIG["model"] == "your-username/your-model"  # placeholders a fork edits
    assert CONFIG["test_model"] == "your-username/your-model-test"


def test_the_mirrored_config_schema_rejects_what_cog_safe_push_rejects():
    schema = json.loads((Path(__file__).parent / "cog_safe_push_config.schema.json").read_text())
    for bad in (
        {**CONFIG, "predicts": CONFIG["predict"]},
        {**CONFIG, "predict": {**CONFIG["predict"], "test_cases": [{"input": {"prompt": "x"}}]}},
        {key: value for key, value in CONFIG.items() if key != "model"},
        {**CONFIG, "predict": {**CONFIG["predict"], "fuzz": {"iterations": "ten"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("case", CASES, ids=lambda case: ",".join(sorted(case["inputs"])))
def test_every_case_sends_inputs_this_model_declares_within_their_ranges(case, properties):
    for name, value in case["inputs"].items():
        assert name in properties, f"{name} is not an input"
        rule = {
            key: properties[name][key]
            for key in ("type", "minimum", "maximum", "enum")
            if key in properties[name]
        }
        jsonschema.validate(value, rule)


def test_the_cases_cover_every_mode_format_and_a_lora_and_expect_clear_errors(properties):
    succeeding = [case["inputs"] for case in CASES if "error_contains" not in case]
    assert {inputs.get("output_format", "webp") for inputs in succeeding} == set(
        properties["output_format"]["enum"]
    )
    assert any("image" in inputs and "mask" not in inputs and not _outpaints(inputs) for inputs in succeeding)
    assert any("mask" in inputs for inputs in succeeding)
    assert any(_outpaints(inputs) for inputs in succeeding)
    assert any("lora_weights" in inputs for inputs in succeeding)
    assert all(case.get("match_prompt") for case in CASES if "error_contains" not in case)
    assert len(ERROR_CASES) >= 3
    fuzz = CONFIG["predict"]["fuzz"]
    assert set(fuzz["disabled_inputs"]) <= set(properties) and set(fuzz["fixed_inputs"]) <= set(properties)
    secrets = {name for name, prop in properties.items() if prop.get("format") in ("password", "uri")}
    assert secrets <= set(fuzz["disabled_inputs"]), "the fuzzer cannot invent files or secrets"


def _outpaints(inputs):
    return any(name.startswith("outpaint_") for name in inputs)


def test_the_error_cases_fail_with_the_expected_message_on_the_real_server(sd15_server):
    for case in ERROR_CASES:
        body = sd15_server.predict(case["inputs"]).json()
        assert body["status"] == "failed", (case["inputs"], body.get("status"))
        assert case["error_contains"] in body["error"], (case["error_contains"], body["error"])
