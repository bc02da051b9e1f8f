"""Prompt cache: repeated-prompt throughput with the prompt-embedding cache against without it, in one run.

Each request is one pipeline call (``serving.generation.generate_images``, as the server's queue
makes it) of one image whose prompt and negative prompt were seen before, at the model's native
size and a few steps, on the CPU with one torch thread. Rounds alternate between the two sides so
that load from other processes hits both alike; every image is checked byte-identical between them.
It prints images/s for each side and syntax, their ratio, and the share of an uncached request
spent in the text encoder.

    PYTHONPATH=. python bench/prompt_cache.py [--model tiny-sd|tiny-flux] [--rounds 5] [--requests 8] [--steps 4]

A model is a builder in PIPELINES, with the guidance and negative prompt its requests get: tiny-sd
with classifier-free guidance and a negative prompt, and ``tiny-flux`` (catalog/tiny_families.py) as
FLUX.1 [schnell] is asked, without guidance or a negative, where T5 encoding is a large share of a request.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

from catalog.tiny_families import TINY_RESOLUTION, build_tiny_flux_pipeline
from catalog.tiny_sd import TINY_SD_RESOLUTION, build_tiny_sd_pipeline
from serving.generation import BatchItem, generate_images
from serving.prompts import PromptEmbeddingCache, encode_texts, text_encoders_for

TORCH_THREADS = 1
NEGATIVE_PROMPT = "blurry, gray, small, old"


@dataclass(frozen=True)
class BenchModel:
    """A pipeline this bench can run: its builder, native size, and what each request asks of it."""

    build: Callable
    size: int
    guidance_scale: float
    negative_prompt: str | None


PIPELINES = {
    "tiny-sd": BenchModel(build_tiny_sd_pipeline, TINY_SD_RESOLUTION, 7.5, NEGATIVE_PROMPT),
    "tiny-flux": BenchModel(build_tiny_flux_pipeline, TINY_RESOLUTION, 0.0, None),
}
# A prompt as AUTOMATIC1111 users write them: weights, and past the text encoder's 77 tokens.
A1111_PROMPT = (
    "a (beautiful:1.3) photo of a red car on a street in the city at night, (cinematic lighting), "
    "high quality, detailed, [blurry], a castle on a mountain near a lake under the moon, oil painting "
    "style, golden light, a small boat on the river, a tree with pink flowers, a bird in the sky, "
    "realistic, colorful, (close up view:0.8), digital art, a village by the sea, snow on the road"
)
PLAIN_PROMPT = "a photo of a red car on a street in the city at night, cinematic lighting, high quality"


def run_requests(pipeline, model: BenchModel, steps: int, syntax: str, count: int, cache) -> tuple[float, list[bytes]]:
    """Seconds for ``count`` one-image requests of the same prompt, and their pixels."""
    prompt = A1111_PROMPT if syntax == "a1111" else PLAIN_PROMPT
    images = []
    started = time.perf_counter()
    for seed in range(count):
        [image] = generate_images(
            pipeline,
            [BatchItem(prompt, model.negative_prompt, seed, syntax)],
            width=model.size,
            height=model.size,
            num_inference_steps=steps,
            guidance_scale=model.guidance_scale,
            prompt_cache=cache,
        )
        images.append(image.tobytes())
    return time.perf_counter() - started, images


def encoding_seconds(pipeline, model: BenchModel, syntax: str, cache, repeats: int = 10) -> float:
    """Seconds one request's prompt (and negative prompt) take to encode (``cache`` None) or to look up."""
    prompt = A1111_PROMPT if syntax == "a1111" else PLAIN_PROMPT
    texts = [(syntax, text) for text in (prompt, model.negative_prompt) if text is not None]
    encoders = text_encoders_for(pipeline, {syntax})
    started = time.perf_counter()
    for _ in range(repeats):
        encode_texts(pipeline, texts, encoders, cache)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PIPELINES), default="tiny-sd")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8, help="requests per side per round")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(TORCH_THREADS)
    model = PIPELINES[args.model]
    pipeline = model.build()
    print(
        f"{args.model}, CPU, {model.size}x{model.size}, {args.steps} steps, guidance {model.guidance_scale:g}, "
        f"negative prompt {'yes' if model.negative_prompt else 'none'}, torch threads {TORCH_THREADS}, "
        f"{args.rounds * args.requests} requests per side, one image each, the same prompt every time"
    )
    for syntax in ("plain", "a1111"):
        cache = PromptEmbeddingCache(64 * 2**20)
        run_requests(pipeline, model, args.steps, syntax, 1, cache)  # first calls pay one-time setup; fills the cache
        seconds = {"uncached": 0.0, "cached": 0.0}
        for _ in range(args.rounds):
            uncached, plain_images = run_requests(pipeline, model, args.steps, syntax, args.requests, None)
            cached, cached_images = run_requests(pipeline, model, args.steps, syntax, args.requests, cache)
            assert cached_images == plain_images, "the cache changed an image"
            seconds["uncached"] += uncached
            seconds["cached"] += cached
        rates = {side: args.rounds * args.requests / total for side, total in seconds.items()}
        hits, misses = cache.hits, cache.misses
        encoding, lookup = (
            encoding_seconds(pipeline, model, syntax, None),
            encoding_seconds(pipeline, model, syntax, cache),
        )
        share = encoding / (seconds["uncached"] / (args.rounds * args.requests))
        print(
            f"  {syntax:<6} uncached {rates['uncached']:6.2f} images/s, cached {rates['cached']:6.2f} images/s, "
            f"cached / uncached = {rates['cached'] / rates['uncached']:.3f}; prompts per request: encoded "
            f"{1000 * encoding:.1f} ms ({100 * share:.0f}% of an uncached request), cached {1000 * lookup:.2f} ms "
            f"(hits {hits}, misses {misses})"
        )


if __name__ == "__main__":
    main()
