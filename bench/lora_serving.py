"""LoRAs per request (issue 23): 20 LoRAs round-robin against the base alone, the time to switch adapters,
the memory per loaded adapter, and 2 LoRAs composed against 1.

One ``bentoml serve`` runs tiny-sd on the CPU (64x64, 4 steps, one torch thread, batches of up to 8) with
20 LoRA fine-tunes of it (rank 4 on every attention projection, random weights) in its catalog. Eight
client threads keep it busy with ``/txt2img`` requests whose ``loras`` field picks the set-up: none (the
base alone), a different LoRA for each request in turn (round-robin over the 20), one LoRA for all, or two
LoRAs composed for all. Rounds alternate between the set-ups so that load from other processes hits all
alike. Target: round-robin reaches at least 0.8x the base's throughput.

The switch time is the latency of one request at a time that changes LoRA every request, less that of
one that keeps the same LoRA. The memory per adapter is the growth of the server worker's RSS from one
LoRA loaded to all 20, divided by 19.

    PYTHONPATH=. python bench/lora_serving.py [--rounds 3] [--requests 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serving_common import PAYLOAD, STEPS, TORCH_THREADS, bentoml_server, run_in_own_session
from serving_finetunes import write_random_loras  # tests/, which serving_common puts on the path

CONCURRENCY = 8
LORA_COUNT = 20
LORA_RANK = 4
SWITCH_REQUESTS = 20


def post(client: httpx.Client, seed: int, loras: list[tuple[str, float]]) -> bytes:
    body = {**PAYLOAD, "seed": seed, "loras": [{"model": model, "scale": scale} for model, scale in loras]}
    response = client.post("/txt2img", json=body)
    response.raise_for_status()
    return response.content


def setups(lora_ids: list[str]) -> dict:
    """Each set-up: the ``loras`` of the request with a given seed."""
    return {
        "base alone": lambda seed: [],
        f"{LORA_COUNT} LoRAs round-robin": lambda seed: [(lora_ids[seed % LORA_COUNT], 1.0)],
        "1 LoRA": lambda seed: [(lora_ids[0], 1.0)],
        "2 LoRAs composed": lambda seed: [(lora_ids[0], 1.0), (lora_ids[1], 0.6)],
    }


def concurrent_round(client: httpx.Client, seeds: list[int], loras_of) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda seed: post(client, seed, loras_of(seed)), seeds))
    return time.perf_counter() - started


def check_loras_apply(client: httpx.Client, lora_ids: list[str]) -> None:
    """Stop unless the server applies ``loras``: a server that ignored them would make every ratio 1."""
    if post(client, 0, []) == post(client, 0, [(lora_ids[0], 1.0)]):
        raise SystemExit("this server ignores `loras` (the image is the base's): nothing to measure")


def worker_rss(server) -> int:
    return sum(worker.memory_info().rss for worker in bentoml_server.service_workers(server))


def memory_per_adapter(client: httpx.Client, server, lora_ids: list[str]) -> float:
    """Bytes of worker RSS each further loaded adapter adds, from one loaded to all of them."""
    post(client, 0, [(lora_ids[0], 1.0)])
    one_loaded = worker_rss(server)
    for lora_id in lora_ids[1:]:
        post(client, 0, [(lora_id, 1.0)])
    return (worker_rss(server) - one_loaded) / (len(lora_ids) - 1)


def switch_seconds(client: httpx.Client, lora_ids: list[str]) -> tuple[float, float]:
    """Median latency of one request at a time keeping the same LoRA, and changing it every request."""

    def median_latency(pick) -> float:
        latencies = []
        for index in range(SWITCH_REQUESTS):
            started = time.perf_counter()
            post(client, index, [(pick(index), 1.0)])
            latencies.append(time.perf_counter() - started)
        return statistics.median(latencies)

    same = median_latency(lambda index: lora_ids[0])
    switching = median_latency(lambda index: lora_ids[index % LORA_COUNT])
    return same, switching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="requests per set-up per round")
    args = parser.parse_args()
    run_in_own_session()

    home = Path(tempfile.mkdtemp(prefix="txt2img-bench-lora-"))
    lora_ids = write_random_loras(home, LORA_COUNT, rank=LORA_RANK)
    cases = setups(lora_ids)
    seconds = dict.fromkeys(cases, 0.0)
    settings = {"torch_threads": str(TORCH_THREADS), "max_batch_size": "8", "batch_wait_ms": "50"}
    with (
        bentoml_server.server_process(home, ready_timeout_s=300, **settings) as (url, server),
        httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=16)) as client,
    ):
        check_loras_apply(client, lora_ids)
        adapter_bytes = memory_per_adapter(client, server, lora_ids)
        same_s, switching_s = switch_seconds(client, lora_ids)
        for round_index in range(args.rounds):
            seeds = list(range(round_index * args.requests, (round_index + 1) * args.requests))
            for name, loras_of in cases.items():
                seconds[name] += concurrent_round(client, seeds, loras_of)
    rates = {name: args.rounds * args.requests / spent for name, spent in seconds.items()}
    report(rates, adapter_bytes, same_s, switching_s, args.rounds * args.requests)


def report(rates: dict[str, float], adapter_bytes: float, same_s: float, switching_s: float, images: int) -> None:
    print(
        f"tiny-sd, CPU, 64x64, {STEPS} steps, torch threads {TORCH_THREADS}, concurrency {CONCURRENCY}, "
        f"{images} images per set-up, {LORA_COUNT} rank-{LORA_RANK} LoRAs"
    )
    for name, rate in rates.items():
        print(f"  {name:<22} {rate:6.2f} images/s")
    round_robin = rates[f"{LORA_COUNT} LoRAs round-robin"]
    print(f"  round-robin / base alone     = {round_robin / rates['base alone']:.3f}  (target >= 0.8)")
    print(f"  2 LoRAs composed / 1 LoRA    = {rates['2 LoRAs composed'] / rates['1 LoRA']:.3f}")
    print(f"  1 LoRA / base alone          = {rates['1 LoRA'] / rates['base alone']:.3f}")
    print(
        f"  switch time                  = {1000 * (switching_s - same_s):.1f} ms per request "
        f"({1000 * switching_s:.1f} ms switching vs {1000 * same_s:.1f} ms same LoRA, one at a time)"
    )
    print(f"  memory per loaded adapter    = {adapter_bytes / 2**20:.2f} MiB of worker RSS")


if __name__ == "__main__":
    main()
