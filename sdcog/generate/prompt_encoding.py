"""Prompts longer than CLIP's 77 tokens, and weighted prompts, as embeddings for the pipeline.

diffusers encodes a prompt in one CLIP window of 77 tokens (75 plus the start and end markers) and
drops the rest with a warning. Prompts that fit and carry no weights still go that way, so their
images are exactly what plain diffusers makes. The others are encoded here with compel
(https://github.com/damian0815/compel), the maintained library InvokeAI and diffusers' docs use
for this: the prompt is split into windows of 75 tokens (at a sentence or phrase boundary where
there is one), each window is encoded on its own with its markers, and the windows are joined; a
weight scales its tokens' embeddings away from those of the empty prompt (or, below 1, blends
towards the prompt without them). compel parses its own syntax, not AUTOMATIC1111's, so the
prompt is parsed by `sdcog.generate.prompt_syntax` and handed over as fragments.

SDXL's two text encoders are each run this way and joined along the feature axis, as diffusers
does for one window; the pooled embedding comes from the second encoder's first window, as in
AUTOMATIC1111. Nothing is dropped up to `MAX_PROMPT_TOKENS`; a longer prompt is refused, naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from compel import Compel, ReturnedEmbeddingsType
from compel.prompt_parser import FlattenedPrompt
from compel.prompt_parser import Fragment as CompelFragment
from diffusers import DiffusionPipeline

from sdcog.errors import InputError
from sdcog.generate.prompt_syntax import (
    Fragment,
    PromptSyntaxError,
    is_weighted,
    parse_weighted_prompt,
    plain_text,
)

WINDOW_TOKENS = 75
"""Tokens per CLIP window, without its start and end markers."""
MAX_PROMPT_TOKENS = 8 * WINDOW_TOKENS
"""The longest prompt accepted: each window of 75 tokens adds to every denoising step's cost."""


@dataclass(frozen=True)
class ParsedPrompt:
    field: str
    text: str
    """Without the attention syntax."""
    fragments: list[Fragment]
    tokens: int
    """Its token count (without markers), the longest of the model's tokenizers."""

    @property
    def needs_windows(self) -> bool:
        return self.tokens > WINDOW_TOKENS or is_weighted(self.fragments)


def _stack(encoder: torch.nn.Module) -> torch.nn.Module:
    """A CLIP text encoder's stack of transformer layers (`.layers`), in transformers 4 and 5."""
    return getattr(encoder, "text_model", encoder).encoder


def text_encoders(pipeline: DiffusionPipeline) -> list[tuple]:
    """The pipeline's (tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
    return [
        (tokenizer, encoder)
        for tokenizer, encoder in (
            (getattr(pipeline, "tokenizer", None), getattr(pipeline, "text_encoder", None)),
            (getattr(pipeline, "tokenizer_2", None), getattr(pipeline, "text_encoder_2", None)),
        )
        if tokenizer is not None and encoder is not None
    ]


class PromptEncoder:
    """Turns a prompt and a negative prompt into the pipeline's text arguments."""

    def __init__(self, pipeline: DiffusionPipeline):
        self.pipeline = pipeline
        encoders = text_encoders(pipeline)
        self.tokenizers = [tokenizer for tokenizer, _ in encoders]
        self.is_xl = hasattr(pipeline, "text_encoder_2")
        self._layers = {_stack(encoder): _stack(encoder).layers for _, encoder in encoders}
        """Each text encoder's transformer and its whole list of layers (clip skip leaves the last out)."""
        # SDXL: the penultimate layer's states, not normalised, as diffusers uses them; SD 1.x/2.x:
        # the last layer's, normalised.
        returned = (
            ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            if self.is_xl
            else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
        )
        self.compels = [
            Compel(
                tokenizer=tokenizer,
                text_encoder=encoder,
                dtype_for_device_getter=lambda _device, encoder=encoder: encoder.dtype,
                truncate_long_prompts=False,
                returned_embeddings_type=returned,
                requires_pooled=self.is_xl and index == len(encoders) - 1,
            )
            for index, (tokenizer, encoder) in enumerate(encoders)
        ]

    def parse(self, field: str, prompt: str, expand: Callable[[str], str] | None = None) -> ParsedPrompt:
        """`prompt` without its attention syntax, counted; `expand` rewrites each fragment's text (the
        request's embeddings' words into their tokens)."""
        # Without leading and trailing whitespace in Python's sense, which takes in the separators
        # \x1c-\x1f: CLIP would read those as tokens, and the infotext (whose readers strip each
        # line) could not give them back. Other whitespace there makes no token either way.
        prompt = prompt.strip()
        try:
            fragments = parse_weighted_prompt(prompt)
        except PromptSyntaxError as error:
            raise InputError(field, str(error)) from error
        if expand is not None:
            fragments = [Fragment(expand(fragment.text), fragment.weight) for fragment in fragments]
        text = plain_text(fragments)
        tokens = max(
            len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
            for tokenizer in self.tokenizers
        )
        if tokens > MAX_PROMPT_TOKENS:
            raise InputError(
                field,
                f"is {tokens} tokens long; the limit is {MAX_PROMPT_TOKENS} "
                f"({MAX_PROMPT_TOKENS // WINDOW_TOKENS} CLIP windows of {WINDOW_TOKENS} tokens): shorten it",
            )
        return ParsedPrompt(field, text, fragments, tokens)

    def arguments(
        self,
        prompt: str,
        negative_prompt: str,
        expand: Callable[[str], str] | None = None,
        clip_skip: int = 1,
    ) -> dict[str, object]:
        """`prompt`/`negative_prompt` for the pipeline when both fit one window without weights,
        else their embeddings (`prompt_embeds`, `negative_prompt_embeds`, and SDXL's pooled ones).
        `expand`: see `parse`. `clip_skip` (AUTOMATIC1111's: 2 = the layer before the last) is
        diffusers' `clip_skip` + 1 on the plain path (the caller passes it); here, the windows are
        encoded by the encoders without their last `clip_skip - 1` layers, which is the same."""
        layers = min(len(stack) for stack in self._layers.values())
        if clip_skip > layers:
            raise InputError(
                "clip_skip", f"is {clip_skip}, but this model's text encoder has {layers} layers"
            )
        positive = self.parse("prompt", prompt, expand)
        negative = self.parse("negative_prompt", negative_prompt, expand)
        if not (positive.needs_windows or negative.needs_windows):
            return dict(prompt=positive.text, negative_prompt=negative.text or None)
        with self._skipping(clip_skip - 1):
            return self._embeddings(positive, negative)

    def _embeddings(self, positive: ParsedPrompt, negative: ParsedPrompt) -> dict[str, object]:
        embeds, pooled = self._encode(positive)
        arguments: dict[str, object] = dict(prompt_embeds=embeds)
        if pooled is not None:
            arguments["pooled_prompt_embeds"] = pooled
        # SDXL's empty negative prompt is zeros (force_zeros_for_empty_prompt): the pipeline does
        # that from prompt_embeds' shape when given no negative.
        zeros = self.is_xl and self.pipeline.config.get("force_zeros_for_empty_prompt", False)
        if zeros and not negative.text:
            return arguments
        negative_embeds, negative_pooled = self._encode(negative)
        embeds, negative_embeds = self._pad_to_same_length(embeds, negative_embeds)
        arguments.update(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
        if negative_pooled is not None:
            arguments["negative_pooled_prompt_embeds"] = negative_pooled
        return arguments

    @torch.no_grad()
    def _encode(self, prompt: ParsedPrompt) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's windows from each text encoder, joined along the feature axis, and SDXL's pooled
        embedding (None for SD 1.x/2.x)."""
        per_encoder = [self._windows(compel, prompt.fragments) for compel in self.compels]
        # SDXL's two tokenizers may split a prompt differently: pad the shorter with empty windows.
        longest = max(embeds.shape[1] for embeds in per_encoder)
        per_encoder = [
            self._pad(embeds, longest, lambda compel=compel: self._windows(compel, [Fragment("")]))
            for embeds, compel in zip(per_encoder, self.compels, strict=True)
        ]
        pooled = None
        last = self.compels[-1]
        if last.requires_pooled:  # from the whole encoder, as diffusers' clip_skip leaves it
            with self._skipping(0):
                pooled = last.conditioning_provider.get_pooled_embeddings([prompt.text], device=last.device)
        return torch.cat(per_encoder, dim=-1), pooled

    @contextmanager
    def _skipping(self, skipped: int) -> Iterator[None]:
        """The text encoders without their last `skipped` layers, for the time of the block."""
        before = {stack: stack.layers for stack in self._layers}
        try:
            for stack, layers in self._layers.items():
                stack.layers = layers[: len(layers) - skipped]
            yield
        finally:
            for stack, layers in before.items():
                stack.layers = layers

    def skipping_in_call(self, clip_skip: int) -> AbstractContextManager:
        """Around a pipeline call that encodes plain prompts itself: SD 1.x/2.x's encoders without
        their last layers (diffusers' own clip_skip reaches for `text_model`, which transformers 5's
        CLIPTextModel no longer has); SDXL's take `call_arguments` instead."""
        return nullcontext() if self.is_xl else self._skipping(clip_skip - 1)

    def call_arguments(self, clip_skip: int) -> dict[str, object]:
        """SDXL's diffusers `clip_skip` (layers skipped, counted from the penultimate it already uses)."""
        return {"clip_skip": clip_skip - 1} if self.is_xl and clip_skip > 1 else {}

    @staticmethod
    def _windows(compel: Compel, fragments: list[Fragment]) -> torch.Tensor:
        flattened = FlattenedPrompt(
            [CompelFragment(fragment.text, fragment.weight) for fragment in fragments]
        )
        (embeds, _tokens), _options = compel.build_conditioning_tensor_for_prompt_object(flattened)
        return embeds

    def _pad_to_same_length(
        self, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's and the negative prompt's embeddings, the shorter padded with empty windows."""
        longest = max(first.shape[1], second.shape[1])

        def empty() -> torch.Tensor:  # one window of the empty prompt from each encoder, joined
            return torch.cat([self._windows(compel, [Fragment("")]) for compel in self.compels], dim=-1)

        return self._pad(first, longest, empty), self._pad(second, longest, empty)

    @staticmethod
    def _pad(embeds: torch.Tensor, length: int, empty_window) -> torch.Tensor:
        """`embeds` followed by empty-prompt windows up to `length` tokens. The empty window is
        encoded each time: a LoRA on the text encoder changes it."""
        if embeds.shape[1] >= length:
            return embeds
        window = empty_window()
        repeats = (length - embeds.shape[1]) // window.shape[1]
        return torch.cat([embeds, *[window] * repeats], dim=1)
