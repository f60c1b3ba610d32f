"""Each model family is recognised from a pipeline directory's configs alone."""

import json

import pytest

from sdcog.model.families import SD1, SD2, SDXL, UnsupportedModelError, detect_family


def pipeline_dir(tmp_path, class_name, cross_attention_dim):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": cross_attention_dim}))
    return tmp_path


@pytest.mark.parametrize(
    ("class_name", "cross_attention_dim", "family"),
    [
        ("StableDiffusionPipeline", 768, SD1),  # SD 1.4 / 1.5 and their fine-tunes (CLIP ViT-L)
        ("StableDiffusionPipeline", 1024, SD2),  # SD 2.0 / 2.1, base and 768-v (OpenCLIP ViT-H)
        ("StableDiffusionXLPipeline", 2048, SDXL),
    ],
)
def test_family_is_detected_from_the_configs(tmp_path, class_name, cross_attention_dim, family):
    assert detect_family(pipeline_dir(tmp_path, class_name, cross_attention_dim)) is family


def test_other_pipelines_are_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'FluxPipeline'"):
        detect_family(pipeline_dir(tmp_path, "FluxPipeline", 4096))


def test_bigger_models_get_a_bigger_pixel_budget():
    assert SDXL.pixel_budget > SD1.pixel_budget == SD2.pixel_budget
    assert SD1.pipeline_class == SD2.pipeline_class == "StableDiffusionPipeline"
