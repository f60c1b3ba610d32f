"""Textual-inversion embeddings, applied for one request and gone after it.

An embedding is a few learned token vectors (one set per text encoder) that a word in the prompt
stands for: `easynegative` in a negative prompt, `<cat-toy>` in a prompt. The files read:
- AUTOMATIC1111's and Civitai's: one tensor `emb_params` (or `string_to_param.*`), n x 768 for
  SD 1.x, n x 1024 for SD 2.x; for SDXL `clip_l` (n x 768) and `clip_g` (n x 1280);
- diffusers' `learned_embeds.safetensors`: one tensor keyed by its own token;
- Replicate's SDXL trainers' `embeddings.pti`: `text_encoders_0` and `text_encoders_1` (this
  model's trainer writes `text_encoders_0` alone for SD 1.x and 2.x).

The word is the one the request gives (`token=reference`), else the file's own token (diffusers'
format), else the file's name, as in AUTOMATIC1111. It is matched in prompts as a whole word,
ignoring case (CLIP lowercases prompts), and replaced by one slot token per vector.

The slots are `SLOTS` tokens added to every tokenizer once, when the engine loads, with rows of
zeros in the text encoders' embedding matrices. A request writes its vectors into the rows of the
slots it uses and sets them back to zeros when it ends, however it ends: the tokenizers never
change after loading, and no vector outlives its request. diffusers' `load_textual_inversion` and
`unload_textual_inversion` are not used: unloading rebuilds a transformers 5 CLIP tokenizer's
backend, which drops CLIP's decoding fix (decoded text comes back with `</w>` in it); each load
resizes the embedding matrices; and their multi-vector expansion misses a word written with
capitals (the tokenizer lowercases it, the text replacement does not) and replaces the word inside
longer words.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdcog.errors import InputError
from sdcog.fetch.adapter_cache import AdapterFile, FetchedEmbedding
from sdcog.fetch.adapter_references import EMBEDDING
from sdcog.generate.prompt_encoding import text_encoders
from sdcog.pinned_internals import relies_on_internals
from sdcog.resolve.request import EMBEDDING_TOKEN

log = logging.getLogger(__name__)

FIELD = EMBEDDING.field
MAX_VECTORS = 75
"""The most vectors one embedding may have: they must fit one CLIP window."""
SLOTS = 300
"""Slot tokens, so vectors, that one request's embeddings may have together: 4 of 75 vectors, or
8 of the usual sizes (AUTOMATIC1111's negative embeddings have 2 to 16 vectors)."""
_SINGLE_TENSOR_KEYS = ("emb_params", "string_to_param.*", "text_encoders_0")
_XL_KEYS = (("clip_l", "clip_g"), ("text_encoders_0", "text_encoders_1"))
_FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x"}


@dataclass(frozen=True)
class AppliedEmbedding:
    """An embedding as the metadata records it (AUTOMATIC1111's `TI hashes`)."""

    name: str
    """The word that stands for it in prompts."""
    hash: str
    """AUTOMATIC1111's short hash of an embedding: the first 12 hex digits of the file's sha256."""
    vectors: int


@dataclass
class ActiveEmbeddings:
    """A request's embeddings: each word and the tokens it is replaced by in prompts."""

    replacements: dict[str, tuple[AppliedEmbedding, str]] = field(default_factory=dict)
    """By lowercased word: the embedding and its tokens, joined by spaces."""
    used: set[str] = field(default_factory=set)
    """The lowercased words `expand` found."""

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        words = sorted(self.replacements, key=len, reverse=True)  # the longest word first
        return re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, words)) + r")(?![\w-])", re.IGNORECASE)

    def expand(self, text: str) -> str:
        """`text` with each embedding's word replaced by its tokens; the words found are noted as used."""
        if not self.replacements:
            return text

        def replace(match: re.Match) -> str:
            word = match[1].lower()
            self.used.add(word)
            return self.replacements[word][1]

        return self._pattern.sub(replace, text)

    @property
    def applied(self) -> list[AppliedEmbedding]:
        """The embeddings whose word appeared in a prompt, in the request's order."""
        return [embedding for word, (embedding, _) in self.replacements.items() if word in self.used]

    def warn_unused(self) -> None:
        for word, (embedding, _) in self.replacements.items():
            if word not in self.used:
                log.warning(
                    "%s: %r appears in neither prompt nor negative_prompt, so that embedding does nothing",
                    FIELD,
                    embedding.name,
                )


@dataclass(frozen=True)
class _Embedding:
    applied: AppliedEmbedding
    vectors: tuple[torch.Tensor, ...]
    """n x width, one per text encoder."""


class TextualInversions:
    """The embedding slots of `pipeline`'s tokenizers and text encoders, filled for one request at a time."""

    def __init__(self, pipeline: DiffusionPipeline, slots: int = SLOTS):
        self.pipeline = pipeline
        self.encoders = text_encoders(pipeline)
        self.widths = tuple(encoder.get_input_embeddings().embedding_dim for _, encoder in self.encoders)
        self.slots = [f"<sdcog-ti{index}>" for index in range(slots)]
        self.slot_ids = []
        for tokenizer, encoder in self.encoders:
            _pool_at_the_end_token(tokenizer, encoder)
            self.slot_ids.append(_add_slots(tokenizer, encoder, self.slots))

    @contextmanager
    def applied(self, files: Sequence[FetchedEmbedding]) -> Iterator[ActiveEmbeddings]:
        """The embeddings of `files` (each with the word the request gave it, or None: the file's
        own) while the block runs; every file is read and checked before any slot is written."""
        active = ActiveEmbeddings()
        if not files:
            yield active
            return
        by_word: dict[str, _Embedding] = {}
        for fetched in files:
            embedding = self._read(fetched.file, fetched.token)
            word = embedding.applied.name.lower()
            if word in by_word:
                raise InputError(
                    FIELD,
                    f"two embeddings are named {embedding.applied.name!r}: give one another word, "
                    "as in other-word=<reference>",
                )
            by_word[word] = embedding
        needed = sum(embedding.applied.vectors for embedding in by_word.values())
        if needed > len(self.slots):
            raise InputError(
                FIELD,
                f"the embeddings have {needed} vectors together; one request may use {len(self.slots)}",
            )
        written = 0  # slots 0 .. written-1 may hold this request's vectors
        try:
            for word, embedding in by_word.items():
                slots = range(written, written + embedding.applied.vectors)
                written = slots.stop
                self._write(slots, embedding.vectors)
                active.replacements[word] = (embedding.applied, " ".join(self.slots[slot] for slot in slots))
            log.info(
                "%s: %s",
                FIELD,
                ", ".join(f"{e.applied.name} ({e.applied.vectors} vectors)" for e in by_word.values()),
            )
            yield active
        finally:
            self._write(range(written), None)

    @torch.no_grad()
    def _write(self, slots: range, vectors: tuple[torch.Tensor, ...] | None) -> None:
        """Each encoder's vectors into the rows of `slots`; None: zeros."""
        if not slots:
            return
        for position, (_, encoder) in enumerate(self.encoders):
            weight = encoder.get_input_embeddings().weight
            rows = torch.tensor([self.slot_ids[position][slot] for slot in slots], device=weight.device)
            weight[rows] = 0 if vectors is None else vectors[position].to(weight.device, weight.dtype)

    def _read(self, file: AdapterFile, token: str | None) -> _Embedding:
        try:
            own_token, vectors = self._vectors(file)
        except InputError:
            file.reject()  # no embedding for this model: the cache forgets it if this request stored it
            raise
        count = len(vectors[0])
        word = token or own_token or file.name
        if not EMBEDDING_TOKEN.fullmatch(word):
            raise InputError(
                FIELD,
                f"{file.name}: its name {word!r} cannot be written in a prompt; give it a word, "
                "as in my-word=<reference>",
            )
        return _Embedding(AppliedEmbedding(word, file.sha256[:12], count), vectors)

    def _vectors(self, file: AdapterFile) -> tuple[str | None, tuple[torch.Tensor, ...]]:
        """The token the file names (diffusers' format), and its vectors per text encoder, checked
        against this model's widths, and for their count and values."""
        try:
            state = load_file(file.path)
        except (SafetensorError, OSError) as error:
            raise InputError(FIELD, f"{file.name}: cannot read it as safetensors: {error}") from error
        own_token = None
        xl_keys = next((keys for keys in _XL_KEYS if set(keys) <= set(state)), None)
        if xl_keys:
            tensors = tuple(state[key] for key in xl_keys)
        elif len(state) == 1:
            (key, tensor), *_ = state.items()
            if key not in _SINGLE_TENSOR_KEYS:
                own_token = key
            tensors = (tensor,)
        else:
            keys = ", ".join(sorted(state)[:4]) + (", ..." if len(state) > 4 else "")
            raise InputError(
                FIELD,
                f"{file.name} holds {len(state)} tensors ({keys}): an embedding holds one (or clip_l and "
                "clip_g for SDXL); is it a LoRA? Those go in lora_weights",
            )
        tensors = tuple(tensor.reshape(1, -1) if tensor.dim() == 1 else tensor for tensor in tensors)
        widths = tuple(tensor.shape[-1] for tensor in tensors)
        if widths != self.widths or any(tensor.dim() != 2 for tensor in tensors):
            made_for = _describe(widths, xl=xl_keys is not None)
            takes = _describe(self.widths, xl=len(self.widths) == 2)
            raise InputError(FIELD, f"{file.name} is {made_for[0]}; this model takes {takes[1]}")
        counts = {len(tensor) for tensor in tensors}
        if len(counts) != 1:
            raise InputError(FIELD, f"{file.name}: its text encoders' parts have different vector counts")
        count = counts.pop()
        if not 1 <= count <= MAX_VECTORS:
            raise InputError(FIELD, f"{file.name} has {count} vectors; an embedding has 1 to {MAX_VECTORS}")
        if not all(torch.isfinite(tensor).all() for tensor in tensors):
            raise InputError(FIELD, f"{file.name} holds values that are not finite numbers")
        return own_token, tuple(tensor.float() for tensor in tensors)


@relies_on_internals("transformers", "5.23.0", "the eos_token_id attribute by which CLIP's text model pools")
def _pool_at_the_end_token(tokenizer, encoder) -> None:
    """Make CLIP pool at the end token even when a prompt holds added tokens.

    The CLIP configs of the original checkpoints (SDXL's text encoders among them) say
    eos_token_id 2, for which transformers keeps the old pooling at the highest token id: the end
    token's, until tokens are added after it. With the tokenizer's real end token, it pools at the
    first end token: the same position for every prompt without added tokens, and the right one
    with them (SDXL's pooled embedding is the second encoder's)."""
    end = tokenizer.eos_token_id
    if end in (None, 2):
        return
    for module in encoder.modules():  # the CLIPTextModel, inside the projection model or not
        if getattr(module, "eos_token_id", None) == 2:
            module.eos_token_id = end


def _describe(widths: tuple[int, ...], xl: bool) -> tuple[str, str]:
    """Embeddings of these widths, for "x is <one>" and "this model takes <many>": "an embedding for
    SD 1.x (768 features)" and "SD 1.x embeddings (768 features)", or "an embedding of 64 features"
    and "embeddings of 64 features" for a width no family has."""
    family = "SDXL" if xl else _FAMILY_BY_WIDTH.get(widths[0])
    sizes = " and ".join(map(str, widths))
    if family:
        return f"an embedding for {family} ({sizes} features)", f"{family} embeddings ({sizes} features)"
    return f"an embedding of {sizes} features", f"embeddings of {sizes} features"


def _add_slots(tokenizer, encoder, slots: list[str]) -> list[int]:
    """Add the slot tokens to `tokenizer` and rows of zeros for them to `encoder`; their token ids."""
    tokenizer.add_tokens(slots)
    ids = tokenizer.convert_tokens_to_ids(slots)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[ids] = 0
    return ids
