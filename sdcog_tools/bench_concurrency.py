"""`script/bench --concurrency N`: images per second with N clients at once against one client.

Cog's real server on the weights (as `script/serve` runs it) takes the same request (prompt, size,
steps; each with its own seed) first from one client that waits for each answer (serial), then
from N clients at once, with batching on and with batching off (SDCOG_BATCHING=0, a server of its
own). Reported per run: images per second, latency p50/p95, and the batch sizes the predictions'
metrics name; the JSON record keeps every prediction's metrics (queue wait, denoise, decode, encode).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from sdcog.model.weights import PROJECT_ROOT, WEIGHTS_ENV
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import CogServer, running_server


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def drive(server: CogServer, inputs: dict[str, Any], clients: int, requests: int) -> dict[str, Any]:
    """`requests` predictions from `clients` clients, each sending its next right after its answer."""

    def client(number: int) -> list[dict[str, Any]]:
        results = []
        with httpx.Client(base_url=server.url, timeout=3600) as session:
            for index in range(number, requests, clients):
                started = time.perf_counter()
                response = session.post("/predictions", json={"input": {**inputs, "seed": index}})
                body = response.json()
                if response.status_code != 200 or body.get("status") != "succeeded":
                    raise RuntimeError(f"prediction {index}: HTTP {response.status_code}: {body}")
                results.append(
                    {"latency_s": time.perf_counter() - started, "metrics": body.get("metrics", {})}
                )
        return results

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for results in pool.map(client, range(clients)) for result in results]
    elapsed = time.perf_counter() - started
    latencies = [result["latency_s"] for result in results]
    batches = [result["metrics"].get("batch_size", 1) for result in results]
    return {
        "clients": clients,
        "requests": requests,
        "seconds": elapsed,
        "images_per_s": requests * inputs.get("num_outputs", 1) / elapsed,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "batch_sizes": {str(size): batches.count(size) for size in sorted(set(batches))},
        "predictions": results,
    }


def run_concurrency(
    directory: Path, device: torch.device, inputs: dict[str, Any], clients: int, requests: int
) -> dict[str, Any]:
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    env = {WEIGHTS_ENV: str(directory), **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {})}
    runs = {}
    for batching in ("1", "0"):
        with running_server(PROJECT_ROOT, env={**env, "SDCOG_BATCHING": batching}) as server:
            drive(server, inputs, 1, min(4, requests))  # warm-up
            if batching == "1":
                runs["serial"] = drive(server, inputs, 1, requests)
                runs["concurrent"] = drive(server, inputs, clients, requests)
            else:
                runs["concurrent, batching off"] = drive(server, inputs, clients, requests)
    serial = runs["serial"]["images_per_s"]
    return {
        "device": str(device),
        "inputs": inputs,
        "runs": runs,
        "speedup": {name: run["images_per_s"] / serial for name, run in runs.items()},
    }


def format_concurrency(record: dict[str, Any]) -> str:
    inputs = record["inputs"]
    lines = [
        f"concurrency on {record['device']}: {inputs['width']}x{inputs['height']}, "
        f"{inputs['num_inference_steps']} steps, {inputs.get('num_outputs', 1)} image(s) per request",
        f"{'run':26} {'clients':>7} {'images/s':>9} {'x serial':>8} {'p50 s':>7} {'p95 s':>7}  batch sizes",
    ]
    for name, run in record["runs"].items():
        lines.append(
            f"{name:26} {run['clients']:7d} {run['images_per_s']:9.2f} {record['speedup'][name]:8.2f} "
            f"{run['latency_p50_s']:7.2f} {run['latency_p95_s']:7.2f}  {run['batch_sizes']}"
        )
    queue = [p["metrics"].get("queue_wait_s", 0) for p in record["runs"]["concurrent"]["predictions"]]
    lines.append(f"concurrent: median queue wait {statistics.median(queue):.2f} s")
    return "\n".join(lines)
