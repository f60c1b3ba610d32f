"""Tiny LoRA files made in the tests: random low-rank updates on a tiny pipeline's attention layers,
saved as AUTOMATIC1111/kohya or diffusers safetensors, as creators' LoRAs come."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import diffusers
import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(
    pipeline_dir: Path, out: Path, seed: int, rank: int = 4, strength: float = 1.0, kohya: bool = False
) -> Path:
    """A LoRA for the pipeline in `pipeline_dir` on its UNet and text encoder(s): A and B drawn at random
    (`strength` scales B), written to `out` in kohya (AUTOMATIC1111) or diffusers format."""
    pipeline = diffusers.DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    components = (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS))
    for name, targets in components:
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters():
                if "lora_" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 * strength)
        layers[name] = get_peft_model_state_dict(module)
    if kohya:
        tensors = {}
        prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
        if "text_encoder_2" not in layers:
            prefixes["text_encoder"] = "lora_te"
        for name, state_dict in layers.items():
            converted = convert_state_dict_to_kohya(state_dict)
            tensors.update({f"{prefixes[name]}_{key}": value for key, value in converted.items()})
        save_file({key: value.contiguous() for key, value in tensors.items()}, out)
        return out
    arguments = {f"{name}_lora_layers": state_dict for name, state_dict in layers.items()}
    type(pipeline).save_lora_weights(out.parent / (out.stem + "-dir"), **arguments, safe_serialization=True)
    (out.parent / (out.stem + "-dir") / "pytorch_lora_weights.safetensors").rename(out)
    return out


class StaticServer:
    """Serves `files` (path -> bytes) on 127.0.0.1, recording each request's path and headers."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                body = server.files.get(self.path.split("?")[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, path: str) -> int:
        return sum(1 for requested, _ in self.requests if requested.split("?")[0] == path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
