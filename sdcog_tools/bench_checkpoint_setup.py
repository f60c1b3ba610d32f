"""`script/bench-checkpoint-setup`: setup from a single-file checkpoint against setup from the
diffusers folder of the same weights (random weights, real architectures).

    script/bench-checkpoint-setup --preset sdxl-real-arch --device cuda --fp16   # the issue's case
    script/bench-checkpoint-setup --preset sd15-real-arch                        # CPU
    script/bench-checkpoint-setup --preset tiny-sd15 --reps 5                    # smoke

Each rep loads both, alternating (folder, file, folder, ...), with `Engine.load` (what setup()
runs: checks, load, the fast path; compiling is left to SDCOG_COMPILE as in setup), after one
untimed load of each so that both read from the page cache. Prints the median of each and their
ratio. Target: file / folder <= 1.3. The folder's safety checker is removed first: a checkpoint
holds none, so both load the same modules.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdcog.generate.engine import Engine, free_accelerator_memory
from sdcog_tools.random_pipelines import save_pipeline
from sdcog_tools.single_file_checkpoints import save_checkpoint_dir

TARGET_RATIO = 1.3


def timed_load(path: Path, device: torch.device) -> float:
    started = time.perf_counter()
    engine = Engine.load(path, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    del engine
    gc.collect()
    free_accelerator_memory()
    return elapsed


def without_safety_checker(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("safety_checker", "feature_extractor"):
        if name in index:
            index[name] = [None, None]
            shutil.rmtree(folder / name, ignore_errors=True)
    index["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="script/bench-checkpoint-setup", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", default="tiny-sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="save the weights in half precision")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        folder = save_pipeline(
            args.preset, Path(work) / "folder", dtype=torch.float16 if args.fp16 else torch.float32
        )
        without_safety_checker(folder)  # a checkpoint holds none: load the same modules
        file = save_checkpoint_dir(folder, Path(work) / "file")
        file_bytes = file.stat().st_size
        for path in (folder, file.parent):  # warm the page cache for both
            timed_load(path, device)
        times: dict[str, list[float]] = {"folder": [], "file": []}
        for _ in range(args.reps):
            times["folder"].append(timed_load(folder, device))
            times["file"].append(timed_load(file.parent, device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["file"] / medians["folder"]
    figures = {
        "preset": args.preset,
        "device": str(device),
        "dtype": "float16" if args.fp16 else "float32",
        "file_bytes": file_bytes,
        "folder_s": [round(value, 3) for value in times["folder"]],
        "file_s": [round(value, 3) for value in times["file"]],
        "median_folder_s": round(medians["folder"], 3),
        "median_file_s": round(medians["file"], 3),
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "verdict": "PASS" if ratio <= TARGET_RATIO else "FAIL",
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
