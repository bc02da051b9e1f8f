"""DreamBooth training end to end on tiny-sd (64 px, CPU): learning, prior preservation, several
subjects, LoRA on its base, export, and checkpoints that survive SIGKILL and Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from catalog.pipelines import LORA_WEIGHT_NAME, load_pipeline
from catalog.store import load_catalog
from catalog.tiny_sd import build_tiny_sd_pipeline
from training.checkpoints import latest_checkpoint
from training.class_images import ensure_class_images
from training.dataset import load_dataset
from training.demo_dataset import write_demo_dataset
from training.dreambooth import TrainingSetupError, train
from training.hyperparameters import Hyperparameters
from training.losses import denoising_loss

REPO = Path(__file__).resolve().parents[1]
RED = "a photo of sks red toy"
BLUE = "a photo of sks blue toy"
CLASS = "a photo of a toy"
UNRELATED = "an oil painting of a mountain village"
# Full fine-tunes of tiny-sd learn in a few dozen steps at this rate.
FAST = {"learning_rate": 2e-3, "validation_prompts": [RED], "seed": 0}
# Binding images to prompts takes a few hundred examples; at 32 px they take seconds.
BINDING_RESOLUTION = 32
BINDING = {**FAST, "max_steps": 300, "batch_size": 4, "resolution": BINDING_RESOLUTION}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(folder: Path, pattern: str = "*.png") -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(folder.glob(pattern))]


def _loss(pipeline, images, prompt) -> float:
    return denoising_loss(pipeline, images, prompt, resolution=64)


def _subprocess_env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(home), "OMP_NUM_THREADS": "1"}


def test_full_finetune_learns_the_subject_and_is_registered(tmp_path, capsys):
    data = write_demo_dataset(tmp_path / "data")
    base_loss = _loss(build_tiny_sd_pipeline(), _images(data), RED)

    entry = train(data, "tiny-sd", "red-toy", Hyperparameters(max_steps=20, **FAST), progress=False)

    catalog = load_catalog()
    assert catalog.get("red-toy") == entry
    assert (entry.source, entry.base, entry.method, entry.family) == ("finetune", "tiny-sd", "full", "tiny")
    assert entry.dataset_fingerprint == load_dataset(data, Hyperparameters(), 64).fingerprint
    assert entry.hyperparameters["max_steps"] == 20 and entry.metrics["final_loss"] > 0
    trained_loss = _loss(load_pipeline(entry, catalog), _images(data), RED)
    assert trained_loss < 0.7 * base_loss, (base_loss, trained_loss)

    output = Path(entry.artifact).parent
    assert (Path(entry.artifact) / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(Path(entry.artifact).rglob("*.bin"))
    assert Image.open(output / "contact_sheet.png").size[0] > 0
    assert Image.open(output / "loss_curve.png").size == (640, 360)
    assert [p.name for p in (output / "validation").iterdir()] == ["00-a-photo-of-sks-red-toy.png"]
    assert not (output / "checkpoints").exists()
    assert "final_loss=" in capsys.readouterr().out

    from txt2img.cli import main

    main(["catalog", "show", "red-toy"])
    assert "red-toy" in capsys.readouterr().out


def test_lora_loads_on_its_base_and_exports(tmp_path):
    data = write_demo_dataset(tmp_path / "data")
    images = _images(data)
    base = build_tiny_sd_pipeline()
    base_loss = _loss(base, images, RED)
    hp = Hyperparameters(method="lora", lora_rank=16, max_steps=20, **{**FAST, "learning_rate": 5e-2})

    entry = train(data, "tiny-sd", "red-lora", hp, progress=False)

    assert entry.method == "lora" and Path(entry.artifact, LORA_WEIGHT_NAME).is_file()
    on_base = build_tiny_sd_pipeline()
    on_base.load_lora_weights(entry.artifact, weight_name=LORA_WEIGHT_NAME)
    lora_loss = _loss(on_base, images, RED)
    assert lora_loss < 0.97 * base_loss, (base_loss, lora_loss)
    assert _loss(load_pipeline(entry, load_catalog()), images, RED) == pytest.approx(lora_loss)

    from diffusers import StableDiffusionPipeline

    from txt2img.cli import main

    main(["export", "red-lora", str(tmp_path / "exported")])
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "exported", use_safetensors=True)
    assert _loss(exported, images, RED) == pytest.approx(lora_loss, rel=1e-3)


def test_a_lora_with_its_text_encoder_trained_saves_both_adapters_and_loads(tmp_path):
    from safetensors import safe_open

    data = write_demo_dataset(tmp_path / "data")
    hp = Hyperparameters(method="lora", train_text_encoder=True, max_steps=2, **FAST)

    entry = train(data, "tiny-sd", "red-lora-te", hp, progress=False)

    with safe_open(str(Path(entry.artifact, LORA_WEIGHT_NAME)), "pt") as tensors:
        keys = list(tensors.keys())
    assert any(key.startswith("unet.") for key in keys) and any(key.startswith("text_encoder.") for key in keys)
    loaded = load_pipeline(entry, load_catalog())
    base = build_tiny_sd_pipeline()
    assert _loss(loaded, _images(data), RED) != _loss(base, _images(data), RED)


def test_prior_preservation_generates_caches_and_trains_on_class_images(tmp_path):
    # The stronger check (the class-prompt loss stays closer to the base's) needs a base
    # that already knows the class: tiny-sd's random weights denoise everything badly, so any
    # training lowers every loss. What can be checked here is that the prior term is in effect.
    data = write_demo_dataset(tmp_path / "data")
    common = {"max_steps": 20, "num_class_images": 3, **FAST}
    with_prior = train(
        data, "tiny-sd", "prior", Hyperparameters(with_prior_preservation=True, **common), progress=False
    )
    class_dir = data / "class_data_dir"
    generated = sorted(class_dir.glob("txt2img-class-*.png"))
    assert len(generated) == 3
    stamps = [path.stat().st_mtime_ns for path in generated]
    (concept,) = load_dataset(data, Hyperparameters(with_prior_preservation=True), 64).concepts
    assert ensure_class_images(build_tiny_sd_pipeline(), concept, 3, resolution=64, seed=0) == generated
    assert [path.stat().st_mtime_ns for path in generated] == stamps  # reused, not regenerated

    without = train(data, "tiny-sd", "no-prior", Hyperparameters(**common), progress=False)
    catalog = load_catalog()
    class_images = _images(class_dir)
    loss_with = _loss(load_pipeline(with_prior, catalog), class_images, CLASS)
    loss_without = _loss(load_pipeline(without, catalog), class_images, CLASS)
    assert loss_with < loss_without, (loss_with, loss_without)


def test_two_concepts_in_one_run_learn_both(tmp_path):
    data = write_demo_dataset(tmp_path / "data", ("red", "blue"), images_per_subject=3)
    base = build_tiny_sd_pipeline()
    red, blue = _images(data / "red"), _images(data / "blue")
    before = (_loss(base, red, RED), _loss(base, blue, BLUE))

    entry = train(data, "tiny-sd", "two-toys", Hyperparameters(max_steps=20, **FAST), progress=False)

    trained = load_pipeline(entry, load_catalog())
    after = (_loss(trained, red, RED), _loss(trained, blue, BLUE))
    assert after[0] < 0.6 * before[0] and after[1] < 0.6 * before[1], (before, after)


def _binding_loss(pipeline, images, prompt) -> float:
    return denoising_loss(pipeline, images, prompt, resolution=BINDING_RESOLUTION)


def test_after_prior_preserved_training_the_subject_prefers_its_caption(tmp_path):
    """The instance images are explained clearly better by the instance prompt than by the class
    prompt (trained on the class images) or an unrelated prompt (never trained on)."""
    data = write_demo_dataset(tmp_path / "data", images_per_subject=3)
    hp = Hyperparameters(with_prior_preservation=True, num_class_images=8, **BINDING)
    entry = train(data, "tiny-sd", "bound-toy", hp, progress=False)

    trained, images = load_pipeline(entry, load_catalog()), _images(data)
    own = _binding_loss(trained, images, RED)
    assert _binding_loss(trained, images, CLASS) > 1.2 * own
    assert _binding_loss(trained, images, UNRELATED) > 1.03 * own


def test_after_a_two_concept_run_each_concept_prefers_its_own_caption(tmp_path):
    data = write_demo_dataset(tmp_path / "data", ("red", "blue"), images_per_subject=3)
    hp = Hyperparameters(**{**BINDING, "max_steps": 500})
    trained = load_pipeline(train(data, "tiny-sd", "two-bound", hp, progress=False), load_catalog())

    red, blue = _images(data / "red"), _images(data / "blue")
    red_ratio = _binding_loss(trained, red, BLUE) / _binding_loss(trained, red, RED)
    blue_ratio = _binding_loss(trained, blue, RED) / _binding_loss(trained, blue, BLUE)
    assert red_ratio > 1.15 and blue_ratio > 1.15, (red_ratio, blue_ratio)


def _start_cli_training(data: Path, home: Path, name: str, *hp: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "txt2img", "train", str(data), "--base", "tiny-sd", "--name", name]
    for pair in ("learning_rate=2e-3", f"validation_prompts={RED}", *hp):
        command += ["--hp", pair]
    return subprocess.Popen(
        command, env=_subprocess_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# A run that SIGKILLs itself right after its checkpoint at step 6: the kill lands at the same point
# however fast or busy the machine is.
_KILLED_AFTER_STEP_6 = """
import os, signal, sys
from pathlib import Path
from training.dreambooth import TrainingSetupError, train
from training.hyperparameters import Hyperparameters

def kill_at_step_6(step, metrics):
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)

hp = Hyperparameters.model_validate_json(sys.argv[2])
train(Path(sys.argv[1]), "tiny-sd", "resumed", hp, progress=False, on_checkpoint=kill_at_step_6)
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, caplog):
    import logging

    from safetensors.torch import load_file

    data = write_demo_dataset(tmp_path / "data")
    home = Path(os.environ["TXT2IMG_HOME"])
    hp = Hyperparameters(max_steps=12, checkpointing_steps=3, **FAST)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_STEP_6, str(data), hp.model_dump_json()],
        env=_subprocess_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = home / "models" / "resumed" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert not (home / "catalog" / "resumed.yaml").exists()

    with caplog.at_level(logging.INFO, logger="txt2img.training"):
        resumed = train(data, "tiny-sd", "resumed", hp, resume=True, progress=False)
    assert "resuming from" in caplog.text and "(step 6 of 12)" in caplog.text
    assert load_catalog().get("resumed") == resumed

    straight = train(data, "tiny-sd", "straight", hp, progress=False)
    unet = "unet/diffusion_pytorch_model.safetensors"
    resumed_weights = load_file(Path(resumed.artifact, unet))
    straight_weights = load_file(Path(straight.artifact, unet))
    assert all(torch.allclose(resumed_weights[key], straight_weights[key], atol=1e-6) for key in straight_weights)
    assert resumed.metrics["final_loss"] == pytest.approx(straight.metrics["final_loss"], rel=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = write_demo_dataset(tmp_path / "data")
    home = Path(os.environ["TXT2IMG_HOME"])
    checkpoints = home / "models" / "stopped" / "checkpoints"
    process = _start_cli_training(data, home, "stopped", "max_steps=5000", "checkpointing_steps=2")
    # A checkpoint proves the loop, and so its Ctrl-C handler, is running; the run has
    # thousands of steps to go, so the signal always arrives mid-training.
    _wait_for(lambda: latest_checkpoint(checkpoints) is not None, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    stopped = re.search(r"interrupted at step (\d+); checkpoint saved to (\S+);", stderr)
    assert stopped, stderr
    step, checkpoint = int(stopped.group(1)), Path(stopped.group(2))
    assert 2 <= step < 5000 and checkpoint == checkpoints / f"checkpoint-{step}"
    assert latest_checkpoint(checkpoints) == checkpoint
    assert not (home / "catalog" / "stopped.yaml").exists()


def test_bf16_trains_on_the_cpu_and_fp16_is_refused_there(tmp_path):
    """accelerate's mixed precision: bf16 autocasts on the CPU too; fp16 needs CUDA's loss scaling."""
    data = write_demo_dataset(tmp_path / "data")
    entry = train(
        data, "tiny-sd", "bf16-toy", Hyperparameters(max_steps=4, mixed_precision="bf16", **FAST), progress=False
    )
    assert entry.hyperparameters["mixed_precision"] == "bf16" and 0 < entry.metrics["final_loss"] < 10
    assert load_catalog().get("bf16-toy") == entry

    with pytest.raises(TrainingSetupError, match=r"^mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on the CPU$"):
        train(data, "tiny-sd", "fp16-toy", Hyperparameters(max_steps=4, mixed_precision="fp16", **FAST), progress=False)
    assert not (Path(os.environ["TXT2IMG_HOME"]) / "models" / "fp16-toy").exists()


def test_a_checkpoint_of_the_trainer_before_accelerate_is_refused_in_one_line(tmp_path):
    data = write_demo_dataset(tmp_path / "data")
    old = Path(os.environ["TXT2IMG_HOME"]) / "models" / "old-run" / "checkpoints" / "checkpoint-3"
    old.mkdir(parents=True)
    (old / "trainable.safetensors").write_bytes(b"")  # the files it wrote: no training_state.json
    (old / "training_state.pt").write_bytes(b"")
    with pytest.raises(TrainingSetupError, match=r"^cannot resume from .*checkpoint-3: an older txt2img wrote it; "):
        train(data, "tiny-sd", "old-run", Hyperparameters(max_steps=4, **FAST), resume=True, progress=False)
