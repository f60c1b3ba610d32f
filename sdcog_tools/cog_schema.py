"""The OpenAPI document `cog build` writes for this model, generated without the Cog CLI.

Cog's HTTP server validates inputs only against `.cog/openapi_schema.json` in its working
directory, which `cog build` writes (and stores in the image label `run.cog.openapi_schema`).
Serving locally without Docker needs the same file, so this module builds it the way Cog 0.23's
Go generator does (pkg/schema/openapi_spec.go): the predictor's inputs are read by Cog's own
Python inspector (the view the server's worker has of them), then laid out in Cog's format:
choices become `allOf` references to an enum component named after the input, `ge`/`le`
become `minimum`/`maximum`, Optional inputs are `nullable`, and a `None` default on a
non-Optional input means "required".

    python -m sdcog_tools.cog_schema [--ref predict.py:Predictor] [--output .cog/openapi_schema.json]
        [--check]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import cog
import yaml
from cog import _adt, _inspector

from sdcog.model.weights import PROJECT_ROOT
from sdcog.pinned_internals import relies_on_internals

DEFAULT_REF = "predict.py:Predictor"
DEFAULT_OUTPUT = PROJECT_ROOT / ".cog" / "openapi_schema.json"

_OK = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
_VALIDATION_ERROR = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


def _title(name: str) -> str:
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _number(value: float) -> int | float:
    """Go marshals float64 64.0 as 64; keep the same JSON."""
    return int(value) if float(value).is_integer() else value


@relies_on_internals("cog", "0.23.1", "cog._inspector.create_predictor, which reads predict()'s inputs")
def load_predictor_info(ref: str = DEFAULT_REF, root: Path = PROJECT_ROOT) -> _adt.PredictorInfo:
    """Cog's own reading of the predictor named by `ref` ("file.py:Class"), imported from `root`."""
    file_name, _, predictor_name = ref.partition(":")
    module_name = Path(file_name).with_suffix("").as_posix().replace("/", ".")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    with warnings.catch_warnings():
        # cog 0.23 calls BasePredictor/predict() deprecated aliases of BaseRunner/run(); both work.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _inspector.create_predictor(module_name, predictor_name)


def _input_property(field: _adt.InputField) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
    """One input's property, its enum component (for choices), and whether it is required."""
    field_type = field.type
    nullable = field_type.repetition in (_adt.Repetition.OPTIONAL, _adt.Repetition.OPTIONAL_REPEATED)
    # `token: Secret = Input(default=None)` is Cog's idiom for an optional credential: Cog treats it as
    # Optional. (At run time `Input()` and `Input(default=None)` look the same; both count as that idiom.)
    if field_type.primitive is _adt.PrimitiveType.SECRET and field.default is None:
        nullable = nullable or field_type.repetition is _adt.Repetition.REQUIRED
    prop: dict[str, Any] = {"x-order": field.order}
    enum = None
    if field.choices:
        enum = {
            "title": field.name,
            "description": "An enumeration.",
            "enum": [field_type.primitive.json_encode(choice) for choice in field.choices],
            "type": field_type.primitive.json_type()["type"],
        }
        prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
    else:
        prop["title"] = _title(field.name)
        prop.update(field_type.json_type())
    has_default = field.default is not None or nullable
    repeated = field_type.repetition in (_adt.Repetition.REQUIRED, _adt.Repetition.REPEATED)
    required = not has_default and (field_type.union_variants is not None or repeated)
    if has_default:
        prop["default"] = None if field.default is None else field_type.json_encode(field.default)
    if nullable:
        prop["nullable"] = True
    constraints = {
        "description": field.description,
        "minimum": None if field.ge is None else _number(field.ge),
        "maximum": None if field.le is None else _number(field.le),
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
    }
    prop.update({key: value for key, value in constraints.items() if value is not None})
    if field.deprecated:
        prop["deprecated"] = True
    return prop, enum, required


def input_properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Input properties of a schema, each input's choices (an `allOf` reference to a component)
    resolved into its own `type` and `enum`."""
    components = schema["components"]["schemas"]
    properties = {}
    for name, prop in components["Input"]["properties"].items():
        prop = dict(prop)
        for part in prop.pop("allOf", []):
            target = components[part["$ref"].rsplit("/", 1)[-1]]
            prop.setdefault("type", target.get("type"))
            prop["enum"] = target.get("enum", [])
        properties[name] = prop
    return properties


_MODES = {
    # mode: (endpoint, request, response, input, output, summary, operation, cancel operation, id)
    "predict": (
        "/predictions",
        "PredictionRequest",
        "PredictionResponse",
        "Input",
        "Output",
        "Predict",
        "predict_predictions_post",
        "cancel_predictions__prediction_id__cancel_post",
        "prediction_id",
    ),
    "train": (
        "/trainings",
        "TrainingRequest",
        "TrainingResponse",
        "TrainingInput",
        "TrainingOutput",
        "Train",
        "train_trainings_post",
        "cancel_trainings__training_id__cancel_post",
        "training_id",
    ),
}


@relies_on_internals("cog", "0.23.1", "cog._adt's input types, which it writes as OpenAPI")
def build_schema(
    info: _adt.PredictorInfo, version: str = cog.__version__, mode: str = "predict"
) -> dict[str, Any]:
    """The OpenAPI 3.0.2 document Cog writes for a predictor (prediction mode) or a trainer."""
    endpoint, request, response, input_key, output_key, summary, operation, cancel, id_name = _MODES[mode]
    noun = "prediction" if mode == "predict" else "training"
    properties: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    required: list[str] = []
    for name, field in sorted(info.inputs.items(), key=lambda item: item[1].order):
        prop, enum, is_required = _input_property(field)
        properties[name] = prop
        if enum is not None:
            enums[name] = enum
        if is_required:
            required.append(name)
    input_schema: dict[str, Any] = {"title": input_key, "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    string = {"type": "string"}
    timestamp = {"type": "string", "format": "date-time"}
    schemas = {
        input_key: input_schema,
        output_key: info.output.json_type(),
        **enums,
        request: {
            "title": request,
            "type": "object",
            "properties": {
                "id": {"title": "Id", **string},
                "input": {"$ref": f"#/components/schemas/{input_key}"},
            },
        },
        response: {
            "title": response,
            "type": "object",
            "properties": {
                "input": {"$ref": f"#/components/schemas/{input_key}"},
                "output": {"$ref": f"#/components/schemas/{output_key}"},
                "id": {"title": "Id", **string},
                "version": {"title": "Version", **string},
                "created_at": {"title": "Created At", **timestamp},
                "started_at": {"title": "Started At", **timestamp},
                "completed_at": {"title": "Completed At", **timestamp},
                "status": {"title": "Status", **string},
                "error": {"title": "Error", **string},
                "logs": {"title": "Logs", **string},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _OK}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": _OK},
            }
        },
        endpoint: {
            "post": {
                "summary": summary,
                "description": f"Run a single {noun} on the model",
                "operationId": operation,
                "requestBody": {
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}
                },
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": {
                            "application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}
                        },
                    },
                    "422": _VALIDATION_ERROR,
                },
            }
        },
        f"{endpoint}/{{{id_name}}}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": cancel,
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": _title(id_name), "type": "string"},
                        "name": id_name,
                        "in": "path",
                    }
                ],
                "responses": {"200": _OK, "422": _VALIDATION_ERROR},
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def train_ref(root: Path = PROJECT_ROOT) -> str | None:
    """cog.yaml's `train:` reference ("train.py:train"), or None."""
    try:
        config = yaml.safe_load((root / "cog.yaml").read_text()) or {}
    except OSError:
        return None
    return config.get("train")


def combined_schema(
    ref: str = DEFAULT_REF, trainer: str | None = None, root: Path = PROJECT_ROOT
) -> dict[str, Any]:
    """The predictor's schema, with the trainer's paths and components added when there is one:
    what `cog build` writes for a model with both (pkg/schema/generator.go's MergeSchemas)."""
    schema = build_schema(load_predictor_info(ref, root))
    if trainer:
        training = build_schema(load_predictor_info(trainer, root), mode="train")
        for key in ("paths",):
            schema[key] = {**training[key], **schema[key]}
        components = schema["components"]["schemas"]
        schema["components"]["schemas"] = {**training["components"]["schemas"], **components}
    return schema


def write_schema(
    output: Path = DEFAULT_OUTPUT, ref: str = DEFAULT_REF, root: Path = PROJECT_ROOT
) -> dict[str, Any]:
    """Generate the schema for `ref` (and cog.yaml's trainer) and write it to `output`; returns it."""
    schema = combined_schema(ref, train_ref(root), root)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdcog_tools.cog_schema", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--ref", default=DEFAULT_REF, help="predictor reference (default predict.py:Predictor)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file on disk is not up to date")
    args = parser.parse_args(argv)
    if args.check:
        fresh = combined_schema(args.ref, train_ref())
        current = json.loads(args.output.read_text(encoding="utf-8")) if args.output.is_file() else None
        if current != fresh:
            print(f"{args.output} is out of date with {args.ref}; run without --check", file=sys.stderr)
            return 1
        return 0
    write_schema(args.output, args.ref)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
