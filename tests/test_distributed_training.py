"""``txt2img train --processes 2``: data-parallel DreamBooth on tiny-sd in two real CPU processes
(gloo) under torchrun; it learns, registers once, and survives losing a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from catalog.pipelines import LORA_WEIGHT_NAME, load_pipeline
from catalog.store import load_catalog
from catalog.tiny_sd import build_tiny_sd_pipeline
from training.demo_dataset import write_demo_dataset
from training.dreambooth import train
from training.hyperparameters import Hyperparameters
from training.losses import denoising_loss
from training.sharding import ShardingSetupError, check_sharding

REPO = Path(__file__).resolve().parents[1]
RED = "a photo of sks red toy"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _red_loss(pipeline, data: Path) -> float:
    images = [Image.open(path).convert("RGB") for path in sorted(data.glob("*.png"))]
    return denoising_loss(pipeline, images, RED, resolution=64)


def _start(data: Path, home: Path, name: str, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "txt2img", "train", str(data), "--base", "tiny-sd", "--name", name, *options]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def _losses(entry) -> list[float]:
    return json.loads(Path(entry.artifact).parent.joinpath("loss_curve.json").read_text())


def _window_means(losses: list[float], width: int) -> list[float]:
    return [sum(losses[start : start + width]) / width for start in range(0, len(losses), width)]


def _worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the torchrun worker with this rank: a child of the launcher, told apart by its RANK."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for child in children:
        environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} among {children}")


def _wait_for_a_checkpoint(launcher: subprocess.Popen, checkpoints: Path) -> None:
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir())):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)


def _resume_ends_as_an_uninterrupted_run(data: Path, home: Path, name: str, options: list[str]) -> None:
    """--resume of the stopped run ``name`` completes it, on the losses of the same run never stopped:
    every rank's random stream, the optimizer and the schedule came back."""
    code, stdout, stderr = _finish(_start(data, home, name, *options, "--resume"))
    assert code == 0, stderr
    assert "resuming from" in stderr and stdout.count(f"registered {name}") == 1
    code, _, stderr = _finish(_start(data, home, "straight", *options))
    assert code == 0, stderr
    resumed, straight = load_catalog().get(name), load_catalog().get("straight")
    assert _losses(resumed) == pytest.approx(_losses(straight), rel=1e-5)
    assert resumed.metrics["final_loss"] == pytest.approx(straight.metrics["final_loss"], rel=1e-5)


def test_two_processes_learn_and_register_one_entry(tmp_path, txt2img_home):
    data = write_demo_dataset(tmp_path / "data")
    base_loss = _red_loss(build_tiny_sd_pipeline(), data)

    hp = ["max_steps=20", "learning_rate=2e-3", f"validation_prompts={RED}"]
    code, stdout, stderr = _finish(_start(data, txt2img_home, "pair", "--processes", "2", *(f"--hp={p}" for p in hp)))

    assert code == 0, stderr
    assert "cpu x 2 processes" in stderr
    # Rank 0 alone registers, prints and writes: one entry, one report, one set of images.
    assert stdout.count("registered pair") == 1 and stdout.count("final_loss=") == 1, stdout
    assert [path.name for path in (txt2img_home / "catalog").glob("*.yaml")] == ["pair.yaml"]
    entry = load_catalog().get("pair")
    output = Path(entry.artifact).parent
    assert sorted(path.name for path in output.iterdir()) == [
        "contact_sheet.png",
        "entry.yaml",
        "hyperparameters.json",
        "loss_curve.json",
        "loss_curve.png",
        "model",
        "steps.jsonl",
        "validation",
    ]
    # The same bar as the one-process run (tests/test_train.py): the loss falls by over 30%.
    trained_loss = _red_loss(load_pipeline(entry, load_catalog()), data)
    assert trained_loss < 0.7 * base_loss, (base_loss, trained_loss)


def test_a_killed_process_stops_the_run_and_resume_completes_it(tmp_path, txt2img_home):
    """LoRA with prior preservation: SIGKILL one of two processes; the other stops, --resume finishes."""
    data = write_demo_dataset(tmp_path / "data")
    base_loss = _red_loss(build_tiny_sd_pipeline(), data)
    options = ["--method", "lora", "--processes", "2"]
    for pair in (
        "max_steps=15",
        "checkpointing_steps=3",
        "learning_rate=5e-2",
        "lora_rank=16",
        "with_prior_preservation=true",
        "num_class_images=2",
        f"validation_prompts={RED}",
    ):
        options += ["--hp", pair]
    checkpoints = txt2img_home / "models" / "lora-pair" / "checkpoints"

    launcher = _start(data, txt2img_home, "lora-pair", *options)
    _wait_for_a_checkpoint(launcher, checkpoints)
    os.kill(_worker_of_rank(launcher, 1), signal.SIGKILL)
    code, stdout, stderr = _finish(launcher)  # the other rank exits too: no hang

    assert code == 1, stderr
    assert stderr.splitlines()[-1] == (
        "txt2img: training process 1 of 2 was killed (SIGKILL), so the run stopped; "
        "continue it with the same command plus --resume"
    )
    assert "Traceback" not in stderr
    assert not list((txt2img_home / "catalog").glob("*.yaml"))
    # Rank 0 alone generated the class images.
    assert len(list((data / "class_data_dir").glob("txt2img-class-*.png"))) == 2

    # Each process's random stream is in the checkpoint: another process count is refused in one line.
    code, _, stderr = _finish(_start(data, txt2img_home, "lora-pair", *options[:2], *options[4:], "--resume"))
    assert code == 2, stderr
    assert stderr.splitlines()[-1].startswith("txt2img: error: cannot resume from ") and "Traceback" not in stderr
    assert stderr.splitlines()[-1].endswith("it was trained with 2 process(es); resume with --processes 2")

    code, stdout, stderr = _finish(_start(data, txt2img_home, "lora-pair", *options, "--resume"))
    assert code == 0, stderr
    assert "resuming from" in stderr and stdout.count("registered lora-pair") == 1
    assert [path.name for path in (txt2img_home / "catalog").glob("*.yaml")] == ["lora-pair.yaml"]
    entry = load_catalog().get("lora-pair")
    assert entry.method == "lora" and Path(entry.artifact, LORA_WEIGHT_NAME).is_file()
    assert _red_loss(load_pipeline(entry, load_catalog()), data) < 0.97 * base_loss


def _gone(pid: int) -> bool:
    """Whether a process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_ranks_die_with_a_killed_launcher_and_resume_then_works(tmp_path, txt2img_home):
    """kill -9 of the launcher's whole process group, as a job scheduler or the OOM killer does: the
    ranks (torchrun puts them in sessions of their own) must die too and free the name for --resume."""
    data = write_demo_dataset(tmp_path / "data")
    options = ["--processes", "2", "--hp", "max_steps=16", "--hp", "checkpointing_steps=2"]
    options += ["--hp", "learning_rate=2e-3", "--hp", f"validation_prompts={RED}"]
    checkpoints = txt2img_home / "models" / "orphans" / "checkpoints"
    command = [sys.executable, "-m", "txt2img", "train", str(data), "--base", "tiny-sd", "--name", "orphans"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(txt2img_home), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [*command, *options], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    _wait_for_a_checkpoint(launcher, checkpoints)
    ranks = [_worker_of_rank(launcher, rank) for rank in (0, 1)]
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.communicate()

    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in ranks if not _gone(pid)]
    for pid in survivors:  # do not leave them training after the test
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "ranks outlived their launcher"
    assert not list((txt2img_home / "catalog").glob("*.yaml")), "ranks outlived their launcher and registered"

    _resume_ends_as_an_uninterrupted_run(data, txt2img_home, "orphans", options)


def test_one_and_two_processes_with_the_same_global_batch_follow_the_same_loss_curve(tmp_path, txt2img_home):
    """batch_size x processes x gradient_accumulation_steps is the batch: 2 x 1 x 2 and 2 x 2 x 1 draw the
    same examples, each rank its own noise, so their curves agree as runs with another seed do: the mean
    of each half within 15% (four seeds of the one-process run spread by at most 8%), and the models end
    up equally good (within 10%)."""
    data = write_demo_dataset(tmp_path / "data")
    hp = {"max_steps": 30, "batch_size": 2, "learning_rate": 2e-3, "validation_prompts": [RED]}
    alone = train(data, "tiny-sd", "alone", Hyperparameters(**hp, gradient_accumulation_steps=2), progress=False)
    pairs = [f"--hp={key}={value}" for key, value in {**hp, "validation_prompts": RED}.items()]
    code, _, stderr = _finish(_start(data, txt2img_home, "pair", "--processes", "2", *pairs))
    assert code == 0, stderr
    pair = load_catalog().get("pair")

    assert len(_losses(pair)) == len(_losses(alone)) == 30
    alone_curve, pair_curve = _window_means(_losses(alone), 15), _window_means(_losses(pair), 15)
    assert all(abs(a - b) <= 0.15 * a for a, b in zip(alone_curve, pair_curve, strict=True)), (alone_curve, pair_curve)
    alone_loss = _red_loss(load_pipeline(alone, load_catalog()), data)
    pair_loss = _red_loss(load_pipeline(pair, load_catalog()), data)
    assert abs(alone_loss - pair_loss) <= 0.1 * alone_loss, (alone_loss, pair_loss)


def test_every_rank_ends_with_the_same_weights_and_only_rank_0_registers(tmp_path, txt2img_home):
    """DDP keeps the copies equal (the gradients are averaged, not merely computed), and rank 0 alone
    registers: tests/ranked_training.py records both per rank."""
    data = write_demo_dataset(tmp_path / "data")
    out = tmp_path / "ranks"
    out.mkdir()
    hp = Hyperparameters(max_steps=4, learning_rate=2e-3, validation_prompts=[RED])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += [str(REPO / "tests" / "ranked_training.py"), str(data), str(out), hp.model_dump_json()]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(txt2img_home), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr

    weights = [json.loads((out / f"weights-{rank}.json").read_text()) for rank in (0, 1)]
    assert weights[0] == weights[1]
    assert sorted(path.name for path in out.glob("registered-*")) == ["registered-0"]
    assert [path.name for path in (txt2img_home / "catalog").glob("*.yaml")] == ["ranked.yaml"]


# --- sharding=fsdp: a full fine-tune split across the processes (training/sharding.py) -------------------------


def _unet_tensors(entry) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(entry.artifact, "unet", "diffusion_pytorch_model.safetensors"))


def test_sharded_run_follows_the_ddp_run_and_halves_the_state_each_process_holds(tmp_path, txt2img_home):
    """The same 2-process run, plain DDP and sharded: FSDP computes the same gradients (it averages
    them in shards), so the loss curves and the saved UNet agree to float rounding (the curve within
    rel 1e-4 at every step, the UNet within 1e-3 of its norm; measured: 1e-7 and 9e-5); each
    process holds about half the parameters and optimizer state; the model is one normal full UNet."""
    data = write_demo_dataset(tmp_path / "data")
    options = ["--processes", "2", "--hp", "max_steps=8", "--hp", "checkpointing_steps=4"]
    options += ["--hp", "learning_rate=2e-3", "--hp", f"validation_prompts={RED}"]
    code, _, stderr = _finish(_start(data, txt2img_home, "plain", *options))
    assert code == 0, stderr
    code, stdout, stderr = _finish(_start(data, txt2img_home, "sharded", *options, "--hp", "sharding=fsdp"))
    assert code == 0, stderr
    assert stdout.count("registered sharded") == 1 and "Traceback" not in stderr

    plain, sharded = load_catalog().get("plain"), load_catalog().get("sharded")
    assert _losses(sharded) == pytest.approx(_losses(plain), rel=1e-4)
    plain_unet, sharded_unet = _unet_tensors(plain), _unet_tensors(sharded)
    assert {key: t.shape for key, t in sharded_unet.items()} == {key: t.shape for key, t in plain_unet.items()}
    # As a whole: Adam turns the rounding of a near-zero gradient (a bias before a GroupNorm) into a full step.
    difference = sum(float((sharded_unet[key] - t).square().sum()) for key, t in plain_unet.items()) ** 0.5
    assert difference <= 1e-3 * sum(float(t.square().sum()) for t in plain_unet.values()) ** 0.5
    ratio = sharded.metrics["state_mib_per_process"] / plain.metrics["state_mib_per_process"]
    assert ratio <= 0.6, ratio
    load_pipeline(sharded, load_catalog())  # loads as any full fine-tune


def test_a_killed_sharded_run_resumes_to_the_same_final_loss(tmp_path, txt2img_home):
    """SIGKILL of one of two sharded processes after a checkpoint; --resume loads every process's shards,
    the optimizer and each rank's RNG, and ends where an uninterrupted sharded run ends."""
    data = write_demo_dataset(tmp_path / "data")
    options = ["--processes", "2", "--hp", "sharding=fsdp", "--hp", "max_steps=8", "--hp", "checkpointing_steps=2"]
    options += ["--hp", "learning_rate=2e-3", "--hp", f"validation_prompts={RED}"]
    checkpoints = txt2img_home / "models" / "cut" / "checkpoints"
    launcher = _start(data, txt2img_home, "cut", *options)
    _wait_for_a_checkpoint(launcher, checkpoints)
    os.kill(_worker_of_rank(launcher, 1), signal.SIGKILL)
    code, _, stderr = _finish(launcher)
    assert code == 1 and "training process 1 of 2 was killed (SIGKILL)" in stderr.splitlines()[-1], stderr

    # A checkpoint holds each process's shards; a run without sharding cannot continue it.
    code, _, stderr = _finish(_start(data, txt2img_home, "cut", *options[:2], *options[4:], "--resume"))
    assert code == 2 and "sharding fsdp (the run's) vs none (given)" in stderr.splitlines()[-1], stderr

    _resume_ends_as_an_uninterrupted_run(data, txt2img_home, "cut", options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((), "sharding=fsdp splits the model across processes; train with --processes 2 or more, or sharding=none"),
        (
            ("--processes", "2", "--method", "lora"),
            "sharding=fsdp splits a full fine-tune; LoRA's adapters fit every process (sharding=none)",
        ),
        (
            ("--processes", "2", "--hp", "train_text_encoder=true"),
            "sharding=fsdp splits the UNet alone; set train_text_encoder=false or sharding=none",
        ),
    ],
    ids=["one-process", "lora", "text-encoder"],
)
def test_sharding_is_refused_in_one_line_where_it_cannot_work(tmp_path, txt2img_home, options, message):
    data = write_demo_dataset(tmp_path / "data")
    code, _, stderr = _finish(_start(data, txt2img_home, "refused", *options, "--hp", "sharding=fsdp"))
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [f"txt2img: error: {message}"]
    assert not (txt2img_home / "models" / "refused").exists()


def test_sharding_across_machines_is_refused(monkeypatch):
    """Each process writes its checkpoint shards to its own machine's disk, which no one machine could resume from."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ShardingSetupError, match=r"^sharding=fsdp trains on one machine .*use one instance"):
        check_sharding(Hyperparameters(sharding="fsdp"), 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    check_sharding(Hyperparameters(sharding="fsdp"), 16)
