"""Hires fix on the bundled model, judged by the shapes judge: 2x returns the final size, keeps the
first pass's layout (IoU of the object with the first pass's), still draws what the prompt asks,
and is not a plain resize; progress counts both passes; a cancel stops the second pass."""

import numpy as np
import pytest
from PIL import Image

from sdcog.generate.cancellation import CancelFlag, Cancelled
from sdcog.generate.engine import Engine
from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog.resolve.request import resolve_request
from sdcog_tools.shapes import Scene, judge, object_region

SCENES = (
    Scene("red", "square", "white"),
    Scene("orange", "circle", "yellow"),
    Scene("orange", "triangle", "green"),
)
SEEDS = 4
STEPS = 12
SECOND_PASSES = {
    "latent 0.3": dict(hires_scale=2, hires_denoising_strength=0.3),
    "Lanczos 0.3": dict(hires_scale=2, hires_denoising_strength=0.3, hires_upscaler="Lanczos"),
    "latent 0.55 (default)": dict(hires_scale=2),
    "direct 128": dict(width=128, height=128),
}


@pytest.fixture(scope="module")
def engine():
    return Engine.load(BUNDLED_MODEL_DIR)


def generate(engine, scene, **inputs):
    request = resolve_request(
        engine.limits, prompt=scene.caption, seed=11, num_outputs=SEEDS, num_inference_steps=STEPS, **inputs
    )
    return engine.generate(request).images


def iou(first: np.ndarray, second: np.ndarray) -> float:
    union = (first | second).sum()
    return float((first & second).sum() / union) if union else 0.0


def enlarged(image: Image.Image, size=(128, 128)) -> Image.Image:
    return image.resize(size, Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def measured(engine, oracle_figures):
    """Against the first pass alone (64 px, enlarged): each way to 128 px, by the object's IoU, the
    judge's agreement (colour and shape) and the mean change from a plain resize."""
    firsts = {scene: generate(engine, scene) for scene in SCENES}
    figures = {}
    for name, inputs in SECOND_PASSES.items():
        overlaps, agree, changed = [], 0, []
        for scene in SCENES:
            for first, second in zip(firsts[scene], generate(engine, scene, **inputs), strict=True):
                assert first.size == (64, 64) and second.size == (128, 128)
                overlaps.append(iou(object_region(enlarged(first)), object_region(second)))
                first_judged, second_judged = judge(first), judge(second)
                agree += (first_judged.colour, first_judged.shape) == (
                    second_judged.colour,
                    second_judged.shape,
                )
                changed.append(np.abs(np.asarray(second, float) - np.asarray(enlarged(first), float)).mean())
        figures[name] = (float(np.mean(overlaps)), agree, float(np.mean(changed)))
    oracle_figures["hires fix 2x vs the first pass (IoU, judge agrees, change)"] = "; ".join(
        f"{name}: {iou_:.2f}, {agree}/{len(SCENES) * SEEDS}, {change:.1f}"
        for name, (iou_, agree, change) in figures.items()
    )
    return figures


def test_hires_fix_keeps_the_first_pass_layout_and_is_not_a_plain_resize(measured):
    """Measured (3 scenes x 4 seeds, 12 steps): IoU 0.56 latent 0.3, 0.66 Lanczos 0.3, 0.32 latent
    0.55, against 0.16 for asking 128 px directly (an unrelated layout); the judge agreed 8/12 at
    latent 0.3 against 4/12 directly; the change from a plain resize 26-45 levels. The bundled
    model draws objects at the pixel size it was trained at (64 px images), so at 128 px a
    stronger repaint shrinks the object: that, not a move, is most of the lower IoU at 0.55."""
    direct_iou, direct_agree, _ = measured["direct 128"]
    for name in ("latent 0.3", "Lanczos 0.3"):
        assert measured[name][0] >= 0.45 and measured[name][0] >= direct_iou + 0.25, name
    assert measured["latent 0.55 (default)"][0] >= direct_iou + 0.1
    assert measured["latent 0.3"][1] >= direct_agree + 2
    for name in ("latent 0.3", "Lanczos 0.3", "latent 0.55 (default)"):
        assert measured[name][2] >= 10, name  # repainted, not a plain resize


def test_progress_counts_both_passes_and_a_cancel_stops_the_second(engine, caplog):
    scene = SCENES[0]
    request = resolve_request(
        engine.limits,
        prompt=scene.caption,
        seed=1,
        num_inference_steps=8,
        hires_scale=2,
        hires_denoising_strength=0.5,
    )
    with caplog.at_level("INFO", logger="sdcog.generate.progress"):
        engine.generate(request)
    lines = [
        record.getMessage()
        for record in caplog.records
        if "it/s" in record.getMessage() or "s/it" in record.getMessage()
    ]
    assert lines[-1].lstrip().startswith("100%") and "| 12/12 " in lines[-1]  # 8 + int(8 x 0.5)
    cancel = CancelFlag()
    steps = {"seen": 0}
    original = engine._on_step_end

    def counting(progress):
        inner = original(progress)

        def on_step_end(*args):
            steps["seen"] += 1
            if steps["seen"] == 10:  # in the second pass
                cancel.set()
            return inner(*args)

        return on_step_end

    engine._on_step_end = counting
    try:
        with pytest.raises(Cancelled, match="after denoising step 10 of 12"):
            engine.generate(request, cancel)
    finally:
        engine._on_step_end = original


def test_hires_inputs_are_refused_naming_the_field(engine):
    from sdcog.errors import InputError

    picture = Image.new("RGB", (64, 64), (10, 20, 200))
    cases = [
        (dict(hires_scale=2, image=picture), "hires_scale"),
        (dict(hires_scale=5), "hires_scale"),
        (dict(hires_scale=2, hires_upscaler="ESRGAN"), "hires_upscaler"),
        (dict(hires_scale=2, hires_denoising_strength=0.05, hires_steps=10), "hires_denoising_strength"),
        (dict(hires_scale=4, width=1024, height=1024, num_outputs=4), "hires_scale/width/height/num_outputs"),
        (dict(refine="expert_ensemble_refiner"), "refine"),
    ]
    for inputs, field in cases:
        with pytest.raises(InputError) as refused:
            resolve_request(engine.limits, prompt="a red circle", **inputs)
        assert refused.value.field == field, inputs


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_every_family_takes_each_upscaler_to_the_final_size(preset, tiny_pipelines):
    engine = Engine.load(tiny_pipelines[preset])
    for upscaler in ("Latent", "Latent (bicubic)", "Latent (nearest-exact)", "Lanczos", "Nearest"):
        request = resolve_request(
            engine.limits,
            prompt="a red circle",
            width=64,
            height=72,
            seed=2,
            num_outputs=2,
            num_inference_steps=4,
            hires_scale=1.5,
            hires_upscaler=upscaler,
        )
        assert request.output_size == (96, 104)  # 72 x 1.5 = 108, down to a multiple of 8
        images = engine.generate(request).images
        assert [image.size for image in images] == [(96, 104)] * 2, upscaler
