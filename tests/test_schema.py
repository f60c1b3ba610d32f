"""The generated OpenAPI schema: complete, in Cog's format, and in step with predict.py and the rules."""

import inspect
import json
import textwrap
import typing

import pytest
from cog import Path, Secret
from cog.input import FieldInfo

import predict
from sdcog.resolve import request as rules
from sdcog.resolve.schedulers import MODEL_DEFAULT, SCHEDULER_CHOICES
from sdcog_tools.cog_schema import build_schema, load_predictor_info, main, write_schema


@pytest.fixture(scope="module")
def schema():
    return build_schema(load_predictor_info())


def input_properties(schema):
    return schema["components"]["schemas"]["Input"]["properties"]


def signature_inputs():
    parameters = list(inspect.signature(predict.Predictor.predict).parameters.values())[1:]
    hints = typing.get_type_hints(predict.Predictor.predict)
    return [(parameter, hints[parameter.name]) for parameter in parameters]


def test_every_input_has_a_description(schema):
    for name, prop in input_properties(schema).items():
        assert prop.get("description", "").strip(), f"{name} has no description"


def test_schema_follows_the_signature(schema):
    """Read predict()'s signature directly and compare it with the generated document, field by field."""
    properties = input_properties(schema)
    components = schema["components"]["schemas"]
    inputs = signature_inputs()
    assert list(properties) == [parameter.name for parameter, _ in inputs]
    for order, (parameter, hint) in enumerate(inputs):
        field: FieldInfo = parameter.default
        prop = properties[parameter.name]
        assert prop["x-order"] == order
        assert prop["description"] == field.description
        assert prop.get("default") == field.default
        optional = type(None) in typing.get_args(hint)
        assert prop.get("nullable", False) == optional, parameter.name
        assert prop.get("minimum") == field.ge and prop.get("maximum") == field.le, parameter.name
        if field.choices:
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{parameter.name}"}]
            assert components[parameter.name]["enum"] == field.choices
        else:
            base = typing.get_args(hint)[0] if optional else hint
            expected_type = {
                str: "string",
                int: "integer",
                float: "number",
                bool: "boolean",
                Path: "string",
                Secret: "string",
            }[base]
            assert prop["type"] == expected_type, parameter.name
    assert schema["components"]["schemas"]["Input"].get("required", []) == []
    assert components["Output"] == {
        "title": "Output",
        "type": "array",
        "items": {"type": "string", "format": "uri"},
    }


def test_declared_ranges_and_choices_are_the_rules_the_request_enforces(schema):
    """predict.py must use literals (cog build reads them statically), equal to sdcog.resolve.request's."""
    properties = input_properties(schema)
    components = schema["components"]["schemas"]
    for side in ("width", "height"):
        assert (properties[side]["minimum"], properties[side]["maximum"]) == (rules.SIZE_MIN, rules.SIZE_MAX)
    expected_ranges = {
        "num_outputs": (rules.NUM_OUTPUTS_MIN, rules.NUM_OUTPUTS_MAX),
        "num_inference_steps": (rules.STEPS_MIN, rules.STEPS_MAX),
        "guidance_scale": (rules.GUIDANCE_MIN, rules.GUIDANCE_MAX),
        "seed": (rules.SEED_MIN, rules.SEED_MAX),
        "output_quality": (rules.QUALITY_MIN, rules.QUALITY_MAX),
        "prompt_strength": (rules.STRENGTH_MIN, rules.STRENGTH_MAX),
        **{name: (rules.OUTPAINT_MIN, rules.OUTPAINT_MAX) for name in rules.OUTPAINT_FIELDS},
    }
    for name, (low, high) in expected_ranges.items():
        assert (properties[name]["minimum"], properties[name]["maximum"]) == (low, high), name
    assert tuple(components["scheduler"]["enum"]) == SCHEDULER_CHOICES
    assert properties["scheduler"]["default"] == MODEL_DEFAULT
    assert (properties["clip_skip"]["minimum"], properties["clip_skip"]["maximum"]) == (
        rules.CLIP_SKIP_MIN,
        rules.CLIP_SKIP_MAX,
    )
    assert tuple(components["output_format"]["enum"]) == rules.OUTPUT_FORMATS
    assert properties["output_format"]["default"] == rules.DEFAULT_OUTPUT_FORMAT
    assert properties["output_quality"]["default"] == rules.DEFAULT_QUALITY
    assert properties["prompt_strength"]["default"] == rules.DEFAULT_STRENGTH
    assert properties["image"]["format"] == properties["mask"]["format"] == "uri"


def test_paths_are_the_ones_cog_build_writes(schema):
    assert schema["openapi"] == "3.0.2"
    assert set(schema["paths"]) == {
        "/",
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}/cancel",
    }
    predict_op = schema["paths"]["/predictions"]["post"]
    assert predict_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictionRequest"
    }
    assert set(predict_op["responses"]) == {"200", "422"}


def test_cog_rules_for_required_optional_and_defaults(tmp_path):
    """The corner cases of Cog's generator, on a throwaway predictor."""
    (tmp_path / "throwaway_predictor.py").write_text(
        textwrap.dedent(
            """
            from typing import Optional
            from cog import BasePredictor, Input, Path, Secret

            class Predictor(BasePredictor):
                def predict(
                    self,
                    text: str,
                    seed: int = Input(description="None on a non-Optional input: required", default=None),
                    maybe: Optional[int] = Input(description="optional", default=None),
                    image: Path = Input(description="a file"),
                    count: int = Input(default=2, ge=1, le=4.5),
                    mode: str = Input(default="a", choices=["a", "b"]),
                    token: Secret = Input(default=None),
                ) -> Path:
                    return image
            """
        )
    )
    schema = build_schema(
        load_predictor_info("throwaway_predictor.py:Predictor", root=tmp_path), version="0.23.1"
    )
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["text", "seed", "image"]
    assert inputs["properties"]["text"] == {"x-order": 0, "title": "Text", "type": "string"}
    assert "default" not in inputs["properties"]["seed"]
    assert (
        inputs["properties"]["maybe"]["nullable"] is True and inputs["properties"]["maybe"]["default"] is None
    )
    assert inputs["properties"]["image"]["format"] == "uri"
    assert (inputs["properties"]["count"]["minimum"], inputs["properties"]["count"]["maximum"]) == (1, 4.5)
    assert schema["components"]["schemas"]["mode"] == {
        "title": "mode",
        "description": "An enumeration.",
        "enum": ["a", "b"],
        "type": "string",
    }
    assert inputs["properties"]["token"]["format"] == "password"
    assert schema["components"]["schemas"]["Output"] == {"title": "Output", "type": "string", "format": "uri"}
    assert schema["info"] == {"title": "Cog", "version": "0.23.1"}


def test_check_mode_fails_when_the_file_is_stale(tmp_path, capsys):
    output = tmp_path / "openapi_schema.json"
    write_schema(output)
    assert main(["--check", "--output", str(output)]) == 0
    stale = json.loads(output.read_text())
    stale["components"]["schemas"]["Input"]["properties"].pop("seed")
    output.write_text(json.dumps(stale))
    assert main(["--check", "--output", str(output)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_every_input_argument_is_one_literal_that_cog_build_reads_as_python_does():
    """`cog build` reads Input(...) arguments from the source text, not by running Python: it keeps a
    string's raw text between its quotes (adjacent literals come out with the quotes and newline
    inside), and drops names and expressions. So each argument must be a single plain literal."""
    import ast
    import io
    import tokenize
    from pathlib import Path

    source = Path(predict.__file__).read_text()
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Input"
    ]
    assert len(calls) == len(signature_inputs())
    for call in calls:
        for keyword in call.keywords:
            value = keyword.value
            segment = ast.get_source_segment(source, value)
            if isinstance(value, ast.List):
                assert all(isinstance(item, ast.Constant) for item in value.elts), segment
                continue
            assert isinstance(value, ast.Constant), f"{keyword.arg}={segment}"
            if isinstance(value.value, str):
                tokens = [
                    t
                    for t in tokenize.generate_tokens(io.StringIO(segment).readline)
                    if t.type == tokenize.STRING
                ]
                assert len(tokens) == 1 and "\\" not in segment, (
                    f"{keyword.arg} must be one literal: {segment}"
                )
