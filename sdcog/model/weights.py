"""Where the weights are and how to fetch them.

The model serves one diffusers-format pipeline directory (safetensors only), or one single-file
checkpoint beside its family's configs (sdcog/model/checkpoints.py):
- what the environment variable MODEL_WEIGHTS names, when it is set (a directory, or a checkpoint
  file whose directory holds the configs);
- else `weights/` in the project root, which `script/download-weights MODEL_ID` fills;
- else the small bundled model in `models/shapes-sd` (trained by `script/train-bundled-model`),
  so a fresh clone generates real (if tiny) pictures with no download.

Loading is always offline (`local_files_only`): the container never reaches the hub at boot.
Checking a directory before loading it, and explaining a failed load, is sdcog/model/weights_check.py,
which words its errors with `remedy` from here.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdcog.pinned_internals import relies_on_internals

if TYPE_CHECKING:  # checkpoints.py builds on this module
    from sdcog.model.checkpoints import CheckpointInfo

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # sdcog/model/weights.py -> the project
DEFAULT_WEIGHTS_DIR = PROJECT_ROOT / "weights"
BUNDLED_MODEL_DIR = PROJECT_ROOT / "models" / "shapes-sd"
"""The small model trained on the shapes world (`script/train-bundled-model`): the offline default."""
WEIGHTS_ENV = "MODEL_WEIGHTS"
DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SOURCE_FILE = "sdcog-source.json"
"""Written by `download_pipeline` next to model_index.json: where the weights came from. It says
`"complete": false` while the download runs, so an interrupted one is recognised at setup."""

FP16_VARIANT = "fp16"
WEIGHTS_SUFFIX = ".safetensors"
_HUB_DOWNLOAD_DIR = Path(".cache") / "huggingface" / "download"


class WeightsError(RuntimeError):
    """The weights are missing or unusable; the message names the file and says what to run."""


@dataclass(frozen=True)
class WeightsInfo:
    directory: Path
    name: str
    """A short model name for metadata: the hub id it came from, else the directory name."""
    variant: str | None
    """The weights variant to load ("fp16" or None): the one sdcog-source.json records, else "fp16"
    when the model components have `*.fp16.safetensors` files (or an fp16 shard index)."""
    checkpoint: CheckpointInfo | None = None
    """The single-file checkpoint's `CheckpointInfo` (sdcog/model/checkpoints.py); None for a
    diffusers pipeline folder."""


def resolve_weights_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The pipeline directory to load: MODEL_WEIGHTS if set, else weights/, else the bundled model.

    A weights/ that holds a download but no model_index.json (a download interrupted before that
    file arrived) is an error, not a silent fall back to the bundled model.
    """
    configured = environ.get(WEIGHTS_ENV, "").strip()
    if configured:
        directory = Path(configured).expanduser()
        if directory.is_file():  # a checkpoint: its configs beside it
            if not (directory.parent / "model_index.json").is_file():
                raise missing_configs_error(directory)
            return directory
        if not (directory / "model_index.json").is_file():
            lone = _lone_checkpoint(directory)
            if lone is not None:
                raise missing_configs_error(lone)
            raise WeightsError(
                f"{WEIGHTS_ENV}={configured} is not a diffusers pipeline directory "
                f"(no {directory / 'model_index.json'}). Point {WEIGHTS_ENV} at one, or unset it and "
                f"run `script/download-weights {DEFAULT_MODEL_ID}` to fill weights/."
            )
        return directory
    if (DEFAULT_WEIGHTS_DIR / "model_index.json").is_file():
        return DEFAULT_WEIGHTS_DIR
    lone = _lone_checkpoint(DEFAULT_WEIGHTS_DIR)
    if lone is not None and not (DEFAULT_WEIGHTS_DIR / SOURCE_FILE).is_file():
        raise missing_configs_error(lone)
    downloading = hub_download_leftovers(DEFAULT_WEIGHTS_DIR) is not None
    if (DEFAULT_WEIGHTS_DIR / SOURCE_FILE).is_file() or downloading:
        raise partial_download_error(DEFAULT_WEIGHTS_DIR)
    if (BUNDLED_MODEL_DIR / "model_index.json").is_file():
        return BUNDLED_MODEL_DIR
    raise WeightsError(
        f"No model weights: neither {DEFAULT_WEIGHTS_DIR} nor the bundled {BUNDLED_MODEL_DIR} holds a "
        f"model_index.json, and {WEIGHTS_ENV} is not set. Run `script/train-bundled-model`, or"
        f" run `script/download-weights {DEFAULT_MODEL_ID}` (or another diffusers Stable "
        f"Diffusion repo id), or set {WEIGHTS_ENV}=/path/to/a/diffusers/pipeline "
        "(`script/make-random-pipeline tiny-sd15 DIR` makes a tiny random-weight one for trying things)."
    )


def _lone_checkpoint(directory: Path) -> Path | None:
    """A checkpoint file put in a directory without the configs it needs (the first one)."""
    if not directory.is_dir():
        return None
    found = sorted(
        path
        for path in directory.iterdir()
        if path.suffix.lower() in (WEIGHTS_SUFFIX, ".ckpt") and not path.name.endswith(".vae.safetensors")
    )
    return found[0] if found else None


def missing_configs_error(checkpoint: Path) -> WeightsError:
    return WeightsError(
        f"{checkpoint} is a single file without the configs and tokenizers of its family beside it "
        f"(no {checkpoint.parent / 'model_index.json'}); setup never fetches them from a hub. Run "
        f"`script/download-weights {shlex.quote(str(checkpoint))}` once: it reads what the file is "
        "and fetches them beside it."
    )


def component_names(model_index: Mapping[str, object]) -> list[str]:
    """Component folders model_index.json names (like "unet": ["diffusers", "UNet2DConditionModel"])."""
    return [
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    ]


def _has_weights(component: str) -> bool:
    return not (component.startswith("tokenizer") or component in {"scheduler", "feature_extractor"})


def _weight_files(component: str, files: list[str], variant: str | None) -> list[str]:
    """One component's safetensors files in the repo listing, of the given variant (None: full precision)."""
    suffix = f".{variant}{WEIGHTS_SUFFIX}" if variant else WEIGHTS_SUFFIX
    return [
        name
        for name in files
        if name.startswith(f"{component}/") and name.endswith(suffix) and (variant or name.count(".") == 1)
    ]


def download_pipeline(
    model_id: str,
    destination: Path = DEFAULT_WEIGHTS_DIR,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Fetch a diffusers Stable Diffusion pipeline from the Hugging Face hub into `destination`.

    Only what loading needs is fetched: configs, tokenizer files and one safetensors set per
    component (the fp16 variant when every weighted component has one, else full precision).
    Pickle weights, single-file checkpoints, ONNX and Flax files are skipped. sdcog-source.json
    says `"complete": false` until every file is in place. A file already there from an earlier run
    of the same revision may be kept as it is (huggingface_hub trusts its own bookkeeping), so a
    damaged one should be deleted first; `inspect_weights` says which.
    """
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(token=token)
    info = api.model_info(model_id, revision=revision, files_metadata=False)
    files = [sibling.rfilename for sibling in info.siblings or []]
    if "model_index.json" not in files:
        raise WeightsError(f"{model_id} has no model_index.json: it is not a diffusers pipeline repo")
    index_file = api.hf_hub_download(model_id, "model_index.json", revision=info.sha)
    components = component_names(json.loads(Path(index_file).read_text(encoding="utf-8")))
    weighted = [component for component in components if _has_weights(component)]
    variant = FP16_VARIANT if all(_weight_files(c, files, FP16_VARIANT) for c in weighted) else None
    patterns = ["model_index.json"]
    for component in components:
        patterns += [f"{component}/*.json", f"{component}/*.txt"]
    for component in weighted:
        chosen = _weight_files(component, files, variant)
        if not chosen:
            raise WeightsError(f"{model_id}: component {component} has no .safetensors weights")
        patterns += chosen
    destination.mkdir(parents=True, exist_ok=True)
    source = {"model_id": model_id, "revision": info.sha, "variant": variant}
    source_path = destination / SOURCE_FILE
    # Marked unfinished until snapshot_download returns: setup names an interrupted download.
    source_path.write_text(json.dumps({**source, "complete": False}, indent=2) + "\n", encoding="utf-8")
    snapshot_download(
        model_id, revision=info.sha, local_dir=destination, allow_patterns=patterns, token=token
    )
    source_path.write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return destination


@relies_on_internals(
    "huggingface_hub",
    "2.4.0",
    "a local_dir download's bookkeeping: .cache/huggingface/download/, <file>.metadata (its etag on "
    "line 2), <hash>.<etag>[.<id>].incomplete",
)
def hub_download_leftovers(directory: Path) -> list[Path] | None:
    """huggingface_hub's partial files in a `local_dir` download that no later run finished; None
    when `directory` holds no huggingface_hub bookkeeping at all.

    huggingface_hub 2.4 downloads each file to `.cache/huggingface/download/<folder>/
    <hash>.<etag>.<id>.incomplete` and moves it into place when complete (removing the partial file
    on an ordinary error or Ctrl-C; a killed process or a lost machine leaves it). A leftover whose
    etag a `<file>.metadata` in the same folder records was downloaded again afterwards: stale.
    """
    download_dir = directory / _HUB_DOWNLOAD_DIR
    if not download_dir.is_dir():
        return None
    finished: dict[Path, set[str]] = {}
    leftovers = []
    for path in sorted(download_dir.rglob("*.incomplete")):
        if path.parent not in finished:
            finished[path.parent] = set()
            for metadata in path.parent.glob("*.metadata"):
                try:
                    lines = metadata.read_text(encoding="utf-8").splitlines()
                except (OSError, UnicodeDecodeError):
                    continue
                if len(lines) >= 2:
                    finished[path.parent].add(lines[1].strip())
        parts = path.name.split(".")
        if len(parts) >= 3 and parts[1] in finished[path.parent]:
            continue
        leftovers.append(path)
    return leftovers


# -- what to run when a weights directory is incomplete (sdcog/model/weights_check.py words the rest) --

Problem = tuple[str, Path | None]
"""What is wrong, and the file to delete before fetching it again (None: nothing to delete)."""


def _same_dir(first: Path, second: Path) -> bool:
    try:
        return first.resolve() == second.resolve()
    except OSError:
        return False


def read_source(directory: Path) -> tuple[dict, Problem | None]:
    """sdcog-source.json (empty when absent), and the problem when it does not parse."""
    path = directory / SOURCE_FILE
    if not path.is_file():
        return {}, None
    problem = json_problem(path)
    if problem:
        return {}, (problem, path)
    source = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(source, dict):
        return {}, (f"{path} is not a JSON object", path)
    return source, None


def what_to_run(directory: Path, source: Mapping[str, object], delete: str = "", purpose: str = "") -> str:
    """What to run: restore the bundled model, or fetch the pipeline again (after deleting `delete`)."""
    if _same_dir(directory, BUNDLED_MODEL_DIR):
        return (
            "Restore the bundled model with `git checkout -- models/shapes-sd`, or rebuild it with "
            "`script/train-bundled-model`."
        )
    model_id = source.get("model_id")
    command = f"script/download-weights {model_id or DEFAULT_MODEL_ID}"
    if not _same_dir(directory, DEFAULT_WEIGHTS_DIR):
        command += f" --dest {shlex.quote(str(directory))}"
    origin = "" if model_id else " (or the hub repo id these weights came from)"
    start = f"Delete {delete}, then run" if delete else "Run"
    purpose = purpose or ("to fetch it again" if delete else "to fetch what is missing")
    return f"{start} `{command}`{origin} {purpose}, or point {WEIGHTS_ENV} at a complete pipeline."


def partial_download_error(directory: Path) -> WeightsError:
    """What `resolve_weights_dir` raises for a weights/ that holds part of a download (an
    sdcog-source.json or huggingface_hub's bookkeeping) but no model_index.json."""
    source = read_source(directory)[0]
    return WeightsError(
        f"{directory / 'model_index.json'} is missing, but {directory} holds part "
        f"of a download (an interrupted `script/download-weights`). "
        f"{what_to_run(directory, source, purpose='to finish it')} To serve the bundled model "
        f"instead, empty {directory} (keep its README.md)."
    )


def json_problem(path: Path) -> str | None:
    """Why `path` is not a JSON file, or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"{path} is not JSON (not even UTF-8 text)"
    except OSError as error:
        return f"{path} cannot be read ({error.strerror or error})"
    if not text.strip():
        return f"{path} is empty"
    if text.lstrip().startswith("<"):
        return f"{path} is an HTML/XML page, not JSON (an error page saved in the file's place)"
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return (
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}: truncated?)"
        )
    return None
