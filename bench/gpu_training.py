"""Peak GPU memory of ``txt2img train``'s memory tiers, and its data-parallel scaling, on the
full-size SD 2.1-base architecture.

The model has SD 2.1-base's exact shapes (865M-parameter UNet, OpenCLIP ViT-H text encoder,
the SD VAE) with random weights, so nothing is downloaded. It is saved as a local diffusers
folder, registered in a scratch catalog as a full model of the SD 2.1-base family, and each
tier runs the real trainer (``training.dreambooth.train``) in its own process, so the peak
(``torch.cuda.max_memory_allocated``) belongs to that tier alone.

On a box with several GPUs it then trains one tier (``--scaling-tier``, default lora-fp16)
through the real command, ``txt2img train --processes P`` (torchrun, one process per GPU),
with 1 process and with ``--processes`` (default every GPU), and prints for each: processes,
examples per optimizer step (batch_size x processes x gradient_accumulation_steps), steps/s
(the run's ``steps_per_second`` metric: the optimisation loop only), examples/s, and the
examples/s ratio of P processes to 1 (ideally close to P). Then it trains the full-fp32 tier in
P processes twice, plain DDP and ``sharding=fsdp``, and prints for each the trained parameters and
optimizer state one process holds (the run's ``state_mib_per_process`` metric) and its speed, with
the ratios (target: memory at most 0.6x of DDP's). With one GPU those parts print one line saying
so and are skipped.

    PYTHONPATH=. python bench/gpu_training.py [--steps 20] [--tier NAME ...]
        [--scaling-tier NAME] [--processes P] [--only-scaling]

Needs a CUDA GPU, and bitsandbytes for the 8-bit Adam tiers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from catalog.schema import CatalogEntry
from catalog.store import load_catalog, write_entry
from training.demo_dataset import write_demo_dataset
from training.dreambooth import train
from training.hyperparameters import Hyperparameters

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "sd21-base-random"
BASE_ID = "model-txt2img-stabilityai-stable-diffusion-v2-1-base"
GIB = 1024**3

# name -> (hyperparameters, the budget the docs claim in GiB)
TIERS: dict[str, tuple[dict[str, object], float | None]] = {
    "full-fp32": ({"method": "full", "mixed_precision": "no"}, None),
    "full-fp16-8bit-gc": (
        {"method": "full", "mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True},
        16.0,
    ),
    "lora-fp16": ({"method": "lora", "mixed_precision": "fp16", "learning_rate": 1e-4}, 10.0),
    "lora-fp16-gc": (
        {"method": "lora", "mixed_precision": "fp16", "gradient_checkpointing": True, "learning_rate": 1e-4},
        10.0,
    ),
}


def register(folder: Path) -> None:
    write_entry(
        CatalogEntry(
            id=MODEL_ID,
            source="finetune",
            family="sd2-base",
            resolution=512,
            description="SD 2.1-base architecture with random weights, for memory measurements.",
            base=BASE_ID,
            method="full",
            artifact=str(folder),
        )
    )


def run_tier(name: str, data: Path, steps: int) -> dict[str, float]:
    """Child-process body: train one tier and report its peak GPU memory."""
    import torch

    overrides, _ = TIERS[name]
    hyperparameters = Hyperparameters(
        max_steps=steps, checkpointing_steps=steps + 1, validation_prompts=["a photo of sks toy"], **overrides
    )
    torch.cuda.reset_peak_memory_stats()
    entry = train(data, MODEL_ID, f"tier-{name}", hyperparameters, progress=False)
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "steps_per_second": entry.metrics["steps_per_second"],
    }


def train_with_cli(
    data: Path, base: str, name: str, processes: int, overrides: dict[str, object], steps: int
) -> dict[str, float]:
    """Train ``base`` through ``txt2img train --processes P``, the product's data-parallel path,
    in the scratch home of ``TXT2IMG_HOME``; return the throughput its catalog entry records."""

    # One validation image (the trainer always draws some): it is outside the timed loop, but costs time.
    settings = {"max_steps": steps, "checkpointing_steps": steps + 1, "validation_prompts": "a photo of sks toy"}
    pairs = [f"{key}={value}" for key, value in {**settings, **overrides}.items()]
    hyperparameters = Hyperparameters.from_pairs(pairs)
    command = [sys.executable, "-m", "txt2img", "train", str(data), "--base", base, "--name", name]
    command += ["--processes", str(processes)] + [part for pair in pairs for part in ("--hp", pair)]
    result = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"txt2img train --processes {processes} failed: {(result.stderr or result.stdout)[-2000:]}")
    entry = load_catalog().get(name)
    per_step = hyperparameters.batch_size * processes * hyperparameters.gradient_accumulation_steps
    steps_per_second = entry.metrics["steps_per_second"] or 0.0
    return {
        "processes": processes,
        "examples_per_step": per_step,
        "steps_per_second": steps_per_second,
        "examples_per_second": steps_per_second * per_step,
        "state_mib_per_process": entry.metrics["state_mib_per_process"],
    }


def compare_processes(
    data: Path, base: str, tier: str, overrides: dict[str, object], processes: int, steps: int
) -> None:
    """Print 1 process against ``processes`` on one tier, and the examples/s ratio."""
    print(f"\ndata-parallel scaling, tier {tier}, {steps} steps per run", flush=True)
    print(f"{'processes':>9} {'examples/step':>14} {'steps/s':>8} {'examples/s':>11}", flush=True)
    results = {}
    for count in sorted({1, processes}):
        results[count] = train_with_cli(data, base, f"scaling-{tier}-{count}", count, overrides, steps)
        numbers = results[count]
        print(
            f"{count:>9} {numbers['examples_per_step']:>14} {numbers['steps_per_second']:>8.3f} "
            f"{numbers['examples_per_second']:>11.3f}",
            flush=True,
        )
    single = results[1]["examples_per_second"]
    ratio = results[processes]["examples_per_second"] / single if single else float("nan")
    print(f"{processes} processes / 1 process, examples/s = {ratio:.2f} (ideal {processes})", flush=True)


def compare_sharding(data: Path, base: str, processes: int, steps: int) -> None:
    """Print plain DDP against sharding=fsdp on the full-fp32 tier in ``processes`` processes, and the ratios."""
    print(f"\nsharding, tier full-fp32, {processes} processes, {steps} steps per run", flush=True)
    print(f"{'sharding':>8} {'state MiB/process':>18} {'steps/s':>8} {'examples/s':>11}", flush=True)
    results = {}
    for sharding in ("none", "fsdp"):
        overrides = {**TIERS["full-fp32"][0], "sharding": sharding}
        results[sharding] = numbers = train_with_cli(data, base, f"sharding-{sharding}", processes, overrides, steps)
        print(
            f"{sharding:>8} {numbers['state_mib_per_process']:>18.1f} {numbers['steps_per_second']:>8.3f} "
            f"{numbers['examples_per_second']:>11.3f}",
            flush=True,
        )
    memory = results["fsdp"]["state_mib_per_process"] / results["none"]["state_mib_per_process"]
    plain_speed = results["none"]["steps_per_second"]
    speed = results["fsdp"]["steps_per_second"] / plain_speed if plain_speed else float("nan")
    print(f"fsdp / none: state per process {memory:.2f}x (target <= 0.6x), steps/s {speed:.2f}x", flush=True)


def measure_tiers(data: Path, tiers: list[str], steps: int) -> None:
    """Print each tier's peak memory against its budget, each tier trained in a process of its own."""
    print(f"{'tier':<20} {'peak alloc GiB':>15} {'peak reserved GiB':>18} {'steps/s':>8}  budget")
    for name in tiers:
        result = subprocess.run(
            [sys.executable, __file__, "--steps", str(steps), "--child", name, str(data)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode or not lines:
            print(f"{name:<20} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
            continue
        numbers = json.loads(lines[-1][len("RESULT ") :])
        budget = TIERS[name][1]
        verdict = (
            "" if budget is None else f"< {budget:g} GiB: {'yes' if numbers['peak_reserved_gib'] < budget else 'NO'}"
        )
        print(
            f"{name:<20} {numbers['peak_allocated_gib']:>15.2f} {numbers['peak_reserved_gib']:>18.2f} "
            f"{numbers['steps_per_second'] or 0:>8.2f}  {verdict}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tier", action="append", choices=sorted(TIERS), help="default: all tiers")
    parser.add_argument("--scaling-tier", default="lora-fp16", choices=sorted(TIERS), help="default: lora-fp16")
    parser.add_argument("--processes", type=int, help="processes of the scaling run; default: every visible GPU")
    parser.add_argument("--only-scaling", action="store_true", help="skip the memory tiers")
    parser.add_argument("--child", nargs=2, metavar=("TIER", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from sd21_random import build_sd21_base_pipeline

    if args.child:
        print("RESULT " + json.dumps(run_tier(args.child[0], Path(args.child[1]), args.steps)), flush=True)
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_training.py needs a CUDA GPU")

    # Decided before the model is built (minutes), so --only-scaling on one GPU stops at once.
    processes = args.processes or torch.cuda.device_count()
    scaling = 2 <= processes <= torch.cuda.device_count()
    skipped = (
        f"data-parallel scaling skipped: it needs 2+ GPUs, one per process (--processes {processes}, "
        f"{torch.cuda.device_count()} visible)"
    )
    if not scaling and args.only_scaling:
        print(skipped)
        return
    with tempfile.TemporaryDirectory(prefix="txt2img-gpu-bench-") as scratch:
        root = Path(scratch)
        os.environ["TXT2IMG_HOME"] = str(root / "home")
        print("building SD 2.1-base (random weights) ...", flush=True)
        build_sd21_base_pipeline().save_pretrained(root / "sd21-base", safe_serialization=True)
        register(root / "sd21-base")
        data = write_demo_dataset(root / "data", size=512)
        if not args.only_scaling:
            measure_tiers(data, args.tier or list(TIERS), args.steps)
        if not scaling:
            print(f"\n{skipped}")
            return
        tier = args.scaling_tier
        compare_processes(data, MODEL_ID, tier, TIERS[tier][0], processes, args.steps)
        compare_sharding(data, MODEL_ID, processes, args.steps)


if __name__ == "__main__":
    main()
