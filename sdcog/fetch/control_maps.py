"""Control images made into the maps ControlNets read: as sent (`none`), Canny edges (OpenCV, no
weights), or a depth map (a transformers depth estimator whose weights
`script/download-weights --preprocessor depth` bakes into `controlnets/preprocessors/depth`).

A preprocessor whose weights are absent is refused naming the slot's `_preprocessor` input, with
what to do: send a map already made (preprocessor `none`), or have the operator bake the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdcog.errors import InputError
from sdcog.model.weights import PROJECT_ROOT
from sdcog.resolve.control import ControlRequest
from sdcog.resolve.request import GenerationRequest

log = logging.getLogger(__name__)

PREPROCESSORS_DIR = PROJECT_ROOT / "controlnets" / "preprocessors"
DEPTH = "depth"


def canny_edges(image: Image.Image, low: int, high: int) -> Image.Image:
    """White edges on black, as lllyasviel's Canny ControlNets were trained on (OpenCV's Canny on
    the image's luminance, thresholds as AUTOMATIC1111 takes them)."""
    import cv2

    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(edges).convert("RGB")


class ControlMaps:
    """Preprocessors, loaded when first used and kept."""

    def __init__(self, directory: Path = PREPROCESSORS_DIR, device: str = "cpu"):
        self.directory = Path(directory)
        self.device = device
        self._depth = None
        self._lock = threading.Lock()

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request with each ControlNet's map made from its image."""
        if not request.controlnets:
            return request
        controls = tuple(
            dataclasses.replace(control, control_map=self.control_map(control))
            for control in request.controlnets
        )
        return dataclasses.replace(request, controlnets=controls)

    def control_map(self, control: ControlRequest) -> Image.Image:
        if control.preprocessor == "none":
            return control.image
        if control.preprocessor == "canny":
            return canny_edges(control.image, *control.canny_thresholds)
        if control.preprocessor == DEPTH:
            return self._depth_map(control)
        raise InputError(f"{control.field}_preprocessor", f"unknown preprocessor {control.preprocessor!r}")

    def _depth_map(self, control: ControlRequest) -> Image.Image:
        estimator = self._depth_estimator(control)
        started = time.perf_counter()
        depth = estimator(control.image)["predicted_depth"]
        values = depth.squeeze().float().cpu().numpy()
        span = float(values.max() - values.min()) or 1.0
        grey = ((values - values.min()) / span * 255.0).round().astype(np.uint8)
        result = Image.fromarray(grey).resize(control.image.size, Image.Resampling.BICUBIC).convert("RGB")
        log.info("%s: depth map made in %.2f s", control.field, time.perf_counter() - started)
        return result

    def _depth_estimator(self, control: ControlRequest):
        with self._lock:
            if self._depth is None:
                path = self.directory / DEPTH
                if not (path / "config.json").is_file():
                    raise InputError(
                        f"{control.field}_preprocessor",
                        "depth needs a depth estimator's weights, and this image has none: send a depth map "
                        "with preprocessor none, or (the operator) bake them in with "
                        "`script/download-weights --preprocessor depth`",
                    )
                from transformers import pipeline

                self._depth = pipeline("depth-estimation", model=str(path), device=self.device)
                log.info("loaded the depth estimator from %s", path)
            return self._depth
