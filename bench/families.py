"""Every family's tiny stand-in through one ``bentoml serve``: images/s over HTTP per family, against the same
pipeline called in this process, so that a family that falls off a fast path (or pays more overhead) shows.

Each family's stand-in (catalog/tiny_families.py) is registered in a temporary catalog; both sides run it
on the CPU at 64x64, 4 steps, the family's own guidance, with the same torch thread count, alternating by
round. Target: every family keeps at least 95% of its in-process rate.

    PYTHONPATH=. python bench/families.py [--rounds 3] [--images 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
from serving_common import HEIGHT, PAYLOAD, STEPS, TORCH_THREADS, WIDTH, run_in_own_session, running_server

from catalog.families import FAMILIES
from catalog.store import write_entry
from catalog.tiny_families import STAND_IN_IDS, TINY_PIPELINES, stand_in_entries
from serving.generation import BatchItem, generate_images


def in_process(pipeline, name: str, seed: int) -> None:
    """One image the way ``txt2img generate`` makes it (serving.generation), without a server."""
    generate_images(
        pipeline,
        [BatchItem(PAYLOAD["prompt"], None, seed)],
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=STEPS,
        guidance_scale=FAMILIES[name].default_guidance,
    )


def post(client: httpx.Client, name: str, seed: int) -> None:
    response = client.post("/txt2img", json={**PAYLOAD, "model": STAND_IN_IDS[name], "seed": seed})
    response.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=6, help="images per family, per side, per round")
    args = parser.parse_args()
    run_in_own_session()

    import torch

    torch.set_num_threads(TORCH_THREADS)
    pipelines = {name: build() for name, build in TINY_PIPELINES.items()}
    seconds = {name: {"in-process": 0.0, "http": 0.0} for name in pipelines}
    home = Path(tempfile.mkdtemp(prefix="txt2img-bench-families-"))
    for entry in stand_in_entries():
        write_entry(entry, home / "catalog")
    with running_server(str(home), max_loaded_models=str(len(pipelines))) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            for name, pipeline in pipelines.items():  # first calls pay one-time setup on both sides
                in_process(pipeline, name, 0)
                post(client, name, 0)
            for round_index in range(args.rounds):
                seeds = range(round_index * args.images, (round_index + 1) * args.images)
                for name, pipeline in pipelines.items():
                    started = time.perf_counter()
                    for seed in seeds:
                        in_process(pipeline, name, seed)
                    seconds[name]["in-process"] += time.perf_counter() - started
                    started = time.perf_counter()
                    for seed in seeds:
                        post(client, name, seed)
                    seconds[name]["http"] += time.perf_counter() - started
    images = args.rounds * args.images
    print(
        f"every family's stand-in, CPU, 64x64, {STEPS} steps, torch threads {TORCH_THREADS}, {images} images per side"
    )
    for name, sides in seconds.items():
        rates = {side: images / total for side, total in sides.items()}
        ratio = rates["http"] / rates["in-process"]
        print(
            f"  {name:<9} http {rates['http']:6.2f} images/s   in-process {rates['in-process']:6.2f} images/s"
            f"   http / in-process = {ratio:.3f}  (target >= 0.95)"
        )


if __name__ == "__main__":
    main()
