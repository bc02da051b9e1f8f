"""DreamBooth fine-tuning (full or LoRA) of a catalog model into a new, registered catalog entry.

``train()`` checks everything it can before loading a model (base, name, output folder,
dataset, precision), then: generates class images for prior preservation, encodes the
images and prompts once, runs the optimisation loop with checkpoints, saves the model,
draws validation images and a loss curve, and registers the fine-tune in the user catalog.

The loop runs on Hugging Face ``accelerate``, in phases a reader can follow one at a time:
``_setup`` (checks and the name's claim), ``_load_base``, ``_prepare_data``,
``_prepare_optimisation`` (``Accelerator.prepare``: DDP across processes), ``_resume``,
``_optimise`` (``_optimizer_step`` and ``_micro_batch_loss``, checkpoints) and ``_finish``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from catalog.paths import atomic_write_text, follow_umask, staging_directory, txt2img_home, writing
from catalog.pipelines import load_pipeline
from catalog.schema import ID_PATTERN, CatalogEntry
from catalog.store import Catalog, claim_name, entry_yaml, load_catalog, write_entry
from training.batches import BatchPlan, encode_images
from training.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_state,
    remove_stale_staging,
    save_checkpoint,
)
from training.class_images import ensure_class_images
from training.dataset import DreamBoothDataset, load_dataset
from training.evaluation import evaluate_model
from training.hyperparameters import Hyperparameters
from training.losses import encode_prompts, per_sample_denoising_error, training_noise_scheduler
from training.report import (
    CONTACT_SHEET,
    LOSS_CURVE,
    LOSS_HISTORY,
    VALIDATION_DIR,
    contact_sheet,
    generate_validation_images,
    loss_curve,
    validation_prompts,
)
from training.sharding import MIB, check_sharding, fsdp_plugin, full_module, local_state_bytes, shard_on_cpu
from training.step_log import STEP_LOG, append_step, start_step_log
from training.trainable import prepare_trainable, save_trained_model
from txt2img.errors import InputError, Interrupted

logger = logging.getLogger("txt2img.training")

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
# The entry of a finished run, written before its model is moved into place: a run killed
# between saving and registering is registered by --resume instead of trained again.
FINISHED_ENTRY = "entry.yaml"
# The hyperparameters a run started with: --resume continues that run, so only with these.
RUN_HYPERPARAMETERS = "hyperparameters.json"
# Hyperparameters that change what the checkpointed weights mean; each checkpoint records them too,
# so that it is never loaded into a model of another shape.
# (sharding too: a sharded checkpoint holds each process's shards, a plain one whole tensors.)
_RESUME_INVARIANTS = ("method", "lora_rank", "train_text_encoder", "resolution", "sharding")


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
    # A run killed before its first checkpoint leaves only its hyperparameters: nothing to resume.
    started = output_dir.is_dir() and any(
        path.name not in (RUN_HYPERPARAMETERS, STEP_LOG) for path in output_dir.iterdir()
    )
    if not resume and started:
        raise TrainingSetupError(
            f"{output_dir} already holds a run; pass --resume to continue it, or pick another --name"
        )


def _check_resumed_hyperparameters(name: str, output_dir: Path, hp: Hyperparameters) -> None:
    """Refuse to resume a run with hyperparameters other than its own, naming each difference."""
    record = output_dir / RUN_HYPERPARAMETERS
    kept = (output_dir / MODEL_DIR).is_dir() or list_checkpoints(output_dir / CHECKPOINT_DIR)
    if not (kept and record.is_file()):
        return  # nothing of the run to continue: it starts from step 0 with the values given now
    # A hyperparameter added since the run started counts as its default.
    started = {**Hyperparameters().model_dump(mode="json"), **json.loads(record.read_text(encoding="utf-8"))}
    given = hp.model_dump(mode="json")
    changed = [
        f"{key} {started.get(key)} (the run's) vs {given.get(key)} (given)"
        for key in sorted(started.keys() | given.keys())
        if started.get(key) != given.get(key)
    ]
    if changed:
        raise TrainingSetupError(
            f"cannot resume '{name}' with other hyperparameters than its run: {', '.join(changed)}; "
            "pass the run's values, or train under another --name"
        )


def choose_precision(hyperparameters: Hyperparameters) -> str:
    """accelerate's ``mixed_precision`` for this run: ``no``, ``fp16`` or ``bf16``.

    ``auto`` is bf16 (fp16 on GPUs without bf16) on CUDA and fp32 on the CPU. fp16 on the CPU is
    refused: torch's CPU autocast offers bf16, which keeps fp32's range and needs no loss scaling.
    """
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
    return mode


def _accelerator(hyperparameters: Hyperparameters):
    """The run's Accelerator: under torchrun it joins (or starts) the process group of every rank."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mode = choose_precision(hyperparameters)
    plugin = fsdp_plugin(hyperparameters)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # accelerate takes a torchrun world on the CPU for one process otherwise
        mixed_precision=mode,
        gradient_accumulation_steps=hyperparameters.gradient_accumulation_steps,
        fsdp_plugin=plugin,
        # Rank 0 alone generates class images while the others wait: that can take a while on a big model.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    if plugin is not None and accelerator.num_processes > 1:
        shard_on_cpu(accelerator, plugin)
    return accelerator


def _forget_accelerator() -> None:
    """accelerate keeps one precision and accumulation per process; the tuner and tests train many runs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


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
    """Turns the first Ctrl-C (or SIGTERM: a server canceling the training job it runs as a child) into a
    request the loop honours after its current step: a checkpoint, then TrainingInterrupted."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop asked: saving a checkpoint after this step (Ctrl-C again quits at once)")

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, previous in (self._previous or {}).items():
            signal.signal(number, previous)


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
    same name is refused at once (NameInUse) and can never write into this one's folder. Called in each
    process of a torchrun world (``txt2img train --processes``), it trains data-parallel through
    accelerate (DistributedDataParallel); rank 0 alone claims, checks, writes and registers, and only
    it returns a registered entry. Raises DatasetError, TrainingSetupError or UnknownModelError before
    any work on bad input, and TrainingInterrupted after Ctrl-C (with a checkpoint saved).
    ``on_checkpoint(step, {"loss": ...})`` runs after each checkpoint; an exception from it stops the run.
    """
    output_dir = Path(output_dir).expanduser() if output_dir else default_output_dir(name)
    accelerator = _accelerator(hyperparameters)
    is_main = accelerator.is_main_process
    request = _Request(Path(data_dir).expanduser().resolve(), base, name, hyperparameters, output_dir, resume, register)
    with contextlib.ExitStack() as stack:
        stack.callback(_forget_accelerator)
        check_sharding(hyperparameters, accelerator.num_processes)
        claim = _NameClaim(name, stack)
        try:
            return _train(request, accelerator, claim, progress=progress and is_main, on_checkpoint=on_checkpoint)
        except BaseException:
            # Only the process that owns the run's folder tidies it: rank 0, once it holds the name
            # (a run refused at the claim must not touch the folder of the run that holds it).
            if is_main and (claim.held or not register):
                _remove_leftovers(output_dir)
            raise


@dataclass(frozen=True)
class _Request:
    """What the caller asked for."""

    data_dir: Path
    base: str
    name: str
    hp: Hyperparameters
    output_dir: Path
    resume: bool
    register: bool


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
        if not list_checkpoints(output_dir / CHECKPOINT_DIR):
            (output_dir / RUN_HYPERPARAMETERS).unlink(missing_ok=True)
            (output_dir / STEP_LOG).unlink(missing_ok=True)
    for folder in (output_dir / CHECKPOINT_DIR, output_dir):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@dataclass
class _Run:
    """One run's models, data and optimisation state, shared by its phases."""

    request: _Request
    accelerator: Any
    base_entry: CatalogEntry
    dataset: DreamBoothDataset
    pipeline: Any = None
    trainable: Any = None  # TrainableModels: the unwrapped modules that train
    models: dict[str, Any] = field(default_factory=dict)  # the same modules as accelerate prepared them
    optimizer: Any = None
    lr_scheduler: Any = None
    plan: Any = None  # BatchPlan
    prompt_cache: dict[str, Any] = field(default_factory=dict)
    noise_scheduler: Any = None
    total_steps: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.request.output_dir / CHECKPOINT_DIR

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must have been made with for this run to continue it."""
        hp = self.request.hp
        return {
            "base": self.request.base,
            "dataset_fingerprint": self.dataset.fingerprint,
            **{key: getattr(hp, key) for key in _RESUME_INVARIANTS},
        }


def _train(
    request: _Request,
    accelerator: Any,
    claim: _NameClaim,
    *,
    progress: bool,
    on_checkpoint: Callable[[int, dict], None] | None,
) -> CatalogEntry:
    started = time.monotonic()
    run, finished = _setup(request, accelerator, claim)
    if finished:  # the run had finished before it was stopped: register it
        entry = _finished_run(run)
        return _register(entry, request.data_dir, request.register) if accelerator.is_main_process else entry
    with _progress(progress) as bars:
        _load_base(run, bars)
        _prepare_data(run)
        _prepare_optimisation(run)
        _resume(run)
        loop_seconds, first_step = _optimise(run, bars, on_checkpoint)
        train_seconds = time.monotonic() - started
        return _finish(run, bars, train_seconds=train_seconds, loop_seconds=loop_seconds, first_step=first_step)


def _setup(request: _Request, accelerator: Any, claim: _NameClaim) -> tuple[_Run, bool]:
    """Check the request (read only), then claim the name and the output folder (rank 0).

    Also says whether the output folder holds a finished run, to register rather than train again.
    """
    from accelerate.utils import broadcast_object_list

    is_main = accelerator.is_main_process
    catalog = load_catalog()
    base_entry = trainable_base(catalog, request.base)
    if is_main:  # the others would see rank 0's claim and folder, and take them for another run's
        _check_name(catalog, request.name, request.register)
    dataset = load_dataset(request.data_dir, request.hp, base_entry.resolution)
    # Everything above only reads; from here on the run writes, so it first owns the name.
    output_dir = request.output_dir
    if is_main:
        if request.register:
            claim.take()
            _check_name(load_catalog(), request.name, request.register)  # another run may have registered it
        _check_output_dir(output_dir, request.resume)
        if request.resume:
            _check_resumed_hyperparameters(request.name, output_dir, request.hp)
    run = _Run(request, accelerator, base_entry, dataset)
    finished = request.resume and (output_dir / MODEL_DIR).is_dir() and (output_dir / FINISHED_ENTRY).is_file()
    if broadcast_object_list([finished])[0]:
        return run, True
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / RUN_HYPERPARAMETERS, request.hp.model_dump_json(indent=2) + "\n")
        remove_stale_staging(output_dir / CHECKPOINT_DIR)
    return run, False


def _load_base(run: _Run, bars: Any) -> None:
    """Load the base model on this process's device and make sure the class images exist."""

    hp, accelerator, dataset = run.request.hp, run.accelerator, run.dataset
    logger.info("loading base model %s on %s", run.request.base, accelerator.device)
    pipeline = load_pipeline(run.base_entry, load_catalog())
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    if dataset.resolution % pipeline.vae_scale_factor:
        raise TrainingSetupError(
            f"resolution {dataset.resolution} must be a multiple of {pipeline.vae_scale_factor} for {run.request.base}"
        )
    run.pipeline = pipeline
    if not hp.with_prior_preservation:
        return
    # Rank 0 generates the missing class images; the others wait for it, then only list them.
    with accelerator.main_process_first():
        task = bars.add_task("class images", total=hp.num_class_images * len(dataset.concepts), status="")
        for concept in dataset.concepts:
            bars.advance(task, min(len(concept.class_images), hp.num_class_images))
            concept.class_images = ensure_class_images(
                pipeline,
                concept,
                hp.num_class_images,
                resolution=dataset.resolution,
                seed=hp.seed,
                on_image=lambda: bars.advance(task),
            )


def _prepare_data(run: _Run) -> None:
    """Encode the images once, plan the batches and encode the fixed prompts once."""
    import torch

    hp, dataset, pipeline = run.request.hp, run.dataset, run.pipeline
    resolution, multiple = dataset.resolution, pipeline.vae_scale_factor
    vae = pipeline.vae
    instance = [encode_images(vae, c.instance_images, resolution, multiple) for c in dataset.concepts]
    classes = None
    if hp.with_prior_preservation:
        classes = [encode_images(vae, c.class_images, resolution, multiple) for c in dataset.concepts]
    run.plan = BatchPlan(
        dataset, instance, classes, batch_size=hp.batch_size, latent_size=resolution // multiple, seed=hp.seed
    )
    if hp.train_text_encoder:
        return
    prompts = {c.instance_prompt for c in dataset.concepts}
    if hp.with_prior_preservation:
        prompts |= {c.class_prompt for c in dataset.concepts if c.class_prompt}
    with torch.no_grad():
        for prompt in prompts:
            run.prompt_cache[prompt] = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [prompt])[0]


def _prepare_optimisation(run: _Run) -> None:
    """The trainable modules, optimizer and schedule, handed to accelerate (DDP across processes)."""
    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    hp, accelerator = run.request.hp, run.accelerator
    frozen_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]
    set_seed(hp.seed)  # the same LoRA initialisation whatever the number of processes
    run.trainable = prepare_trainable(run.pipeline, hp, frozen_dtype)
    # Each optimizer step takes ``gradient_accumulation_steps`` micro-batches in every process.
    per_step = hp.gradient_accumulation_steps * accelerator.num_processes
    run.total_steps = hp.max_steps or hp.epochs * run.plan.steps_per_epoch(per_step)
    optimizer = _optimizer(run.trainable.parameters(), hp)
    # accelerate's scheduler advances once per process at each optimizer step (as in diffusers' scripts).
    lr_scheduler = get_scheduler(
        hp.lr_scheduler,
        optimizer,
        num_warmup_steps=hp.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=run.total_steps * accelerator.num_processes,
    )
    names = list(run.trainable.modules())
    *prepared, run.optimizer, run.lr_scheduler = accelerator.prepare(
        *run.trainable.modules().values(), optimizer, lr_scheduler
    )
    run.models = dict(zip(names, prepared))
    accelerator.register_save_state_pre_hook(_keep_trained_tensors)
    run.noise_scheduler = training_noise_scheduler(run.pipeline)
    # Each process draws its own batches' crops, noise and timesteps: seed + rank.
    set_seed(hp.seed, device_specific=True)


def _keep_trained_tensors(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
    """A checkpoint holds the tensors that train (for LoRA, the adapters), not the frozen base."""
    for model, state in zip(models, weights):
        trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        for key in [key for key in state if key not in trained]:
            del state[key]


def _resume(run: _Run) -> None:
    """Continue from the latest checkpoint: weights, optimizer, schedule and every rank's RNG."""
    from accelerate.utils import broadcast_object_list

    request, accelerator = run.request, run.accelerator
    checkpoint = latest_checkpoint(run.checkpoint_dir) if request.resume and accelerator.is_main_process else None
    checkpoint = broadcast_object_list([checkpoint])[0]
    if checkpoint is None:
        if request.resume:
            logger.info("no checkpoint in %s; starting from step 0", run.checkpoint_dir)
        return
    state = load_checkpoint_state(checkpoint)
    if state is None:
        raise TrainingSetupError(
            f"cannot resume from {checkpoint}: an older txt2img wrote it; train again without --resume"
        )
    processes = state.get("processes", 1)
    if processes != accelerator.num_processes:
        # Each process's random stream is part of the state: a different count cannot continue it.
        raise TrainingSetupError(
            f"cannot resume from {checkpoint}: it was trained with {processes} process(es); "
            f"resume with --processes {processes}"
        )
    signature = run.signature()
    # A checkpoint made before a hyperparameter existed was made with its default.
    defaults = {key: Hyperparameters.model_fields[key].default for key in _RESUME_INVARIANTS}
    recorded = {**defaults, **state["signature"]}
    if recorded != signature:
        changed = sorted(k for k in signature if recorded.get(k) != signature[k])
        raise TrainingSetupError(f"cannot resume from {checkpoint}: it was made with different {changed}")
    accelerator.load_state(str(checkpoint), strict=False)  # strict=False: the frozen base is not in it
    run.step, run.losses = state["step"], list(state["losses"])
    logger.info("resuming from %s (step %d of %d)", checkpoint, run.step, run.total_steps)


def _optimise(run: _Run, bars: Any, on_checkpoint: Callable[[int, dict], None] | None) -> tuple[float, int]:
    """The training loop: returns its duration in seconds and the step it started from."""
    hp, accelerator = run.request.hp, run.accelerator
    logger.info(
        "training %s: steps %d to %d, %d instance image(s), %s%s",
        hp.method,
        run.step + 1,
        run.total_steps,
        run.dataset.num_instance_images,
        accelerator.device.type,
        f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else "",
    )
    task = bars.add_task("training", total=run.total_steps, completed=run.step, status="loss -")
    last_checkpoint_step = first_step = run.step
    loop_started = time.monotonic()
    run.trainable.train()
    log_steps = accelerator.is_main_process
    if log_steps:
        start_step_log(run.request.output_dir, run.step)
    with _StopOnCtrlC() as stop:
        while run.step < run.total_steps:
            step_loss = _optimizer_step(run)
            if stop.requested:
                accelerator.set_trigger()
            # Whether Ctrl-C reached any process, so that all of them stop (and checkpoint) after the same step.
            stop_requested = accelerator.check_trigger()
            run.step += 1
            run.losses.append(step_loss)
            bars.update(task, advance=1, status=f"loss {step_loss:.4f}")
            if log_steps:
                append_step(
                    run.request.output_dir, run.step, run.total_steps, step_loss, run.lr_scheduler.get_last_lr()[0]
                )
            if run.step % hp.checkpointing_steps == 0 or stop_requested:
                saved = _write_checkpoint(run)
                recent = run.losses[last_checkpoint_step:]
                last_checkpoint_step = run.step
                if stop_requested:
                    raise TrainingInterrupted(run.step, saved)
                if on_checkpoint is not None and accelerator.is_main_process:
                    on_checkpoint(run.step, {"loss": sum(recent) / len(recent)})
    run.trainable.train(False)
    return time.monotonic() - loop_started, first_step


def _optimizer_step(run: _Run) -> float:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches in each process, gradients
    averaged by DDP while the backward pass runs. Returns the step's loss, averaged over processes."""
    import torch

    hp, accelerator = run.request.hp, run.accelerator
    unet = run.models["unet"]
    step_loss = torch.zeros((), device=accelerator.device)
    accumulation = hp.gradient_accumulation_steps
    for micro in range(run.step * accumulation, (run.step + 1) * accumulation):
        # The global index of this micro-batch: N processes draw what one process would draw over N.
        batch = run.plan.micro_batch(micro * accelerator.num_processes + accelerator.process_index, None)
        with accelerator.accumulate(*run.models.values()):
            loss = _micro_batch_loss(run, unet, batch)
            accelerator.backward(loss)  # divided by the accumulation steps there
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(run.trainable.parameters(), hp.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / accumulation
    return float(accelerator.reduce(step_loss, reduction="mean"))


def _micro_batch_loss(run: _Run, unet: Any, batch: Any):
    """The DreamBooth loss of one micro-batch: instance error plus weighted prior (class) error."""
    import torch

    hp, accelerator, device = run.request.hp, run.accelerator, run.accelerator.device
    latents = batch.latents.to(device)
    noise = torch.randn(latents.shape).to(device, latents.dtype)
    timesteps = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (len(latents),)).to(device)
    with accelerator.autocast():
        if hp.train_text_encoder:
            embeddings = encode_prompts(run.pipeline.tokenizer, run.models["text_encoder"], batch.prompts)
        else:
            embeddings = torch.stack([run.prompt_cache[prompt] for prompt in batch.prompts])
        errors = per_sample_denoising_error(unet, run.noise_scheduler, latents, noise, timesteps, embeddings)
    loss = errors[: batch.num_instance].mean()
    if batch.num_instance < len(errors):
        loss = loss + hp.prior_loss_weight * errors[batch.num_instance :].mean()
    return loss


def _write_checkpoint(run: _Run) -> Path:
    state = {
        "step": run.step,
        "losses": run.losses,
        "processes": run.accelerator.num_processes,
        "signature": run.signature(),
    }
    return save_checkpoint(run.accelerator, run.checkpoint_dir, run.step, state)


def _finish(run: _Run, bars: Any, *, train_seconds: float, loop_seconds: float, first_step: int) -> CatalogEntry:
    """Rank 0 saves the model, draws the report and registers the entry; the others only return it."""
    request, hp, dataset, base_entry = run.request, run.request.hp, run.dataset, run.base_entry
    run.accelerator.wait_for_everyone()
    model_dir = request.output_dir / MODEL_DIR
    recent = run.losses[-10:]
    metrics: dict[str, float | None] = {
        "final_loss": sum(recent) / len(recent) if recent else None,
        "steps": float(run.total_steps),
        "train_seconds": round(train_seconds, 2),
        "steps_per_second": round((run.step - first_step) / loop_seconds, 3) if run.step > first_step else None,
        # What sharding divides: the trained parameters and the optimizer state one process holds.
        "state_mib_per_process": round(local_state_bytes(list(run.models.values()), run.optimizer) / MIB, 3),
    }
    _gather_sharded_unet(run)
    entry = CatalogEntry(
        id=request.name,
        source="finetune",
        family=base_entry.family,
        resolution=dataset.resolution,
        description=f"DreamBooth {hp.method} fine-tune of {request.base}: "
        + "; ".join(concept.instance_prompt for concept in dataset.concepts),
        license=base_entry.license,
        languages=base_entry.languages,
        tags=["dreambooth", hp.method],
        example_prompt=f"a photo of {dataset.concepts[0].subject}",
        base=request.base,
        method=hp.method,
        artifact=str(model_dir.resolve()),
        hyperparameters=hp.model_dump(mode="json"),
        dataset_fingerprint=dataset.fingerprint,
        metrics=metrics,
        created=datetime.now(timezone.utc),
    )
    if not run.accelerator.is_main_process:
        return entry
    atomic_write_text(request.output_dir / FINISHED_ENTRY, entry_yaml(entry))
    with writing(model_dir):
        _save_model_atomically(run.pipeline, run.trainable, request.output_dir)
    shutil.rmtree(run.checkpoint_dir, ignore_errors=True)
    _write_report(run.pipeline, dataset, hp, request.output_dir, run.losses, bars)
    return _register(entry, request.data_dir, request.register)


def _gather_sharded_unet(run: _Run) -> None:
    """Under sharding, rank 0 gets the whole UNet back as a plain module, to save and to draw with."""
    if not run.accelerator.is_fsdp2:
        return
    unet = full_module(run.accelerator, run.models["unet"])  # every process takes part
    if unet is not None:
        run.pipeline.unet = run.trainable.unet = run.models["unet"] = unet


def _finished_run(run: _Run) -> CatalogEntry:
    """The entry of the model a run saved before it was killed, to register instead of training again."""
    output_dir = run.request.output_dir
    path = output_dir / FINISHED_ENTRY
    entry = CatalogEntry.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    if entry.base != run.request.base or entry.dataset_fingerprint != run.dataset.fingerprint:
        raise TrainingSetupError(
            f"{output_dir} holds a finished run of {entry.base} on another dataset; pick another --name"
        )
    if run.accelerator.is_main_process:
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
    atomic_write_text(output_dir / LOSS_HISTORY, json.dumps(losses))
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
    logger.info("compute_fid: evaluating %s", entry.id)
    report = evaluate_model(entry.id, data_dir)
    entry = entry.model_copy(update={"metrics": {**(entry.metrics or {}), **report.metrics}})
    write_entry(entry, overwrite=True)
    return entry
