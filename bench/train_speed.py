"""Training speed and peak memory of ``txt2img train`` on tiny-sd, optionally against diffusers'
``examples/dreambooth/train_dreambooth.py`` run on the same model, data and hyperparameters.

Each trainer runs in its own process, so peak RSS (from ``wait4``) is that trainer's alone.
Steps/s counts only the optimisation loop: ours reports it as the ``steps_per_second`` metric,
the reference's is read from its tqdm bar.

    python bench/train_speed.py [--steps 60] [--method full|lora]
    python bench/train_speed.py --processes 2     # 1 process and 2 (gloo on the CPU), and their ratio
    python bench/train_speed.py --sharding        # 2 processes, plain DDP against sharding=fsdp
    python bench/train_speed.py --reference /path/to/train_dreambooth.py --reference-python /venv/bin/python

The reference script needs torchvision (so, usually, its own virtualenv); fetch it from the
diffusers repository yourself and never commit it here.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from catalog.tiny_sd import build_tiny_sd_pipeline
from training.demo_dataset import write_demo_dataset

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks red toy"
# JumpStart's defaults, made explicit for both trainers.
LEARNING_RATE = "2e-6"


def _run(command: list[str], env: dict[str, str]) -> tuple[str, float]:
    """Run ``command``; return its combined output and its peak RSS in GB."""
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if process.returncode:
        sys.exit(f"{command[0]} {command[1]} failed ({process.returncode}):\n{output[-3000:]}")
    return output, usage.ru_maxrss / 1024 / 1024  # ru_maxrss is in KiB on Linux


def run_ours(
    data: Path, home: Path, steps: int, method: str, processes: int = 1, sharding: str = "none"
) -> tuple[dict[str, float], float]:
    """The run's metrics (``name=value`` lines: steps_per_second, state_mib_per_process, ...) and its
    peak RSS in GB; with several processes wait4 reports the largest one's."""
    command = [
        sys.executable, "-m", "txt2img", "train", str(data), "--base", "tiny-sd", "--name", "bench",
        "--method", method, "--hp", f"max_steps={steps}", "--hp", f"learning_rate={LEARNING_RATE}",
        "--hp", f"checkpointing_steps={steps + 1}", "--hp", f"validation_prompts={PROMPT}",
        "--processes", str(processes), "--hp", f"sharding={sharding}",
    ]  # fmt: skip
    # One torch thread per process: more on a small shared machine only spin against each other.
    env = {**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    output, rss = _run(command, env)
    return {name: float(value) for name, value in re.findall(r"^(\w+)=([\d.]+)$", output, re.MULTILINE)}, rss


def run_reference(script: Path, python: str, data: Path, model: Path, out: Path, steps: int) -> tuple[float, float]:
    command = [
        python, str(script), "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
        "--instance_prompt", PROMPT, "--resolution", "64", "--train_batch_size", "1",
        "--max_train_steps", str(steps), "--learning_rate", LEARNING_RATE, "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--seed", "0", "--checkpointing_steps", str(steps + 1),
        "--output_dir", str(out),
    ]  # fmt: skip
    output, rss = _run(command, {**os.environ, "ACCELERATE_MIXED_PRECISION": "no"})
    # tqdm's final bar: "60/60 [00:13<00:00,  4.34it/s, loss=...]", or "s/it" when slower than 1 it/s.
    rates = re.findall(rf"{steps}/{steps} \[[^\]]*?([\d.]+)(it/s|s/it)", output)
    if not rates:
        sys.exit(f"could not read the reference's it/s from its output:\n{output[-2000:]}")
    value, unit = rates[-1]
    return (float(value) if unit == "it/s" else 1 / float(value)), rss


def compare_processes(data: Path, root: Path, args: argparse.Namespace, one_rate: float, one_rss: float) -> None:
    """The same run in ``args.processes`` processes: each step then takes that many batches."""
    metrics, rss = run_ours(data, root / "home-processes", args.steps, args.method, args.processes)
    rate = metrics["steps_per_second"]
    # Batch 1, no accumulation: one example per process per step.
    print(f"1 process: {one_rate:.2f} steps/s, {one_rate:.2f} examples/s, peak RSS {one_rss:.2f} GB")
    print(
        f"{args.processes} processes: {rate:.2f} steps/s, {rate * args.processes:.2f} examples/s, "
        f"peak RSS of the largest process {rss:.2f} GB"
    )
    print(f"ratio ({args.processes} processes / 1): examples/s {rate * args.processes / one_rate:.2f}x")


def compare_sharding(data: Path, root: Path, steps: int) -> None:
    """A full fine-tune in 2 processes, plain DDP and sharding=fsdp: the trained parameters and optimizer
    state one process holds (the trainer sums the local part of each tensor), speed, and their ratios."""
    runs = {
        sharding: run_ours(data, root / f"home-{sharding}", steps, "full", 2, sharding) for sharding in ("none", "fsdp")
    }
    for sharding, (metrics, rss) in runs.items():
        print(
            f"2 processes, sharding={sharding}: parameters + optimizer state {metrics['state_mib_per_process']:.2f} "
            f"MiB per process, {metrics['steps_per_second']:.2f} steps/s, peak RSS of the largest process {rss:.2f} GB"
        )
    (plain, plain_rss), (sharded, sharded_rss) = runs["none"], runs["fsdp"]
    memory = sharded["state_mib_per_process"] / plain["state_mib_per_process"]
    speed = sharded["steps_per_second"] / plain["steps_per_second"]
    print(
        f"ratio (fsdp / none): parameter + optimizer memory per process {memory:.2f}x (target <= 0.6x), "
        f"steps/s {speed:.2f}x, peak RSS {sharded_rss / plain_rss:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--processes", type=int, default=1, help="also train data-parallel in this many")
    parser.add_argument("--sharding", action="store_true", help="only compare DDP and sharding=fsdp in 2 processes")
    parser.add_argument("--reference", type=Path, help="path to diffusers' train_dreambooth.py")
    parser.add_argument("--reference-python", default=sys.executable, help="python of a venv with torchvision")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))

    with tempfile.TemporaryDirectory(prefix="txt2img-train-bench-") as scratch:
        root = Path(scratch)
        data = write_demo_dataset(root / "data")
        if args.sharding:
            compare_sharding(data, root, args.steps)
            return
        ours, ours_rss = run_ours(data, root / "home", args.steps, args.method)
        ours_rate = ours["steps_per_second"]
        print(f"txt2img train ({args.method}): {ours_rate:.2f} steps/s, peak RSS {ours_rss:.2f} GB")
        if args.processes > 1:
            compare_processes(data, root, args, ours_rate, ours_rss)
        if args.reference is None:
            return
        model = root / "tiny-sd"
        build_tiny_sd_pipeline().save_pretrained(model, safe_serialization=True)
        instance = root / "instance"  # the reference reads every file in the folder as an image
        instance.mkdir()
        for image in data.glob("*.png"):
            (instance / image.name).write_bytes(image.read_bytes())
        ref_rate, ref_rss = run_reference(
            args.reference, args.reference_python, instance, model, root / "reference", args.steps
        )
        print(f"diffusers train_dreambooth.py: {ref_rate:.2f} steps/s, peak RSS {ref_rss:.2f} GB")
        print(f"ratio (ours / reference): speed {ours_rate / ref_rate:.2f}x, peak RSS {ours_rss / ref_rss:.2f}x")


if __name__ == "__main__":
    main()
