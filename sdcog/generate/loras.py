"""LoRAs applied per request to the one loaded pipeline, without leaking into the next request.

Each LoRA file is loaded once (diffusers with the PEFT backend, kohya and diffusers formats for
SD 1.x, 2.x and SDXL) as an adapter named by its content hash, and stays loaded while requests
use it: a request sets the active adapters and their scales with `set_adapters`, and a request
without LoRAs disables them all, which runs exactly the base weights (PEFT's disabled layers call
the base layer only). At most `MAX_LOADED_LORAS` stay loaded; the least recently used is deleted
from the modules, so memory stays flat however many LoRAs the server sees.

Fused QKV projections (the GPU fast path) read one fused matrix that a LoRA on `to_q`/`to_k`/`to_v`
would not reach: while LoRAs are active the UNet runs its unfused attention processors, and the
fused ones again (the same fused weights: a LoRA never changes the base weights) when none is.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import transformers
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import FusedAttnProcessor2_0
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdcog.errors import InputError
from sdcog.fetch.adapter_cache import AdapterFile, FetchedLora
from sdcog.fetch.adapter_references import LORA
from sdcog.model.safetensors_files import tensor_data_sha256

log = logging.getLogger(__name__)

MAX_LOADED_LORAS = 8


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA as the metadata records it."""

    name: str
    hash: str
    """AUTOMATIC1111's short hash of a LoRA: the first 12 hex digits of the sha256 of the file's
    tensor data (after the safetensors header), which is what Civitai indexes LoRAs by."""
    scale: float


class LoraAdapters:
    """The LoRA adapters loaded into `pipeline`'s modules, least recently used first."""

    def __init__(self, pipeline: DiffusionPipeline, max_loaded: int = MAX_LOADED_LORAS):
        self.pipeline = pipeline
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> short hash
        unet = pipeline.unet
        # The processors before fusing. set_attn_processor empties the dict it is given (it pops each
        # entry), so diffusers' own unfuse_qkv_projections works once only: keep a copy, pass copies.
        self._unfused = dict(getattr(unet, "original_attn_processors", None) or {})
        self._fused = bool(self._unfused)
        self._fused_active = self._fused

    def activate(self, loras: Sequence[FetchedLora]) -> list[AppliedLora]:
        """Make exactly `loras` active at their scales; none: the base model. Returns them for metadata."""
        if not loras:
            if self.loaded:
                self.pipeline.disable_lora()
            self._use_fused_attention(True)
            return []
        hashes = [lora.file.sha256 for lora in loras]
        if len(set(hashes)) < len(hashes):
            raise InputError(LORA.field, "names the same LoRA file twice: give it once, with one scale")
        self._use_fused_attention(False)
        applied = []
        for lora in loras:
            name = self._load(lora.file)
            applied.append(AppliedLora(lora.file.name, self.loaded[name], lora.scale))
        names = [_adapter_name(lora.file) for lora in loras]
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
        self._evict(keep=set(names))
        return applied

    def _load(self, file: AdapterFile) -> str:
        name = _adapter_name(file)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name
        started = time.perf_counter()
        try:
            state_dict = load_file(file.path)
        except (SafetensorError, OSError) as error:
            file.reject()
            raise InputError(LORA.field, f"{file.name}: cannot read it as safetensors: {error}") from error
        # transformers reports every newly added LoRA layer of a text encoder as "MISSING" from
        # a checkpoint; diffusers fills them from the state dict right after, so that is noise.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():  # several adapters in one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipeline.load_lora_weights(state_dict, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, TypeError) as error:
            self._forget(name)
            file.reject()  # the cache forgets a file this request stored: nothing is left behind
            raise InputError(LORA.field, f"{file.name} is not a LoRA for this model: {error}") from error
        finally:
            transformers.logging.set_verbosity(verbosity)
        if name not in self._adapter_names():
            self._forget(name)
            file.reject()
            raise InputError(
                LORA.field,
                f"{file.name}: none of its {len(state_dict)} tensors matches a layer of this model "
                f"({type(self.pipeline).__name__}); is it a LoRA for another model family?",
            )
        self.loaded[name] = tensor_data_sha256(file.path)[:12]
        log.info(
            "%s: loaded %s (%d tensors) as adapter %s in %.2f s; %d loaded",
            LORA.field,
            file.name,
            len(state_dict),
            name,
            time.perf_counter() - started,
            len(self.loaded),
        )
        return name

    def _evict(self, keep: set[str]) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_loaded:
                break
            if name not in keep:
                self._forget(name)
                log.info("%s: unloaded adapter %s, the least recently used", LORA.field, name)

    def _forget(self, name: str) -> None:
        if name in self._adapter_names():
            self.pipeline.delete_adapters(name)
        self.loaded.pop(name, None)

    def _adapter_names(self) -> set[str]:
        names: set[str] = set()
        for component in ("unet", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipeline, component, None)
            names.update(getattr(module, "peft_config", None) or {})
        return names

    def _use_fused_attention(self, fused: bool) -> None:
        if not self._fused or fused == self._fused_active:
            return
        self._fused_active = fused
        unet = self.pipeline.unet
        if fused:
            unet.set_attn_processor(FusedAttnProcessor2_0())
        else:
            unet.set_attn_processor(dict(self._unfused))


def _adapter_name(file: AdapterFile) -> str:
    return f"lora_{file.sha256[:16]}"
