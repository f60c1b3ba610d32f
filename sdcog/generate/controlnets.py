"""ControlNets for requests: fetched once (a size-bounded LRU cache on disk, as LoRAs are), kept
loaded (a few, least recently used out first), checked against the loaded model, and given to the
request's pipeline only: the shared pipeline never holds one, so no request leaves a ControlNet
attached for the next, and a request without ControlNet runs the plain pipeline as before.

Where a ControlNet's weights come from, first found first:
- the bundled `shapes-silhouette` (models/shapes-controlnet), for the bundled model;
- a ControlNet baked into the image by `script/download-weights --controlnet NAME`, in
  `controlnets/<owner>--<repo>/` (diffusers format), for a short name or that repository;
- the ControlNet cache (`SDCOG_CONTROLNET_CACHE`, default ~/.cache/sdcog/controlnets), where a
  reference is fetched once: a Hugging Face repository's `diffusion_pytorch_model.safetensors` and
  `config.json`, or a `.safetensors` file (URL, data URI, Replicate tar) in diffusers' or the
  original ControlNet's key format, whose configuration is the loaded UNet's (a full-size
  ControlNet, as diffusers' `ControlNetModel.from_unet` makes).

Operator settings:
- `SDCOG_CONTROLNET_CACHE_GB` (default 40): the most the cached files may take (SDXL ControlNets
  are 2.5 GB in fp16, 5 GB in fp32);
- `SDCOG_MAX_CONTROLNET_MB` (default 6000): the most one reference may download;
- `SDCOG_CONTROLNETS_LOADED` (default 3): ControlNets kept loaded between requests.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load_file

from sdcog.errors import InputError
from sdcog.fetch.adapter_cache import AdapterCache, AdapterFile, adapter_tokens
from sdcog.fetch.adapter_references import DIFFUSERS_MODEL_FILE as WEIGHTS_FILE
from sdcog.fetch.adapter_references import AdapterKind, hub_file_url
from sdcog.fetch.input_files import fetch_url_to
from sdcog.model.safetensors_files import sha256_of
from sdcog.model.weights import PROJECT_ROOT
from sdcog.pinned_internals import relies_on_internals
from sdcog.resolve.control import BUNDLED_CONTROLNET, ControlRequest
from sdcog.resolve.request import GenerationRequest

if TYPE_CHECKING:
    from sdcog.generate.engine import Engine

log = logging.getLogger(__name__)

BUNDLED_CONTROLNET_DIR = PROJECT_ROOT / "models" / "shapes-controlnet"
BAKED_CONTROLNETS_DIR = PROJECT_ROOT / "controlnets"
CACHE_DIR_ENV = "SDCOG_CONTROLNET_CACHE"
CACHE_GB_ENV = "SDCOG_CONTROLNET_CACHE_GB"
MAX_MB_ENV = "SDCOG_MAX_CONTROLNET_MB"
LOADED_ENV = "SDCOG_CONTROLNETS_LOADED"
CONFIG_FILE = "config.json"
_ORIGINAL_PREFIX = "control_model."
_FAMILY_BY_CROSS_ATTENTION = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}


def baked_dir(repository: str, root: Path = BAKED_CONTROLNETS_DIR) -> Path:
    """Where `script/download-weights --controlnet` puts a repository's ControlNet."""
    return root / repository.replace("/", "--")


@dataclass(frozen=True)
class LoadedControlNet:
    """A request's ControlNet slot with its model, ready for the pipeline."""

    control: ControlRequest
    model: ControlNetModel
    hash: str
    """The first 10 hex digits of its weights' sha256 (AUTOMATIC1111's short hash), for metadata."""
    file: AdapterFile | None = None
    """Its file in the cache (None: bundled or baked), held against eviction until released."""


def describe_family(config: Mapping) -> str:
    """The model family a ControlNet (or UNet) configuration belongs to, in words."""
    if config.get("addition_embed_type") == "text_time":
        return "Stable Diffusion XL"
    return _FAMILY_BY_CROSS_ATTENTION.get(
        config.get("cross_attention_dim"), "a Stable Diffusion 1.x/2.x-like model"
    )


_MUST_MATCH = ("cross_attention_dim", "block_out_channels", "layers_per_block")


def check_fits(field: str, name: str, config: Mapping, unet_config: Mapping) -> None:
    """Refuse a ControlNet whose residuals cannot be added to this UNet's (another family, or
    another architecture of it), naming the field."""
    mismatched = [key for key in _MUST_MATCH if _listed(config.get(key)) != _listed(unet_config.get(key))]
    xl = config.get("addition_embed_type") == "text_time"
    if xl != (unet_config.get("addition_embed_type") == "text_time"):
        mismatched.append("addition_embed_type")
    if mismatched:
        theirs, ours = describe_family(config), describe_family(unet_config)
        family = f"a ControlNet for {theirs}" if theirs != ours else "made for another model of this family"
        raise InputError(
            field,
            f"{name} is {family}; this model is {ours} (its {', '.join(mismatched)} differ from the "
            "model's): choose a ControlNet made for this model's family",
        )


def _listed(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


class ControlNets:
    def __init__(
        self,
        unet: torch.nn.Module,
        dtype: torch.dtype,
        device: torch.device,
        cache: AdapterCache,
        max_loaded: int = 3,
        baked: Path = BAKED_CONTROLNETS_DIR,
        bundled: Path = BUNDLED_CONTROLNET_DIR,
    ):
        self.unet_config = dict(unet.config)
        self.dtype, self.device = dtype, device
        self.cache = cache
        self.max_loaded = max_loaded
        self.baked, self.bundled = Path(baked), Path(bundled)
        self.loads = 0
        self._loaded: OrderedDict[str, ControlNetModel] = OrderedDict()
        self._digests: dict[tuple[str, int, int], str] = {}
        """A bundled or baked file's sha256 by (path, size, mtime): hashed once, not per request."""
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, engine: Engine, environ: Mapping[str, str] = os.environ) -> ControlNets:
        """For the engine's model (its UNet, dtype and device), with the operator's settings."""
        unet, device = engine.pipeline.unet, engine.device
        dtype = unet.dtype
        root = environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "sdcog" / "controlnets"
        cache = AdapterCache(
            Path(root),
            max_bytes=int(float(environ.get(CACHE_GB_ENV) or 40) * 1e9),
            max_file_bytes=int(float(environ.get(MAX_MB_ENV) or 6000) * 1e6),
        )
        return cls(unet, dtype, device, cache, max_loaded=int(environ.get(LOADED_ENV) or 3))

    def fetch_for(
        self, request: GenerationRequest, tokens: Mapping[str, str] | None = None
    ) -> tuple[LoadedControlNet, ...]:
        """Each of the request's ControlNets, fetched (or from the disk) and loaded (or from memory);
        its files are held against eviction until `release`."""
        tokens = adapter_tokens() if tokens is None else tokens
        loaded: list[LoadedControlNet] = []
        try:
            for control in request.controlnets:
                loaded.append(
                    self._fetch(control, tokens, {item.file.sha256 for item in loaded if item.file})
                )
        except BaseException:
            self.release(tuple(loaded))
            raise
        return tuple(loaded)

    def release(self, controlnets: tuple[LoadedControlNet, ...]) -> None:
        """The request is done with its ControlNets: their cached files may be evicted again."""
        self.cache.release_files([item.file.sha256 for item in controlnets if item.file is not None])

    def _fetch(self, control: ControlRequest, tokens: Mapping[str, str], keep: set[str]) -> LoadedControlNet:
        local = self._local_dir(control)
        if local is not None:
            weights = _weights_in(local, control)
            config = json.loads((local / CONFIG_FILE).read_text())
            model, digest = self._model(control, weights, config, sha256=self._digest(weights))
            return LoadedControlNet(control, model, digest)
        kind = AdapterKind(control.field, WEIGHTS_FILE, WEIGHTS_FILE)
        token = tokens.get(control.reference.kind)
        file = self.cache.fetch_held(kind, control.reference, token, frozenset(keep))
        try:
            config = self._config(control, file, token)
            model, digest = self._model(control, file.path, config, sha256=file.sha256)
        except InputError:
            self.cache.release_files([file.sha256])
            file.reject()  # not a ControlNet for this model: a failed request leaves nothing behind
            raise
        except BaseException:
            self.cache.release_files([file.sha256])
            raise
        return LoadedControlNet(control, model, digest, file)

    @functools.cached_property
    def full_size_config(self) -> dict:
        """A full-size ControlNet's configuration for the loaded UNet (what `ControlNetModel.from_unet`
        makes): a single file's, which brings none of its own. Derived once."""
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(self.unet_config)
            return dict(ControlNetModel.from_unet(unet, load_weights_from_unet=False).config)

    def _digest(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = sha256_of(path)
        return self._digests[key]

    def _local_dir(self, control: ControlRequest) -> Path | None:
        if control.reference is None:  # the bundled ControlNet
            if not (self.bundled / CONFIG_FILE).is_file():
                raise InputError(control.field, f"{BUNDLED_CONTROLNET} is not in this image ({self.bundled})")
            return self.bundled
        if control.reference.kind == "huggingface" and control.reference.file is None:
            local = baked_dir(control.reference.location, self.baked)
            if (local / CONFIG_FILE).is_file():
                return local
        return None

    def _config(self, control: ControlRequest, file: AdapterFile, token: str | None) -> dict:
        """The ControlNet's configuration: its repository's config.json (fetched once, kept beside
        the weights), else the loaded UNet's, as a full-size ControlNet has."""
        stored = file.path.with_suffix(".config.json")
        if stored.is_file():
            return json.loads(stored.read_text())
        reference = control.reference
        if reference.kind == "huggingface" and (reference.file is None or "/" not in (reference.file or "")):
            url = hub_file_url(reference.location, CONFIG_FILE, reference.revision)
            partial = stored.with_suffix(".partial")
            headers = {"Authorization": f"Bearer {token}"} if token else None
            try:
                with partial.open("wb") as sink:
                    fetch_url_to(sink, control.field, url, 1_000_000, headers=headers)
                config = json.loads(partial.read_text())
            except (InputError, ValueError):
                partial.unlink(missing_ok=True)
                config = None  # a repository without config.json: a file of diffusers' own layout
            if isinstance(config, dict) and config.get("_class_name", "ControlNetModel") == "ControlNetModel":
                os.replace(partial, stored)
                return config
            partial.unlink(missing_ok=True)
        return self.full_size_config

    def _model(
        self, control: ControlRequest, weights: Path, config: dict, sha256: str
    ) -> tuple[ControlNetModel, str]:
        """The loaded model of these weights (loaded now, or kept from an earlier request) and its
        short hash."""
        check_fits(control.field, control.name, config, self.unet_config)
        digest = sha256
        with self._lock:
            if digest in self._loaded:
                self._loaded.move_to_end(digest)
                return self._loaded[digest], digest[:10]
        started = time.perf_counter()
        model = _load(control, weights, config, self.dtype).to(self.device).eval().requires_grad_(False)
        with self._lock:
            self.loads += 1
            self._loaded[digest] = model
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)  # a request still holding it keeps it alive
        log.info(
            "%s: loaded the ControlNet %s (%.1f M parameters) in %.1f s",
            control.field,
            control.name,
            sum(parameter.numel() for parameter in model.parameters()) / 1e6,
            time.perf_counter() - started,
        )
        return model, digest[:10]


def _weights_in(directory: Path, control: ControlRequest) -> Path:
    for name in (WEIGHTS_FILE, "diffusion_pytorch_model.fp16.safetensors"):
        if (directory / name).is_file():
            return directory / name
    raise InputError(control.field, f"{control.name}: {directory} holds no {WEIGHTS_FILE}")


def _load(control: ControlRequest, weights: Path, config: dict, dtype: torch.dtype) -> ControlNetModel:
    """The ControlNet of `config` with the tensors of `weights` (diffusers' or the original key
    format) as `dtype`; refused naming the field when they do not fit."""
    state = _diffusers_keys({name: tensor.to(dtype) for name, tensor in load_file(weights).items()}, config)
    settings = {key: value for key, value in config.items() if not key.startswith("_")}
    with torch.device("meta"):
        model = ControlNetModel.from_config(settings)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        theirs, ours = describe_family(_config_from_tensors(state)), describe_family(config)
        if theirs != ours:
            raise InputError(
                control.field,
                f"{control.name} is a ControlNet for {theirs}; this model is {ours}: choose a "
                "ControlNet made for this model's family",
            ) from error
        wrong = len(set(model.state_dict()) ^ set(state))
        raise InputError(
            control.field,
            f"{control.name} is not a ControlNet for this model ({wrong} tensor names differ from a "
            f"ControlNet's for it): {str(error).splitlines()[0][:200]}",
        ) from error
    return model


@relies_on_internals(
    "diffusers",
    "0.42.1",
    "diffusers.loaders.single_file_utils.convert_controlnet_checkpoint(checkpoint, config): the original "
    "ControlNet's keys (control_model.*, or time_embed.* without the prefix) renamed to diffusers'",
)
def _diffusers_keys(state: dict[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """The tensors under diffusers' names: a file in the original ControlNet format converted."""
    if any(key.startswith(_ORIGINAL_PREFIX) or key.startswith("time_embed.") for key in state):
        return convert_controlnet_checkpoint(state, dict(config))
    return state


def _config_from_tensors(state: Mapping[str, torch.Tensor]) -> dict:
    """What the tensors tell of the family they were trained for: SDXL's added embeddings (diffusers'
    `add_embedding`, the original `label_emb`), and the text width the cross-attention reads."""
    xl = any(key.startswith(("add_embedding.", "label_emb.")) for key in state)
    width = next(
        (tensor.shape[1] for key, tensor in state.items() if key.endswith("attn2.to_k.weight")), None
    )
    return {"addition_embed_type": "text_time" if xl else None, "cross_attention_dim": width}
