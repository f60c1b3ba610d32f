"""`script/convert-checkpoint`: a pickle checkpoint (.ckpt, .pt, .pth, .bin) as .safetensors.

Unpickling an ordinary pickle runs whatever code the file holds, which is why setup never opens
one. This reads it with `torch.load(weights_only=True)`: PyTorch's restricted unpickler, which
builds tensors and plain containers only and refuses any other object (so a file that carries
code fails here instead of running it). The tensors of its state dict (the `state_dict` entry of
a training checkpoint, else the top level) are written with safetensors beside it:

    script/convert-checkpoint weights/model.ckpt      # -> weights/model.safetensors

Run it where you would run the file's own code anyway, and prefer the .safetensors most model pages
publish: conversion is the fallback for files that have none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


class ConversionError(RuntimeError):
    pass


def tensors_of(checkpoint: object) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: its `state_dict` when it has one, else itself."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"holds a {type(checkpoint).__name__}, not a state dict of tensors")
    tensors = {str(name): value for name, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ConversionError("holds no tensors")
    return tensors


def convert(source: Path, out: Path | None = None) -> Path:
    out = out or source.with_suffix(".safetensors")
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # the restricted unpickler's refusal, or a damaged file
        raise ConversionError(
            f"{source} cannot be read as tensors only ({type(error).__name__}: {str(error)[:300]})"
        ) from error
    try:
        tensors = tensors_of(loaded)
    except ConversionError as error:
        raise ConversionError(f"{source} {error}") from error
    # Shared storage (tied weights) is written once per name; safetensors needs each contiguous.
    save_file({name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/convert-checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the .ckpt / .pt / .pth / .bin file")
    parser.add_argument("--out", type=Path, default=None, help="default: beside it, as .safetensors")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.out)
    except ConversionError as error:
        print(f"convert-checkpoint: {error}", file=sys.stderr)
        return 1
    print(f"{out} written; setup loads it (remove {args.source.name} from the weights directory).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
