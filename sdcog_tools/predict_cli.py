"""`script/predict` and `script/train`: the `cog predict` and `cog train` experience without Docker.

Starts Cog's own HTTP server on 127.0.0.1 (a free port), sends one prediction, writes the images
it returns to files, and stops the server:

    script/predict -i prompt="a red circle on a blue background" -i seed=1 -o output/

With `--train` (script/train), the server runs in training mode and one training's
`trained_model.tar` is written to the output directory:

    script/train -i input_images=@photos.zip -i max_train_steps=500 -o output/

`-i name=value` is typed by the model's OpenAPI schema (integers, numbers, booleans); for file
inputs, `-i image=@photo.png` sends a local file (as a data URI) and a URL is passed through; so
does `@file` for a string input when the file exists (`-i lora_weights=@output/trained_model.tar`).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

from sdcog.model.weights import PROJECT_ROOT
from sdcog_tools.cog_schema import train_ref, write_schema
from sdcog_tools.cog_server import running_server

SCHEMA_PATH = PROJECT_ROOT / ".cog" / "openapi_schema.json"
PREDICTION_TIMEOUT_S = 3600.0


class UsageError(ValueError):
    pass


def _file_to_data_uri(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def coerce_input(name: str, raw: str, properties: dict[str, Any]) -> Any:
    """Type one `-i name=value` by the schema, as `cog predict` does."""
    if name not in properties:
        raise UsageError(f"unknown input {name!r}; inputs are: {', '.join(properties)}")
    spec = properties[name]
    kind = spec.get("type")
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError as error:
        raise UsageError(
            f"{name} must be {'an' if kind == 'integer' else 'a'} {kind}, got {raw!r}"
        ) from error
    if kind == "boolean":
        if raw.lower() not in {"true", "false", "1", "0"}:
            raise UsageError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in {"true", "1"}
    if raw.startswith("@") and (spec.get("format") == "uri" or Path(raw[1:]).is_file()):
        # a file input, or a local file for a string input that takes data URIs (lora_weights)
        return _file_to_data_uri(Path(raw[1:]))
    return raw


def parse_inputs(pairs: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, separator, raw = pair.partition("=")
        if not separator:
            raise UsageError(f"-i takes name=value, got {pair!r}")
        inputs[name] = coerce_input(name, raw, properties)
    return inputs


def _decode_data_uri(uri: str) -> tuple[bytes, str]:
    header, _, payload = uri.partition(",")
    mime = header.removeprefix("data:").split(";")[0]
    extension = {"image/jpeg": ".jpg", "image/webp": ".webp", "image/png": ".png"}.get(
        mime, mimetypes.guess_extension(mime) or ".bin"
    )
    return base64.b64decode(payload), extension


def save_outputs(output: Any, directory: Path) -> list[Path]:
    """Write each data-URI output to `directory` as output.N.ext, as `cog predict` names them."""
    items = output if isinstance(output, list) else [output]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, item in enumerate(items):
        data, extension = _decode_data_uri(item)
        path = directory / f"output.{index}{extension}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def save_weights(output: Any, directory: Path) -> Path:
    """A training's `weights` (a data URI of the tar) as trained_model.tar in `directory`."""
    data, _ = _decode_data_uri(output["weights"])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trained_model.tar"
    path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="run cog.yaml's trainer (script/train)")
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("output"), help="directory (default output/)"
    )
    args = parser.parse_args(argv)

    schema = write_schema(SCHEMA_PATH)
    properties = schema["components"]["schemas"]["TrainingInput" if args.train else "Input"]["properties"]
    try:
        inputs = parse_inputs(args.input, properties)
    except UsageError as error:
        parser.error(str(error))

    print("starting the Cog server...", file=sys.stderr)
    if args.train:
        with running_server(PROJECT_ROOT, train_ref(), train=True) as server:
            response = server.train(inputs, timeout=PREDICTION_TIMEOUT_S * 24)
    else:
        with running_server(PROJECT_ROOT, "predict.py:Predictor") as server:
            response = server.predict(inputs, timeout=PREDICTION_TIMEOUT_S)
    body = response.json()
    if body.get("logs"):
        print(body["logs"].rstrip(), file=sys.stderr)
    if response.status_code != 200 or body.get("status") != "succeeded":
        detail = body.get("error") or body.get("detail") or body
        what = "training" if args.train else "prediction"
        print(f"{what} failed ({response.status_code}): {json.dumps(detail)}", file=sys.stderr)
        return 1
    for path in (
        [save_weights(body["output"], args.output)]
        if args.train
        else save_outputs(body["output"], args.output)
    ):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
