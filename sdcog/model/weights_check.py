"""Checking a pipeline directory before loading it, and explaining a load that fails anyway.

`inspect_weights` runs before diffusers reads anything and turns every damaged-directory case
we know of into a WeightsError that names the file and the command that fixes it (see its
docstring for what is and is not checked); `explain_load_error` does the same for a failure that
still happens inside diffusers' `from_pretrained`. Where the weights are, how they are fetched,
and what to run when a directory is incomplete (`remedy`) is sdcog/model/weights.py, which this module
builds on and never the other way round.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sdcog.model.checkpoints import find_checkpoint, inspect_checkpoint
from sdcog.model.safetensors_files import MAX_HEADER_BYTES, header_length
from sdcog.model.weights import (
    FP16_VARIANT,
    SOURCE_FILE,
    WEIGHTS_ENV,
    WEIGHTS_SUFFIX,
    Problem,
    WeightsError,
    WeightsInfo,
    component_names,
    hub_download_leftovers,
    json_problem,
    read_source,
    what_to_run,
)
from sdcog.pinned_internals import relies_on_internals

_UNSAFE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_LFS_POINTER = b"version https://git-lfs"


@dataclass(frozen=True)
class _Component:
    """One entry of model_index.json: folder name, library and class (what decides the files it needs)."""

    name: str
    library: str
    class_name: str

    @property
    def kind(self) -> str:
        if self.class_name.endswith("Scheduler") or self.name == "scheduler":
            return "scheduler"
        if "Tokenizer" in self.class_name or self.name.startswith("tokenizer"):
            return "tokenizer"
        if "ImageProcessor" in self.class_name or "FeatureExtractor" in self.class_name:
            return "processor"
        return "processor" if self.name == "feature_extractor" else "model"

    @property
    def weights_stem(self) -> str:
        """diffusers models load `diffusion_pytorch_model*.safetensors`; transformers ones `model*`."""
        return "diffusion_pytorch_model" if self.library == "diffusers" else "model"


_REQUIRED_CONFIG = {
    "model": "config.json",
    "scheduler": "scheduler_config.json",
    "processor": "preprocessor_config.json",
}


def _component_specs(model_index: Mapping[str, object]) -> list[_Component]:
    specs = []
    for name in component_names(model_index):
        value = model_index[name]
        library = str(value[0])
        class_name = str(value[1]) if len(value) > 1 else ""
        specs.append(_Component(name, library, class_name))
    return specs


def _weights_error(
    directory: Path, source: Mapping[str, object], problems: list[Problem], purpose: str = ""
) -> WeightsError:
    damaged = [path for _, path in problems if path is not None]
    if len(problems) == 1:
        delete = "it" if damaged else ""
        return WeightsError(f"{problems[0][0]}. {what_to_run(directory, source, delete, purpose)}")
    delete = str(damaged[0]) if len(damaged) == 1 else "the damaged files named above" if damaged else ""
    listing = "\n".join(f"- {text}" for text, _ in problems)
    remedy = what_to_run(directory, source, delete, "to fetch what is missing" if damaged else purpose)
    return WeightsError(f"{directory} is not a complete pipeline:\n{listing}\n{remedy}")


def _unfinished_download(directory: Path, source: Mapping[str, object]) -> Problem | None:
    if source.get("complete") is False:
        return (
            f"{directory / SOURCE_FILE} says the download of {source.get('model_id', 'the model')} into "
            f"{directory} did not finish (it was interrupted)",
            None,
        )
    leftovers = hub_download_leftovers(directory) or []
    if leftovers:
        more = f" (and {len(leftovers) - 1} more)" if len(leftovers) > 1 else ""
        return f"{leftovers[0]}{more} is left over from an interrupted download into {directory}", None
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None; reads its header only.

    safetensors' `safe_open` decides: it maps the file and parses the header, and refuses a file
    whose size is not exactly 8 + header length + the end of the last tensor's data. The wording
    (truncated, empty, HTML page, Git LFS pointer) comes from reading the first bytes ourselves.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except SafetensorError as error:
        return _describe_bad_safetensors(path, str(error))
    except OSError as error:
        return f"{path} cannot be read ({error.strerror or error})"


def _describe_bad_safetensors(path: Path, library_error: str) -> str:
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes): an interrupted copy or download, or a full disk"
    with path.open("rb") as file:
        start = file.read(64)
        if start.startswith(_LFS_POINTER):
            return (
                f"{path} is a Git LFS pointer ({size} bytes), not the weights: the repository was cloned "
                "without git-lfs (`git lfs pull` fetches the real files)"
            )
        if start.lstrip().startswith(b"<"):
            return (
                f"{path} is an HTML/XML page ({size:,} bytes), not safetensors "
                "(an error page saved in its place)"
            )
        if size < 8:
            return f"{path} is truncated: {size} bytes, shorter than a safetensors header"
        length = header_length(start)
        if length > MAX_HEADER_BYTES or start[8:9] not in (b"{", b""):
            return f"{path} is not a safetensors file (it does not start with a header length and JSON)"
        if 8 + length > size:
            return (
                f"{path} is truncated: {size:,} bytes on disk, but its header alone is "
                f"{8 + length:,} bytes (an interrupted copy or download, or a full disk)"
            )
        file.seek(8)
        header = file.read(length)
    try:
        tensors = json.loads(header)
        data_end = max(
            (entry["data_offsets"][1] for name, entry in tensors.items() if name != "__metadata__"),
            default=0,
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path} is not a valid safetensors file (safetensors: {library_error})"
    expected = 8 + length + int(data_end)
    if size < expected:
        return (
            f"{path} is truncated: {size:,} bytes on disk, but its header describes {expected:,} "
            "(an interrupted copy or download, or a full disk)"
        )
    if size > expected:
        return (
            f"{path} has {size - expected:,} bytes more than its header describes ({size:,} on disk, "
            f"{expected:,} expected): damaged"
        )
    return f"{path} is not a valid safetensors file (safetensors: {library_error})"


def _tokenizer_problems(folder: Path, component: _Component) -> list[Problem]:
    """A CLIP tokenizer loads from tokenizer.json, or from vocab.json + merges.txt.

    With neither, transformers 5 does not fail: it builds a tokenizer with a 2-token vocabulary,
    and every prompt comes out as the same tokens.
    """
    if not component.class_name.startswith("CLIPTokenizer"):
        return []
    merges = folder / "merges.txt"
    if merges.is_file() and merges.stat().st_size == 0:
        return [(f"{merges} is empty", merges)]
    if (folder / "tokenizer.json").is_file():
        return []
    missing = [folder / name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if not missing:
        return []
    names = " and ".join(str(path) for path in missing)
    return [
        (
            f"{names} {'is' if len(missing) == 1 else 'are'} missing, and there is no tokenizer.json: "
            f"the {component.class_name} needs vocab.json + merges.txt or tokenizer.json (without them "
            "transformers builds an empty vocabulary and ignores every prompt)",
            None,
        )
    ]


def _weights_candidates(folder: Path, component: _Component, variant: str | None) -> tuple[Path, Path]:
    """The single file and the shard index diffusers/transformers look for, of the given variant."""
    infix = f".{variant}" if variant else ""
    stem = component.weights_stem
    return folder / f"{stem}{infix}{WEIGHTS_SUFFIX}", folder / f"{stem}{WEIGHTS_SUFFIX}.index{infix}.json"


def _has_variant(folder: Path, component: _Component, variant: str | None) -> bool:
    return any(path.is_file() for path in _weights_candidates(folder, component, variant))


def _weights_files(
    folder: Path, component: _Component, variant: str | None, variant_origin: str
) -> tuple[list[Path], list[Problem]]:
    """The weights files loading will read (one file, or the shards an index lists), and what is missing."""
    single, index = _weights_candidates(folder, component, variant)
    files: list[Path] = [single] if single.is_file() else []
    problems: list[Problem] = []
    if index.is_file():
        problem = json_problem(index)
        shards: object = None
        if problem is None:
            listing = json.loads(index.read_text(encoding="utf-8"))
            weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
            if isinstance(weight_map, dict) and weight_map:
                shards = sorted({str(name) for name in weight_map.values()})
            else:
                problem = f"{index} has no weight_map naming its shards"
        if problem:
            return files, [(problem, index)]
        for name in shards:
            shard = folder / name
            if shard.is_file():
                files.append(shard)
            else:
                problems.append((f"{shard} is missing ({index.name} lists it)", None))
    if files or problems:
        return files, problems
    present = sorted(path.name for path in folder.iterdir() if path.is_file())
    other_weights = [name for name in present if name.endswith(WEIGHTS_SUFFIX)]
    pickles = [name for name in present if name.endswith(_UNSAFE_SUFFIXES)]
    if variant and _has_variant(folder, component, None):
        detail = (
            f" ({variant_origin}; {folder.name} has only full-precision weights: a mix of two "
            "downloads, or one interrupted)"
        )
    elif other_weights:
        detail = f" (found {', '.join(other_weights)}, which the {component.class_name} loader does not read)"
    elif pickles:
        detail = f" (only {', '.join(pickles)}: pickle files are never loaded)"
    else:
        detail = ""
    return [], [(f"{single} is missing{detail}", None)]


_IN_CHECKPOINT = frozenset({"unet", "vae", "text_encoder", "text_encoder_2"})
"""The components a single-file checkpoint holds (the rest: optional folders beside it)."""


def inspect_weights(path: Path) -> WeightsInfo:
    """Check that `path` is a complete safetensors pipeline, or a single-file checkpoint with its
    configs beside it; raise WeightsError naming what is wrong.

    `path` is a pipeline directory, a directory holding one checkpoint (see
    `sdcog.model.checkpoints.find_checkpoint`), or a checkpoint file. For a checkpoint, the file is
    checked by `inspect_checkpoint` (family, variant, completeness) and the folders beside it as
    below, except that the UNet, VAE and text encoders' weights come from the file and a safety
    checker is loaded only when its folder has weights.

    Fast by design (SDXL's ~7 GB of weights are never read or hashed): it reads the small JSON and
    text files and the header of each weights file that loading will use. Checked:
    - model_index.json and sdcog-source.json parse; no `script/download-weights` run is still
      marked unfinished, and no huggingface_hub `.incomplete` file that no later run finished is
      left in `.cache/huggingface/download/` (an interrupted download);
    - every component model_index.json names has its folder and the files its loader needs:
      config.json for models, scheduler_config.json, preprocessor_config.json for the feature
      extractor, and for a CLIP tokenizer tokenizer.json or vocab.json + merges.txt; every .json
      file in a component folder parses;
    - every model component has the weights diffusers/transformers will load for the variant
      (`<stem>[.fp16].safetensors`, or a `<stem>.safetensors.index[.fp16].json` whose shards all
      exist); with fp16, a component with only full-precision weights is named (mixed variants);
    - each of those weights files is complete: safetensors' `safe_open` parses the header and
      refuses an empty file, something else saved under the name (an HTML page, a Git LFS
      pointer) and a size other than 8 + header + the end of the tensor data (a truncated file).

    Not checked: the tensor bytes (damage inside a file of the right size needs a full read and a
    hash), whether tensor shapes match the configs (diffusers finds out while loading: wrap that in
    `explain_load_error`), the contents of merges.txt, and files loading does not read (pickles,
    another variant's weights).
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    source, source_problem = read_source(directory)
    if source_problem:
        raise _weights_error(directory, source, [source_problem])
    unfinished = _unfinished_download(directory, source)
    if unfinished:
        raise _weights_error(directory, source, [unfinished], purpose="to finish it")
    file = path if path.is_file() else find_checkpoint(directory, source)
    checkpoint = inspect_checkpoint(file) if file is not None else None
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        raise _weights_error(directory, source, [(f"{index_path} is missing", None)])
    problem = json_problem(index_path)
    if problem:
        raise _weights_error(directory, source, [(problem, index_path)])
    model_index = json.loads(index_path.read_text(encoding="utf-8"))
    if not isinstance(model_index, dict):
        raise _weights_error(directory, source, [(f"{index_path} is not a JSON object", index_path)])
    components = _component_specs(model_index)
    models = [component for component in components if component.kind == "model"]
    if isinstance(source.get("variant"), str | None) and "variant" in source:
        variant = source["variant"]
        variant_origin = f"{SOURCE_FILE} says the {variant} variant was downloaded"
    else:
        with_fp16 = [c.name for c in models if _has_variant(directory / c.name, c, FP16_VARIANT)]
        variant = FP16_VARIANT if with_fp16 else None
        variant_origin = f"{', '.join(with_fp16)} {'has' if len(with_fp16) == 1 else 'have'} fp16 weights"
    problems: list[Problem] = []
    weights_files: list[Path] = []
    for component in components:
        folder = directory / component.name
        if checkpoint is not None and component.kind in ("model", "processor"):
            if component.name in _IN_CHECKPOINT or not folder.is_dir():
                continue  # from the file, or an optional part (a safety checker) left out
        if not folder.is_dir():
            problems.append((f"{folder} is missing (model_index.json names it)", None))
            continue
        for path in sorted(folder.glob("*.json")):
            if ".safetensors.index" not in path.name:
                problem = json_problem(path)
                if problem:
                    problems.append((problem, path))
        required = _REQUIRED_CONFIG.get(component.kind)
        if required and not (folder / required).is_file():
            problems.append((f"{folder / required} is missing", None))
        if component.kind == "tokenizer":
            problems += _tokenizer_problems(folder, component)
        if component.kind == "model":
            files, missing = _weights_files(folder, component, variant, variant_origin)
            weights_files += files
            problems += missing
    for path in weights_files:
        problem = _safetensors_problem(path)
        if problem:
            problems.append((problem, path))
    if problems:
        raise _weights_error(directory, source, problems)
    if checkpoint is not None:
        name = source.get("model_id") or checkpoint.path.stem
        return WeightsInfo(directory=directory, name=str(name), variant=None, checkpoint=checkpoint)
    name = source.get("model_id") or directory.resolve().name
    return WeightsInfo(directory=directory, name=str(name), variant=variant)


def _error_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _path_inside(directory: Path, value: object) -> Path | None:
    """`value` as an existing path strictly inside `directory`, else None (cheap for other values)."""
    if not isinstance(value, str | os.PathLike):
        return None
    text = os.fspath(value)
    if not isinstance(text, str) or len(text) > 4096:
        return None
    roots = {str(directory), str(directory.resolve())}
    if not any(text.startswith(root) for root in roots):
        return None
    path = Path(text)
    try:
        inside = path.resolve().relative_to(directory.resolve())
    except (OSError, ValueError):
        return None
    return path if inside.parts and path.exists() else None


def _frames(traceback: TracebackType | None) -> list:
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    return frames


@relies_on_internals("diffusers", "0.42.1", "its loaders' frames holding the path they load in a local")
def _culprit(directory: Path, error: BaseException) -> Path:
    """The file or component folder a loading error is about: named in its message, else held by
    the innermost traceback frame that had a path inside `directory`; else `directory` itself."""
    chain = _error_chain(error)
    pattern = "|".join(re.escape(root) for root in {str(directory), str(directory.resolve())})
    for current in chain:
        for match in re.finditer(f"(?:{pattern})[^\\s'\"`,;()]*", str(current)):
            found = _path_inside(directory, match.group(0).rstrip("."))
            if found:
                return found
    for current in chain:
        for frame in reversed(_frames(current.__traceback__)):
            found = [
                path for value in list(frame.f_locals.values()) if (path := _path_inside(directory, value))
            ]
            if found:
                return min(found, key=lambda path: (not path.is_file(), len(str(path))))
    return directory


def _is_out_of_memory(error: BaseException) -> bool:
    return any(
        isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError"
        for current in _error_chain(error)
    )


def explain_load_error(directory: Path, error: BaseException) -> WeightsError:
    """Word an exception from diffusers' `from_pretrained(directory)` as a WeightsError.

    The checks run again first: a file damaged since setup checked it gets their message. Else it
    is something they cannot see (weights whose shapes do not match their config.json, a loader
    error of a newer library): the message names the file or component folder being loaded (from
    the error's text, else from the innermost traceback frame that held a path inside
    `directory`), keeps the error's first line and says what to run. Running out of memory is
    said as such. Use: `raise explain_load_error(directory, error) from error`.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0][:400] if lines else '(no message)'}"
    if _is_out_of_memory(error):
        return WeightsError(
            f"Ran out of memory while loading {directory} ({reason}). The files are not the problem: "
            f"use a machine with more memory, or point {WEIGHTS_ENV} at a smaller model."
        )
    try:
        inspect_weights(directory)  # changed since setup checked it?
    except WeightsError as found:
        return found
    source = read_source(directory)[0]
    culprit = _culprit(directory, error)
    return WeightsError(
        f"Loading {culprit} failed ({reason}). The files passed the checks before loading, so it is "
        "probably weights that do not match their config.json, or damage inside a file. "
        f"{what_to_run(directory, source, delete='it')}"
    )
