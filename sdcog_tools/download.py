"""`script/download-weights`: fetch a model into weights/ (a diffusers pipeline from the Hugging Face
hub, or a single-file checkpoint with its family's configs: sdcog_tools/checkpoint_download.py), and
bake ControlNets (`--controlnet NAME`) and preprocessor weights (`--preprocessor depth`) into
controlnets/, and the SDXL refiner (`--refiner`) into refiner/, where setup() finds them offline
(see sdcog/generate/controlnets.py and refiner.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from sdcog.errors import InputError
from sdcog.fetch.adapter_references import DIFFUSERS_MODEL_FILE, hub_file_url
from sdcog.fetch.control_maps import DEPTH, PREPROCESSORS_DIR
from sdcog.fetch.input_files import fetch_url_to
from sdcog.generate.controlnets import BAKED_CONTROLNETS_DIR, CONFIG_FILE, baked_dir
from sdcog.generate.refiner import BAKED_REFINER_DIR
from sdcog.model.checkpoints import PREDICTION_TYPES
from sdcog.model.families import detect_family
from sdcog.model.safetensors_files import NotSafetensors, described_size, read_header
from sdcog.model.weights import (
    DEFAULT_MODEL_ID,
    DEFAULT_WEIGHTS_DIR,
    WeightsError,
    download_pipeline,
    resolve_weights_dir,
)
from sdcog.model.weights_check import inspect_weights
from sdcog.resolve.control import CONTROLNETS
from sdcog.resolve.few_step import SETTING_CHOICES
from sdcog_tools.checkpoint_download import download_checkpoint, refuse_another_model
from sdcog_tools.checkpoint_references import DownloadError, Options, PipelineRepo, parse_reference
from sdcog_tools.hub_checkpoint import hub_errors, hub_failure, resolve_repo
from sdcog_tools.url_download import DOWNLOAD_TOKEN_ENV

REFINER_REPOSITORY = "stabilityai/stable-diffusion-xl-refiner-1.0"
DEPTH_REPOSITORY = "depth-anything/Depth-Anything-V2-Small-hf"
"""The depth estimator baked by `--preprocessor depth` (Apache-2.0, 25 M parameters, transformers' own)."""
FP16_FILE = "diffusion_pytorch_model.fp16.safetensors"
NO_LIMIT = 100 * 10**9


def _fetch(repository: str, name: str, out: Path, token: str | None) -> Path:
    """One file of a Hugging Face repository (HF_ENDPOINT honoured), written whole or not at all."""
    url = hub_file_url(repository, name)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as partial:
        try:
            fetch_url_to(partial, "download", url, NO_LIMIT, headers=headers)
        except BaseException:
            Path(partial.name).unlink(missing_ok=True)
            raise
    os.replace(partial.name, out)
    return out


def _verified_safetensors(path: Path) -> None:
    """A downloaded weights file that is not a whole safetensors file (its header parses and the
    file ends where the header says) is deleted and refused."""
    try:
        size, expected = path.stat().st_size, described_size(*read_header(path))
        if size != expected:
            raise NotSafetensors(f"{size:,} bytes, its header describes {expected:,}")
    except NotSafetensors as error:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{path.name} is not a whole safetensors file ({error}); nothing was kept"
        ) from error


def controlnet_repository(name: str, family_key: str) -> str:
    """The repository of a ControlNet name for a family, or the repository given."""
    known = CONTROLNETS.get(name.lower())
    if known is None:
        return name.removeprefix("https://huggingface.co/").removeprefix("huggingface.co/").strip("/")
    repository = known.repositories.get(family_key)
    if repository is None:
        raise DownloadError(f"{name} has no ControlNet for {family_key} models here")
    return repository


def bake_controlnet(
    name: str, family_key: str, root: Path = BAKED_CONTROLNETS_DIR, token: str | None = None
) -> Path:
    """The ControlNet's config.json and weights (fp16 when the repository has them) in
    controlnets/<owner>--<repo>/, where setup() reads it instead of fetching it."""
    repository = controlnet_repository(name, family_key)
    directory = baked_dir(repository, root)
    _fetch(repository, CONFIG_FILE, directory / CONFIG_FILE, token)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("_class_name") != "ControlNetModel":
        raise DownloadError(
            f"{repository} is not a diffusers ControlNet (its config names {config.get('_class_name')!r})"
        )
    for weights in (FP16_FILE, DIFFUSERS_MODEL_FILE):
        try:
            path = _fetch(repository, weights, directory / weights, token)
        except InputError:
            continue
        _verified_safetensors(path)
        return directory
    raise DownloadError(f"{repository} has neither {FP16_FILE} nor {DIFFUSERS_MODEL_FILE}")


def bake_preprocessor(name: str, root: Path = PREPROCESSORS_DIR, token: str | None = None) -> Path:
    """A preprocessor's weights (transformers format) in controlnets/preprocessors/<name>/."""
    if name != DEPTH:
        raise DownloadError(f"no preprocessor named {name!r} needs weights (only {DEPTH} does)")
    directory = root / name
    for file in ("config.json", "preprocessor_config.json", "model.safetensors"):
        _fetch(DEPTH_REPOSITORY, file, directory / file, token)
    _verified_safetensors(directory / "model.safetensors")
    return directory


def bake_refiner(root: Path = BAKED_REFINER_DIR, token: str | None = None) -> Path:
    """The SDXL refiner's UNet (fp16 when the repository has it, saved under the plain name) and
    the configs its loading reads, in refiner/: its VAE and text encoder are the base's, so their
    weights are not fetched."""
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
        _fetch(REFINER_REPOSITORY, name, root / name, token)
    target = root / "unet" / DIFFUSERS_MODEL_FILE
    for weights in (FP16_FILE, DIFFUSERS_MODEL_FILE):
        try:
            _fetch(REFINER_REPOSITORY, f"unet/{weights}", target, token)
        except InputError:
            continue
        _verified_safetensors(target)
        return root
    raise DownloadError(f"{REFINER_REPOSITORY} has neither unet/{FP16_FILE} nor unet/{DIFFUSERS_MODEL_FILE}")


def download_model(reference: str, args: argparse.Namespace, token: str | None) -> None:
    """A diffusers pipeline repo with `download_pipeline`, anything else as a single-file checkpoint."""
    options = Options(
        hf_token=token,
        url_token=args.token or os.environ.get(DOWNLOAD_TOKEN_ENV) or None,
        sha256=args.sha256,
        prediction_type=args.prediction_type,
        few_step=args.few_step,
    )
    target = parse_reference(reference, args.revision)
    commit = None
    if isinstance(target, PipelineRepo):
        target, commit = resolve_repo(target.repo, target.revision, token)
    if not isinstance(target, PipelineRepo):
        download_checkpoint(target, reference, args.dest, options, commit)
        return
    destination = args.dest or DEFAULT_WEIGHTS_DIR
    if options.declarations() or options.sha256:
        raise DownloadError(
            f"{target.repo} is a diffusers pipeline: --sha256, --prediction-type and --few-step are for "
            "single-file checkpoints (a pipeline's scheduler config says its prediction type)"
        )
    refuse_another_model(destination, reference, model_id=target.repo)
    try:
        directory = download_pipeline(target.repo, destination, args.revision, token=token)
    except hub_errors() as error:
        raise hub_failure(error, target.repo, "run the same command again to finish it") from error
    info = inspect_weights(directory)
    print(
        f"{target.repo} ({info.variant or 'full precision'}) is in {directory}; setup() loads it from there."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/download-weights", description=__doc__)
    parser.add_argument(
        "model_id",
        nargs="?",
        default=None,
        metavar="REF",
        help="what to download: owner/repo (a diffusers pipeline, or a repo with one checkpoint "
        ".safetensors at its root), owner/repo/<file>.safetensors, a huggingface.co/<owner>/<repo>/"
        "resolve/<rev>/<file> URL, another https:// URL (Civitai...), or a local .safetensors file "
        f"(its configs are fetched beside it). Default {DEFAULT_MODEL_ID}, unless only extras are asked for",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="target directory (default weights/; for a local checkpoint, its own directory)",
    )
    parser.add_argument(
        "--sha256", metavar="HEX", help="a checkpoint's expected sha256 (else the hub's, else recorded)"
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token for a plain URL (default: ${DOWNLOAD_TOKEN_ENV}); HF_TOKEN for the hub",
    )
    parser.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="declare a checkpoint's prediction type (used when the file has no marker of its own)",
    )
    parser.add_argument(
        "--few-step",
        choices=SETTING_CHOICES,
        help="declare a checkpoint's few-step kind (used when the file has no marker of its own)",
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME",
        help=f"bake a ControlNet into the image: a name ({', '.join(CONTROLNETS)}) for the model's family, "
        "or a Hugging Face repository in diffusers format (repeatable)",
    )
    parser.add_argument(
        "--refiner",
        action="store_true",
        help=f"bake the SDXL refiner ({REFINER_REPOSITORY}: its UNet only) into refiner/, for `refine`",
    )
    parser.add_argument(
        "--preprocessor", action="append", default=[], choices=[DEPTH], help="bake a preprocessor's weights"
    )
    args = parser.parse_args(argv)
    token = os.environ.get("HF_TOKEN")
    try:
        if args.model_id is not None or not (args.controlnet or args.preprocessor or args.refiner):
            download_model(args.model_id or DEFAULT_MODEL_ID, args, token)
        if args.controlnet:
            weights = resolve_weights_dir()
            family = detect_family(weights)
            for name in args.controlnet:
                baked = bake_controlnet(name, family.key, token=token)
                print(f"ControlNet {name} for {family.label} ({weights.name}) is in {baked}.")
        if args.refiner:
            print(f"the SDXL refiner is in {bake_refiner(token=token)}; setup() loads it with an SDXL base.")
        for name in args.preprocessor:
            print(f"the {name} preprocessor's weights are in {bake_preprocessor(name, token=token)}.")
    except (WeightsError, DownloadError, InputError) as error:
        print(f"download-weights: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("download-weights: interrupted; run the same command again to finish.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
