"""What one request's run produced, as the writing step takes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from sdcog.generate.safety import SafetyVerdict

if TYPE_CHECKING:
    from sdcog.generate.controlnets import LoadedControlNet
    from sdcog.generate.embeddings import AppliedEmbedding
    from sdcog.generate.loras import AppliedLora


@dataclass
class Generation:
    images: list[Image.Image]
    safety: list[SafetyVerdict] | None = None
    """Per image, the safety checker's verdict, for the metadata; None: the model has none."""
    loras: list[AppliedLora] = field(default_factory=list)
    embeddings: list[AppliedEmbedding] = field(default_factory=list)
    """The request's embeddings that its prompts used."""
    controlnets: list[LoadedControlNet] = field(default_factory=list)
    """The ControlNets that steered it, with their maps (`control.control_map`)."""

    @property
    def flagged(self) -> list[bool]:
        return [
            verdict == SafetyVerdict.FLAGGED
            for verdict in self.safety or [SafetyVerdict.PASSED] * len(self.images)
        ]
