"""DreamBooth fine-tuning (full or LoRA) of a catalog model into a new, registered catalog entry.

``train()`` checks everything it can before loading a model (base, name, output folder,
dataset, precision), then: generates class images for prior preservation, encodes the
images and prompts once, runs the optimisation loop with checkpoints, saves the model,
draws validation images and a loss curve, and registers the fine-tune in the user catalog.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from catalog.paths import atomic_write_text, follow_umask, staging_directory, txt2img_home, writing
from catalog.pipelines import load_pipeline
from catalog.schema import ID_PATTERN, CatalogEntry
from catalog.store import Catalog, claim_name, entry_yaml, load_catalog, write_entry
from training.batches import BatchPlan, encode_images
from training.checkpoints import latest_checkpoint, load_checkpoint, remove_stale_staging, save_checkpoint
from training.class_images import ensure_class_images
from training.dataset import DreamBoothDataset, load_dataset
from training.distributed import World, current_world
from training.hyperparameters import Hyperparameters
from training.losses import encode_prompts, per_sample_denoising_error, training_noise_scheduler
from training.report import (
    CONTACT_SHEET,
    LOSS_CURVE,
    VALIDATION_DIR,
    contact_sheet,
    generate_validation_images,
    loss_curve,
    validation_prompts,
)
from training.trainable import prepare_trainable, save_trained_model
from txt2img.errors import InputError, Interrupted

logger = logging.getLogger("txt2img.training")

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
# The entry of a finished run, written before its model is moved into place: a run killed
# between saving and registering is registered by --resume instead of trained again.
FINISHED_ENTRY = "entry.yaml"
# Hyperparameters that change what the checkpointed weights mean; the others may change on resume.
_RESUME_INVARIANTS = ("method", "lora_rank", "train_text_encoder", "resolution")


class TrainingSetupError(InputError, ValueError):
    """The run cannot start as asked (base, name, output folder or precision); nothing was done."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C stopped the run after saving a checkpoint it can resume from."""

    def __init__(self, step: int, checkpoint: Path):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")


def default_output_dir(name: str) -> Path:
    return txt2img_home() / "models" / name


def trainable_base(catalog: Catalog, base: str) -> CatalogEntry:
    """The catalog entry to fine-tune; refuses families and LoRAs this trainer cannot train."""
    entry = catalog.get(base)
    if entry.method == "lora":
        raise TrainingSetupError(
            f"'{base}' is a LoRA adapter; train on its base '{entry.base}' or on a full fine-tune instead"
        )
    if not entry.locally_trainable:
        raise TrainingSetupError(
            f"'{base}' is a {entry.family} model; this trainer handles Stable Diffusion 1.x/2.x and tiny-sd"
        )
    return entry


def _check_name(catalog: Catalog, name: str, register: bool) -> None:
    if not ID_PATTERN.match(name):
        raise TrainingSetupError(
            f"invalid model name '{name}': use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if register and name in catalog:
        raise TrainingSetupError(f"model '{name}' already exists in the catalog; pick another --name")


def _check_output_dir(output_dir: Path, resume: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingSetupError(f"{output_dir} exists and is not a directory")
    if not resume and output_dir.is_dir() and any(output_dir.iterdir()):
        raise TrainingSetupError(
            f"{output_dir} already holds a run; pass --resume to continue it, or pick another --name"
        )


@dataclass
class Precision:
    """Where the run computes and in which number formats."""

    device: Any
    autocast_dtype: Any | None  # None: plain fp32
    frozen_dtype: Any  # the dtype of weights that do not train


def choose_precision(hyperparameters: Hyperparameters) -> Precision:
    import torch

    cuda = torch.cuda.is_available()
    mode = hyperparameters.mixed_precision
    if mode == "auto":
        mode = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if mode == "fp16" and not cuda:
        raise TrainingSetupError("mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    if hyperparameters.use_8bit_adam:
        if not cuda:
            raise TrainingSetupError("use_8bit_adam needs a CUDA GPU (bitsandbytes)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingSetupError("use_8bit_adam needs bitsandbytes: pip install 'txt2img[gpu]'") from None
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return Precision(torch.device("cuda" if cuda else "cpu"), dtype, dtype or torch.float32)


def _optimizer(parameters: list[Any], hyperparameters: Hyperparameters):
    import torch

    if hyperparameters.use_8bit_adam:
        import bitsandbytes

        optimizer_class, options = bitsandbytes.optim.AdamW8bit, {}
    else:
        # The fused kernel updates all tensors in one pass: several times faster than the loop.
        optimizer_class, options = torch.optim.AdamW, {"fused": True}
    return optimizer_class(
        parameters,
        **options,
        lr=hyperparameters.learning_rate,
        betas=(hyperparameters.adam_beta1, hyperparameters.adam_beta2),
        weight_decay=hyperparameters.adam_weight_decay,
        eps=hyperparameters.adam_epsilon,
    )


class _StopOnCtrlC:
    """Turns the first Ctrl-C into a request the loop honours after its current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: saving a checkpoint after this step (press again to quit at once)")

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} it/s" if speed else "-- it/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        RateColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _save_model_atomically(pipeline: Any, trainable: Any, output_dir: Path) -> Path:
    final = output_dir / MODEL_DIR
    staging = staging_directory(output_dir, MODEL_DIR)
    try:
        save_trained_model(pipeline, trainable, staging)
        follow_umask(staging)
        if final.exists():  # left by a run killed after saving; this one supersedes it
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def train(
    data_dir: Path,
    base: str,
    name: str,
    hyperparameters: Hyperparameters,
    *,
    output_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    register: bool = True,
    on_checkpoint: Callable[[int, dict], None] | None = None,
) -> CatalogEntry:
    """Fine-tune ``base`` on the photos in ``data_dir`` and return (and, with ``register``,
    write to the user catalog) the new entry ``name``.

    With ``register`` the name is claimed before the run writes anything, so a second run for the
    same name is refused at once (NameInUse) and can never write into this one's folder. Called in each process of
    a torch.distributed group (``txt2img train --processes``), it trains data-parallel; rank 0
    alone claims, checks, writes and registers, and only it returns a registered entry. Raises DatasetError,
    TrainingSetupError or UnknownModelError before any work on bad input, and
    TrainingInterrupted after Ctrl-C (with a checkpoint saved). ``on_checkpoint(step,
    {"loss": ...})`` runs after each checkpoint; an exception from it stops the run.
    """
    output_dir = Path(output_dir).expanduser() if output_dir else default_output_dir(name)
    world = current_world()
    arguments = dict(output_dir=output_dir, resume=resume, progress=progress and world.is_main, register=register)
    with contextlib.ExitStack() as stack:
        claim = _NameClaim(name, stack)
        try:
            return _train(
                data_dir,
                base,
                name,
                hyperparameters,
                world=world,
                claim=claim,
                on_checkpoint=on_checkpoint,
                **arguments,
            )
        except BaseException:
            # Only the process that owns the run's folder tidies it: rank 0, once it holds the name
            # (a run refused at the claim must not touch the folder of the run that holds it).
            if world.is_main and (claim.held or not register):
                _remove_leftovers(output_dir)
            raise


class _NameClaim:
    """The model name a run takes once its read-only checks pass, held until the run ends."""

    def __init__(self, name: str, stack: contextlib.ExitStack):
        self.name = name
        self.stack = stack
        self.held = False

    def take(self) -> None:
        self.stack.enter_context(claim_name(self.name))
        self.held = True


def _remove_leftovers(output_dir: Path) -> None:
    """After a failed run (a full disk, say): no draft entry without its model, no empty folders.

    The next run would take them for a run to --resume.
    """
    if not (output_dir / MODEL_DIR).is_dir():
        (output_dir / FINISHED_ENTRY).unlink(missing_ok=True)
    for folder in (output_dir / CHECKPOINT_DIR, output_dir):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _train(
    data_dir: Path,
    base: str,
    name: str,
    hyperparameters: Hyperparameters,
    *,
    output_dir: Path,
    resume: bool,
    progress: bool,
    register: bool,
    world: World,
    claim: _NameClaim,
    on_checkpoint: Callable[[int, dict], None] | None,
) -> CatalogEntry:
    started = time.monotonic()
    hp = hyperparameters
    data_dir = Path(data_dir).expanduser().resolve()
    catalog = load_catalog()
    base_entry = trainable_base(catalog, base)
    if world.is_main:  # the others would see rank 0's claim and folder, and take them for another run's
        _check_name(catalog, name, register)
    dataset = load_dataset(data_dir, hp, base_entry.resolution)
    # Everything above only reads; from here on the run writes, so it first owns the name.
    if world.is_main:
        if register:
            claim.take()
            _check_name(load_catalog(), name, register)  # again: another run may have registered it meanwhile
        _check_output_dir(output_dir, resume)
    finished = resume and (output_dir / MODEL_DIR).is_dir() and (output_dir / FINISHED_ENTRY).is_file()
    if world.from_main(finished):
        entry = _finished_run(output_dir, base, dataset.fingerprint, world)
        return _register(entry, data_dir, register) if world.is_main else entry
    precision = choose_precision(hp)

    import torch
    from diffusers.optimization import get_scheduler

    checkpoint_dir = output_dir / CHECKPOINT_DIR
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(checkpoint_dir)
    logger.info("loading base model %s on %s", base, precision.device)
    pipeline = load_pipeline(base_entry, catalog)
    pipeline.to(precision.device)
    pipeline.set_progress_bar_config(disable=True)
    resolution = dataset.resolution
    multiple = pipeline.vae_scale_factor
    if resolution % multiple:
        raise TrainingSetupError(f"resolution {resolution} must be a multiple of {multiple} for {base}")

    with _progress(progress) as bars:
        if hp.with_prior_preservation:
            # Rank 0 generates the missing class images; the others wait for it, then only list them.
            if not world.is_main:
                world.barrier()
            task = bars.add_task("class images", total=hp.num_class_images * len(dataset.concepts), status="")
            for concept in dataset.concepts:
                before = len(concept.class_images)
                bars.advance(task, min(before, hp.num_class_images))
                concept.class_images = ensure_class_images(
                    pipeline,
                    concept,
                    hp.num_class_images,
                    resolution=resolution,
                    seed=hp.seed,
                    on_image=lambda: bars.advance(task),
                )
            if world.is_main:
                world.barrier()

        trainable = prepare_trainable(pipeline, hp, precision.frozen_dtype)
        world.copy_from_main(trainable.parameters())
        vae = pipeline.vae
        instance = [encode_images(vae, c.instance_images, resolution, multiple) for c in dataset.concepts]
        classes = (
            [encode_images(vae, c.class_images, resolution, multiple) for c in dataset.concepts]
            if hp.with_prior_preservation
            else None
        )
        plan = BatchPlan(
            dataset, instance, classes, batch_size=hp.batch_size, latent_size=resolution // multiple, seed=hp.seed
        )
        prompt_cache: dict[str, Any] = {}
        if not hp.train_text_encoder:
            prompts = {c.instance_prompt for c in dataset.concepts}
            if hp.with_prior_preservation:
                prompts |= {c.class_prompt for c in dataset.concepts if c.class_prompt}
            with torch.no_grad():
                for prompt in prompts:
                    prompt_cache[prompt] = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [prompt])[0]

        def text_embeddings(prompts: list[str]):
            if hp.train_text_encoder:
                return encode_prompts(pipeline.tokenizer, pipeline.text_encoder, prompts)
            return torch.stack([prompt_cache[prompt] for prompt in prompts])

        accumulation = hp.gradient_accumulation_steps
        # Each optimizer step takes ``accumulation`` micro-batches in every process.
        total_steps = hp.max_steps or hp.epochs * plan.steps_per_epoch(accumulation * world.size)
        parameters = trainable.parameters()
        optimizer = _optimizer(parameters, hp)
        lr_scheduler = get_scheduler(
            hp.lr_scheduler, optimizer, num_warmup_steps=hp.lr_warmup_steps, num_training_steps=total_steps
        )
        scaler = torch.amp.GradScaler("cuda") if precision.autocast_dtype == torch.float16 else None
        noise_scheduler = training_noise_scheduler(pipeline)
        generator = torch.Generator().manual_seed(hp.seed + world.rank)
        signature = {
            "base": base,
            "dataset_fingerprint": dataset.fingerprint,
            **{key: getattr(hp, key) for key in _RESUME_INVARIANTS},
        }
        step, losses = 0, []

        checkpoint = world.from_main(latest_checkpoint(checkpoint_dir) if resume else None)
        if checkpoint is not None:
            weights, state = load_checkpoint(checkpoint)
            processes = state.get("processes", 1)
            if processes != world.size:
                # Each process's random stream is part of the state: a different count cannot continue it.
                raise TrainingSetupError(
                    f"cannot resume from {checkpoint}: it was trained with {processes} process(es); "
                    f"resume with --processes {processes}"
                )
            if state["signature"] != signature:
                changed = sorted(k for k in signature if state["signature"].get(k) != signature[k])
                raise TrainingSetupError(f"cannot resume from {checkpoint}: it was made with different {changed}")
            trainable.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if scaler is not None and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])
            generator.set_state(state["rng_by_rank"][world.rank] if "rng_by_rank" in state else state["rng"])
            step, losses = state["step"], list(state["losses"])
            logger.info("resuming from %s (step %d of %d)", checkpoint, step, total_steps)
        elif resume:
            logger.info("no checkpoint in %s; starting from step 0", checkpoint_dir)

        def write_checkpoint() -> Path:
            random_states = world.gather(generator.get_state())
            if not world.is_main:
                return checkpoint_dir / f"checkpoint-{step}"
            state = {
                "step": step,
                "losses": losses,
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "rng_by_rank": random_states,
                "processes": world.size,
                "signature": signature,
            }
            return save_checkpoint(checkpoint_dir, step, trainable.state_dict(), state)

        logger.info(
            "training %s: steps %d to %d, %d instance image(s), %s%s",
            hp.method,
            step + 1,
            total_steps,
            dataset.num_instance_images,
            precision.device,
            f" x {world.size} processes" if world.size > 1 else "",
        )
        task = bars.add_task("training", total=total_steps, completed=step, status="loss -")
        device_type = precision.device.type
        last_checkpoint_step = step
        trainable.train()
        first_step, loop_started = step, time.monotonic()
        with _StopOnCtrlC() as stop:
            while step < total_steps:
                step_loss = 0.0
                for micro in range(step * accumulation, (step + 1) * accumulation):
                    batch = plan.micro_batch(micro * world.size + world.rank, generator)
                    latents = batch.latents.to(precision.device)
                    noise = torch.randn(latents.shape, generator=generator).to(precision.device, latents.dtype)
                    timesteps = torch.randint(
                        0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
                    ).to(precision.device)
                    with torch.autocast(
                        device_type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None
                    ):
                        embeddings = text_embeddings(batch.prompts)
                        errors = per_sample_denoising_error(
                            trainable.unet, noise_scheduler, latents, noise, timesteps, embeddings
                        )
                    loss = errors[: batch.num_instance].mean()
                    if batch.num_instance < len(errors):
                        loss = loss + hp.prior_loss_weight * errors[batch.num_instance :].mean()
                    loss = loss / accumulation
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += float(loss.detach())
                world.average_gradients(parameters)
                # One exchange per step: the mean loss, and whether Ctrl-C reached any process, so
                # that all of them stop (and checkpoint) after the same step.
                loss_sum, stops = world.sum([step_loss, float(stop.requested)])
                step_loss, stop_requested = loss_sum / world.size, stops > 0
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, hp.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                bars.update(task, advance=1, status=f"loss {step_loss:.4f}")
                if step % hp.checkpointing_steps == 0 or stop_requested:
                    saved = write_checkpoint()
                    recent = losses[last_checkpoint_step:]
                    last_checkpoint_step = step
                    if stop_requested:
                        raise TrainingInterrupted(step, saved)
                    if on_checkpoint is not None and world.is_main:
                        on_checkpoint(step, {"loss": sum(recent) / len(recent)})
        trainable.train(False)
        world.check_same_weights(parameters)
        loop_seconds = time.monotonic() - loop_started
        train_seconds = time.monotonic() - started
        model_dir = output_dir / MODEL_DIR

        recent = losses[-10:]
        metrics: dict[str, float | None] = {
            "final_loss": sum(recent) / len(recent) if recent else None,
            "steps": float(total_steps),
            "train_seconds": round(train_seconds, 2),
            "steps_per_second": round((step - first_step) / loop_seconds, 3) if step > first_step else None,
        }
        entry = CatalogEntry(
            id=name,
            source="finetune",
            family=base_entry.family,
            resolution=resolution,
            description=f"DreamBooth {hp.method} fine-tune of {base}: "
            + "; ".join(concept.instance_prompt for concept in dataset.concepts),
            license=base_entry.license,
            languages=base_entry.languages,
            tags=["dreambooth", hp.method],
            example_prompt=f"a photo of {dataset.concepts[0].subject}",
            base=base,
            method=hp.method,
            artifact=str(model_dir.resolve()),
            hyperparameters=hp.model_dump(mode="json"),
            dataset_fingerprint=dataset.fingerprint,
            metrics=metrics,
            created=datetime.now(timezone.utc),
        )
        if not world.is_main:
            return entry
        atomic_write_text(output_dir / FINISHED_ENTRY, entry_yaml(entry))
        with writing(model_dir):
            _save_model_atomically(pipeline, trainable, output_dir)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        _write_report(pipeline, dataset, hp, output_dir, losses, bars)
    return _register(entry, data_dir, register)


def _finished_run(output_dir: Path, base: str, fingerprint: str, world: World) -> CatalogEntry:
    """The entry of the model a run saved before it was killed, to register instead of training again."""
    path = output_dir / FINISHED_ENTRY
    entry = CatalogEntry.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    if entry.base != base or entry.dataset_fingerprint != fingerprint:
        raise TrainingSetupError(
            f"{output_dir} holds a finished run of {entry.base} on another dataset; pick another --name"
        )
    if world.is_main:
        logger.info("the run had finished before it stopped; registering its model %s", entry.artifact)
        shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)  # left if killed right after the save
    return entry


def _register(entry: CatalogEntry, data_dir: Path, register: bool) -> CatalogEntry:
    """Write ``entry`` to the user catalog (and evaluate it if asked); print its metrics."""
    hp = Hyperparameters.model_validate(entry.hyperparameters or {})
    if register:
        write_entry(entry)
        if hp.compute_fid:
            entry = _evaluate_and_record(entry, data_dir)
    elif hp.compute_fid:
        logger.warning("compute_fid: evaluation needs the model registered in the catalog; skipped")
    for key, value in (entry.metrics or {}).items():
        # name=value lines are what SageMaker metric definitions scrape from the log.
        print(f"{key}={value}", flush=True)
    return entry


def _write_report(
    pipeline: Any, dataset: DreamBoothDataset, hp: Hyperparameters, output_dir: Path, losses: list[float], bars: Any
) -> None:
    loss_curve(losses, output_dir / LOSS_CURVE)
    prompts = validation_prompts(dataset, hp.validation_prompts)
    task = bars.add_task("validation images", total=len(prompts), status="")
    images = generate_validation_images(
        pipeline,
        prompts,
        output_dir / VALIDATION_DIR,
        resolution=dataset.resolution,
        seed=hp.seed,
        on_image=lambda: bars.advance(task),
    )
    contact_sheet(images, output_dir / CONTACT_SHEET)


def _evaluate_and_record(entry: CatalogEntry, data_dir: Path) -> CatalogEntry:
    try:  # lazy on purpose: a trainer whose install lacks the evaluation still trains and says so
        from training.evaluation import evaluate_model
    except ImportError:
        logger.warning("compute_fid: training.evaluation is not available in this install; evaluation skipped")
        return entry
    logger.info("compute_fid: evaluating %s", entry.id)
    report = evaluate_model(entry.id, data_dir)
    entry = entry.model_copy(update={"metrics": {**(entry.metrics or {}), **report.metrics}})
    write_entry(entry, overwrite=True)
    return entry
