"""The safety checker's verdict on an image, kept apart from how the metadata words it."""

from __future__ import annotations

from enum import Enum


class SafetyVerdict(Enum):
    """What the model's safety checker made of one image (models that ship one, such as SD 1.5)."""

    PASSED = "passed"
    FLAGGED = "flagged"
    """diffusers replaced the image by a black one."""
    DISABLED = "disabled"
    """The request sent disable_safety_checker."""

    @property
    def label(self) -> str:
        """The words the metadata and the logs use."""
        return "flagged (black image)" if self is SafetyVerdict.FLAGGED else self.value
