"""GPU speed of full-size SD 2.1-base (random weights): fp32, fp16+SDPA, fp16+xformers, fp16+compile, and the service.

Builds the SD 2.1-base architecture in code (no download: weights are random, which does not change
the speed), then reports it/s and s/image at 512x512, 50 steps, batch 1, for each setup. The last
row serves the same fp16 model through a real ``bentoml serve`` (our pipeline manager, queue and
HTTP) at concurrency 1, to set against the plain diffusers loop (the fp16+SDPA row).

Needs a CUDA GPU (xformers optional: its row says so when it is absent). Run from the repo root:

    PYTHONPATH=. python bench/gpu_pipeline.py [--steps 50] [--images 5] [--skip-compile] [--skip-service]
        [--workers N] [--only-workers]

On a box with several GPUs it first serves the model with one worker and with one worker per GPU
(``--workers``, default every GPU), 2 clients per worker on both, and prints images/s and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd21_random import SIZE, build_sd21_base_pipeline  # noqa: E402 - bench/ is on sys.path above

from catalog.schema import CatalogEntry
from catalog.store import write_entry
from serving.device import optimize_for_device
from serving.settings import ServingSettings

PROMPT = "a photograph of an astronaut riding a horse"


def build_pipeline(dtype):
    pipeline = build_sd21_base_pipeline().to("cuda", dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def time_pipeline(pipeline, steps: int, images: int) -> tuple[float, float, float]:
    """(it/s, s/image, seconds of the first call) over ``images`` single-image calls after one warm-up call."""
    import torch

    def one(seed: int) -> None:
        pipeline(
            PROMPT,
            width=SIZE,
            height=SIZE,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
        )

    started = time.perf_counter()
    one(0)
    torch.cuda.synchronize()
    warm_up = time.perf_counter() - started
    started = time.perf_counter()
    for seed in range(images):
        one(seed + 1)
    torch.cuda.synchronize()
    per_image = (time.perf_counter() - started) / images
    return steps / per_image, per_image, warm_up


def tuned_pipeline(attention: str, compile_unet: bool):
    """An fp16 pipeline tuned by the service's own code path (serving/device.py)."""
    import torch

    pipeline = build_pipeline(torch.float16)
    optimize_for_device(pipeline, "cuda", ServingSettings(attention=attention, compile=compile_unet))
    return pipeline


def save_served_model(steps: int) -> tuple[str, dict]:
    """The fp16 model saved as a local full fine-tune in a fresh txt2img home: (home, request payload)."""
    import torch

    home = tempfile.mkdtemp(prefix="txt2img-gpu-bench-")
    folder = Path(home) / "sd21-base-random"
    build_pipeline(torch.float16).save_pretrained(folder, safe_serialization=True)
    entry = CatalogEntry(
        id="sd21-base-random",
        source="finetune",
        family="sd2-base",
        resolution=SIZE,
        base="model-txt2img-stabilityai-stable-diffusion-v2-1-base",
        method="full",
        artifact=str(folder),
    )
    write_entry(entry, user_dir=Path(home) / "catalog")
    return home, {"model": entry.id, "prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": steps}


def time_service(home: str, payload: dict, images: int) -> tuple[float, float, float]:
    """The same model behind ``bentoml serve``, one worker: warmed, then timed over HTTP one request at a time."""
    import httpx
    from serving_common import running_server

    with (
        running_server(home=home, model=payload["model"], attention="sdpa", workers="1") as url,
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        started = time.perf_counter()
        client.post("/txt2img", json={**payload, "seed": 0}).raise_for_status()
        warm_up = time.perf_counter() - started
        started = time.perf_counter()
        for seed in range(images):
            client.post("/txt2img", json={**payload, "seed": seed + 1}).raise_for_status()
        per_image = (time.perf_counter() - started) / images
    return payload["num_inference_steps"] / per_image, per_image, warm_up


def service_images_per_second(home: str, payload: dict, workers: int, concurrency: int, images: int) -> float:
    """Images/s of ``bentoml serve`` with ``workers`` workers (one per GPU) under ``concurrency`` clients."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serving_common import running_server

    def post(url: str, seed: int) -> None:
        httpx.post(f"{url}/txt2img", json={**payload, "seed": seed}, timeout=600).raise_for_status()

    with running_server(home=home, model=payload["model"], attention="sdpa", workers=str(workers)) as url:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda seed: post(url, seed), range(2 * concurrency)))  # warm every worker
            started = time.perf_counter()
            list(pool.map(lambda seed: post(url, seed), range(images)))
            return images / (time.perf_counter() - started)


def parse_arguments() -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=5, help="timed images per setup")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument(
        "--workers",
        type=int,
        default=torch.cuda.device_count(),
        help="also serve with 1 worker and with this many (one per GPU), 2 clients per worker; default: every GPU",
    )
    parser.add_argument("--only-workers", action="store_true", help="just the 1-worker against N-worker comparison")
    return parser.parse_args()


def compare_workers(steps: int, workers: int) -> None:
    """Print the service's images/s with 1 worker and with ``workers``, 2 clients per worker, and their ratio."""
    home, payload = save_served_model(steps)
    concurrency = 2 * workers
    images = 4 * concurrency
    print(f"serving throughput, concurrency {concurrency}, {images} images per setup", flush=True)
    rates = {}
    for count in sorted({1, workers}):
        rates[count] = service_images_per_second(home, payload, count, concurrency, images)
        print(f"  {count} worker(s): {rates[count]:.3f} images/s", flush=True)
    print(f"  {workers} workers / 1 worker = {rates[workers] / rates[1]:.3f}\n", flush=True)


def measure_setups(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Time each setup, printing its row as it is measured: (setup, "it/s | s/image | first call")."""
    import torch

    rows: list[tuple[str, str]] = []

    def record(name: str, measure) -> None:
        iterations, per_image, warm_up = measure()
        rows.append((name, f"{iterations:6.2f} | {per_image:6.3f} | {warm_up:6.1f}"))
        print(rows[-1][0], rows[-1][1], flush=True)
        torch.cuda.empty_cache()

    record("fp32 (SDPA)", lambda: time_pipeline(build_pipeline(torch.float32), args.steps, args.images))
    record(
        "fp16 + SDPA (plain diffusers loop)",
        lambda: time_pipeline(build_pipeline(torch.float16), args.steps, args.images),
    )
    record(
        "fp16 + SDPA + channels_last (service tuning)",
        lambda: time_pipeline(tuned_pipeline("sdpa", False), args.steps, args.images),
    )
    if importlib.util.find_spec("xformers"):
        record(
            "fp16 + xformers + channels_last",
            lambda: time_pipeline(tuned_pipeline("xformers", False), args.steps, args.images),
        )
    else:
        rows.append(("fp16 + xformers", "skipped: xformers is not installed"))
    if not args.skip_compile:
        record(
            "fp16 + SDPA + compile (regional)",
            lambda: time_pipeline(tuned_pipeline("sdpa", True), args.steps, args.images),
        )
    if not args.skip_service:
        home, payload = save_served_model(args.steps)
        record("service over HTTP (fp16 + SDPA), concurrency 1", lambda: time_service(home, payload, args.images))
    return rows


def print_table(rows: list[tuple[str, str]], steps: int) -> None:
    import torch

    print(
        f"\n{torch.cuda.get_device_name(0)}, SD 2.1-base architecture (random weights), "
        f"{SIZE}x{SIZE}, {steps} steps, batch 1, torch {torch.__version__}\n"
    )
    print("| setup | it/s | s/image | first call, s |")
    print("| --- | --- | --- | --- |")
    for name, values in rows:
        print(f"| {name} | {values} |")


def main() -> None:
    import torch

    args = parse_arguments()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_pipeline.py needs a CUDA GPU")
    if args.workers > 1 or args.only_workers:
        compare_workers(args.steps, args.workers)
        if args.only_workers:
            return
    print_table(measure_setups(args), args.steps)


if __name__ == "__main__":
    main()
