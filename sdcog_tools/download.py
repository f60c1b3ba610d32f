"""`script/download-weights`: fetch a diffusers pipeline from the Hugging Face hub into weights/."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sdcog.model.weights import DEFAULT_MODEL_ID, DEFAULT_WEIGHTS_DIR, WeightsError, download_pipeline
from sdcog.model.weights_check import inspect_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/download-weights", description=__doc__)
    parser.add_argument(
        "model_id", nargs="?", default=DEFAULT_MODEL_ID, help=f"hub repo id (default {DEFAULT_MODEL_ID})"
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_WEIGHTS_DIR, help="target directory (default weights/)"
    )
    args = parser.parse_args(argv)
    try:
        directory = download_pipeline(
            args.model_id, args.dest, args.revision, token=os.environ.get("HF_TOKEN")
        )
        info = inspect_weights(directory)
    except WeightsError as error:
        print(f"download-weights: {error}", file=sys.stderr)
        return 1
    variant = info.variant or "full precision"
    print(f"{args.model_id} ({variant}) is in {directory}; setup() loads it from there.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
