"""Pipeline directories for the weights tests: well-formed, with tiny tensors (not loadable models).

A plain module beside the tests (pytest puts this folder on sys.path), shared by test_weights.py
and test_weights_check.py.
"""

import json

import numpy as np
from safetensors.numpy import save_file

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
}
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def make_pipeline_dir(root, variant=None):
    """A small but well-formed pipeline directory (tiny tensors, not a loadable model)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / component).mkdir()
    for component, stem in WEIGHT_STEMS.items():
        (root / component / "config.json").write_text("{}")
        infix = f".{variant}" if variant else ""
        save_file({"weight": np.zeros(4, np.float32)}, str(root / component / f"{stem}{infix}.safetensors"))
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return root
