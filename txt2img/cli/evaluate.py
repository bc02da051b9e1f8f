"""``txt2img evaluate`` and ``txt2img tune``: score a model on a DreamBooth dataset, and search for the best fine-tune.

Only click is imported at startup; the commands import pydantic, torch and Optuna when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from catalog.paths import require_folder
from jumpstart.trainers import DEFAULT_TRAINER, RemoteTrainer, remote_trainer
from training.dreambooth import TrainingInterrupted
from training.evaluation import (
    EvaluationError,
    EvaluationSettings,
    evaluate_model,
    metric_lines,
    plan_metrics,
    read_prompts_file,
)
from training.hyperparameters import Hyperparameters, parse_hyperparameters
from training.metrics import METRIC_DIRECTIONS, MetricWeights
from training.tuning import DEFAULT_RANGES, SearchRange, StudyConfig, TuningError, default_study_dir, trial_evaluation
from training.tuning import tune as run_study
from txt2img.cli.deploy import remote_job_options, run_remote_tuning, trainer_option
from txt2img.cli.options import refuse_local_options
from txt2img.errors import InputError, Interrupted, first_error
from txt2img.extras import require_extra

METRICS_HELP = "fid_score, clip_i, clip_t, dino or instance_loss"


def _evaluation_options(command):
    """--prompts, --prompts-per-subject, --images-per-prompt and --steps, shared by evaluate and tune."""
    options = [
        click.option(
            "--prompts",
            "prompts_file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="A file with one prompt a line, instead of the DreamBooth paper's 25 prompts per subject.",
        ),
        click.option("--prompts-per-subject", type=click.IntRange(min=1), help="Use only the first N paper prompts."),
        click.option("--images-per-prompt", type=click.IntRange(min=1), default=1, show_default=True),
        click.option("--steps", type=click.IntRange(min=1), default=25, show_default=True, help="Inference steps."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _weight_options(command):
    """--inception-path, --clip-path and --dino-path, shared by both commands."""
    options = [
        click.option(
            "--inception-path",
            help="TorchScript Inception network for fid_score (default: env TXT2IMG_INCEPTION_PATH, "
            "then $TXT2IMG_HOME/metric-weights/inception-2015-12-05.pt).",
        ),
        click.option(
            "--clip-path",
            help="Local CLIP model folder or a repo id in the HF cache, for clip_i/clip_t "
            "(default: env TXT2IMG_CLIP_PATH, then openai/clip-vit-large-patch14 from the cache).",
        ),
        click.option(
            "--dino-path",
            help="Local DINO ViT folder or a repo id in the HF cache, for dino "
            "(default: env TXT2IMG_DINO_PATH, then facebook/dino-vits16 from the cache).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _evaluation_settings(options: dict[str, Any], default_metrics: tuple[str, ...] = ()) -> EvaluationSettings:
    """The EVALUATION_OPTIONS of either command as one ``EvaluationSettings`` (``default_metrics``
    where no --metric is given, else the settings' own default); a bad value is one line."""
    from pydantic import ValidationError

    weights = MetricWeights.from_env(
        inception=options["inception_path"], clip=options["clip_path"], dino=options["dino_path"]
    )
    metrics = options["metrics"] or default_metrics
    chosen = {"metrics": list(metrics)} if metrics else {}
    try:
        return EvaluationSettings(
            prompts=_read_prompts(options["prompts_file"]),
            prompts_per_subject=options["prompts_per_subject"],
            images_per_prompt=options["images_per_prompt"],
            inference_steps=options["steps"],
            seed=options["seed"],
            weights=weights,
            **chosen,
        )
    except ValidationError as error:
        raise InputError(first_error(error)) from None


def _announce_skipped(plan, scope: str) -> None:
    """Say which metrics are skipped, and whether any image will be generated, before any work starts,
    so nobody waits on images only to learn they were for nothing."""
    if plan.skipped:
        nothing = "" if plan.image_metrics else "; no image metric can run, so no image is generated"
        click.echo(f"{scope}skipping {', '.join(plan.skipped)}: weights not on this machine{nothing}", err=True)


def _read_prompts(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return read_prompts_file(path)
    except EvaluationError as error:
        raise InputError(str(error)) from None


def _print_metrics(metrics: dict[str, float | None], skipped: dict[str, str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="bold cyan")
    table.add_column("value", justify="right")
    table.add_column("better")
    table.add_column("note", overflow="fold")
    for name, value in metrics.items():
        better = "lower" if METRIC_DIRECTIONS.get(name) == "minimize" else "higher"
        shown = "skipped" if value is None else f"{value:.4f}"
        table.add_row(name, shown, better, skipped.get(name, ""))
    Console().print(table)
    for line in metric_lines(metrics):
        click.echo(line)


@click.command("evaluate")
@click.argument("model_id")
@click.argument("data_dir", type=click.Path(path_type=Path, file_okay=False))
@_evaluation_options
@click.option("--metric", "metrics", multiple=True, help=f"Compute only these ({METRICS_HELP}); repeatable.")
@click.option(
    "--output", type=click.Path(path_type=Path, file_okay=False), help="Folder for the JSON, grid and images."
)
@click.option("--seed", type=int, default=0, show_default=True)
@_weight_options
def evaluate(model_id: str, data_dir: Path, output: Path | None, **evaluation_options) -> None:
    """Generate images with MODEL_ID for the subjects in DATA_DIR and score them.

    Prints a table, then `name=value` lines (e.g. `fid_score=12.34`) as SageMaker metric regexes
    read them, and writes metrics.json (plus grid.png and the images when an image metric can run).
    A metric whose network weights are not on this machine is shown as skipped, with how to
    provide them; that is said before anything runs, and no image is generated for it.
    """
    if output:
        require_folder(output, "output folder")

    settings = _evaluation_settings(evaluation_options)
    plan = plan_metrics(settings)
    _announce_skipped(plan, "")
    report = evaluate_model(model_id, data_dir, settings, output_dir=output, feature_extractors=plan.extractors)
    _print_metrics(report.metrics, report.skipped, f"{model_id} on {data_dir}")
    click.echo(f"wrote {report.json_path}" + (f" and {report.grid_path}" if report.grid_path else ""))


def _print_trials(result) -> None:
    from rich.console import Console
    from rich.table import Table

    searched = list(result.best.params)
    table = Table(title=f"study {result.name}: {result.objective} ({result.direction})", title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("state")
    for name in searched:
        table.add_column(name, justify="right")
    table.add_column(result.objective, justify="right", style="bold")
    table.add_column("grid", overflow="fold")
    for record in result.trials:
        marker = " *" if record.number == result.best.number else ""
        table.add_row(
            f"{record.number}{marker}",
            record.state.lower(),
            *(f"{record.params[name]:.4g}" if name in record.params else "" for name in searched),
            "" if record.value is None else f"{record.value:.4f}",
            record.grid or (record.error or ""),
        )
    Console().print(table)


REMOTE_TUNING_DEFAULT_JOBS = 7  # SageMaker Automatic Model Tuning: JumpStart's max_jobs and max_parallel_jobs
# What only a local study reads: the study's storage and pruning.
LOCAL_STUDY_OPTIONS = ("resume", "storage", "study_dir", "keep_top_k", "no_prune")
# How each trial is evaluated: locally, or in each training job of txt2img's trainer on SageMaker.
EVALUATION_OPTIONS = (
    "seed",
    "metrics",
    "prompts_file",
    "prompts_per_subject",
    "images_per_prompt",
    "steps",
    "inception_path",
    "clip_path",
    "dino_path",
)
# tune's own options; the others are remote_job_options', handed to SageMaker as they are.
TUNE_OPTIONS = (
    "trials",
    "parallel",
    "objective",
    "ranges",
    "fixed",
    "trainer",
    *LOCAL_STUDY_OPTIONS,
    *EVALUATION_OPTIONS,
)


@dataclass(frozen=True)
class TuneOptions:
    """What ``txt2img tune`` searches, parsed once from its options, whether a local study or a
    SageMaker tuning job runs the trials."""

    data_dir: str
    base: str
    name: str
    objective: str
    trials: int | None
    parallel: int | None
    searches: list[SearchRange]  # --range, or the local study's defaults
    hyperparameters: Hyperparameters  # --hp: the fixed ones
    evaluation: EvaluationSettings | None  # each trial's; None where the remote trainer evaluates on its own


@click.command("tune")
@click.argument("data_dir")
@click.option("--base", required=True, help="Catalog id of the model to fine-tune.")
@click.option("--name", required=True, help="Catalog id the best trial is registered as.")
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    help="Required: trials to finish (completed or pruned). Optional with --remote (default 7).",
)
@click.option("--parallel", type=click.IntRange(min=1), help="Trials at once (processes); default 1, with --remote 7.")
@click.option("--objective", default="fid_score", show_default=True, help=f"Metric to optimise: {METRICS_HELP}.")
@click.option(
    "--range",
    "ranges",
    multiple=True,
    metavar="KEY=LO:HI[:log]",
    help="Search a numeric hyperparameter; repeatable. Default: learning_rate=1e-7:3e-6:log, max_steps=50:400.",
)
@click.option("--hp", "fixed", multiple=True, metavar="KEY=VALUE", help="A fixed hyperparameter; repeatable.")
@click.option("--storage", help="Optuna RDB URL (e.g. postgresql://...) shared by several machines.")
@click.option("--resume", is_flag=True, help="Continue the study NAME after an interruption.")
@click.option(
    "--keep-top-k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Keep the weights of this many best trials; the others' are removed.",
)
@click.option(
    "--study-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the journal, trials and report (default $TXT2IMG_HOME/studies/NAME).",
)
@click.option("--no-prune", is_flag=True, help="Let every trial run to its end.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler and the evaluations.")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help=f"What each trial computes besides the objective, which comes first ({METRICS_HELP}); repeatable. "
    "Default: all; those whose weights are not on this machine are skipped without generating images. "
    "With --remote --trainer txt2img: the objective alone by default, and a missing network is refused.",
)
@_evaluation_options
@_weight_options
@remote_job_options
@trainer_option
@click.pass_context
def tune(context: click.Context, data_dir: str, base: str, name: str, **options) -> None:
    """Search DreamBooth hyperparameters of BASE on DATA_DIR with Optuna's TPE and register the best as NAME.

    Each trial trains, is evaluated, and may be pruned at a checkpoint when its loss lags. The
    study lives in a journal file in the study folder (safe for --parallel processes) or in
    --storage; --resume continues it. The report holds a table, objective.png and a grid per trial.
    With --remote, SageMaker Automatic Model Tuning (Bayesian) runs the trials as training jobs
    instead: JumpStart's script, minimising fid_score, or with --trainer txt2img this trainer,
    evaluating each model as a local trial (only the objective unless --metric says more; the
    networks are uploaded from here). DATA_DIR may then be an s3:// prefix.
    """
    if options["study_dir"]:
        require_folder(options["study_dir"], "study folder")

    trainer = _remote_trainer(context, options)
    tune_options = _tune_options(data_dir, base, name, options, trainer)
    if trainer is None:
        _run_local_study(_study_config(tune_options, options), options["resume"])
    else:
        _run_remote_tuning(tune_options, trainer, options)


def _run_remote_tuning(tune_options: TuneOptions, trainer: RemoteTrainer, options: dict[str, Any]) -> None:
    """SageMaker Automatic Model Tuning of ``tune_options`` with ``trainer``'s training jobs."""
    # No --range: the trainer's own defaults (JumpStart's script: JumpStart's ranges, on its linear scale).
    ranges = {search.name: (search.low, search.high, search.log) for search in tune_options.searches}
    jobs = tune_options.trials or REMOTE_TUNING_DEFAULT_JOBS
    run_remote_tuning(
        tune_options.data_dir,
        tune_options.base,
        tune_options.name,
        tune_options.hyperparameters,
        ranges if options["ranges"] else None,
        max_jobs=jobs,
        max_parallel_jobs=tune_options.parallel or min(jobs, REMOTE_TUNING_DEFAULT_JOBS),
        objective=tune_options.objective,
        trainer=trainer.name,
        evaluation=tune_options.evaluation,
        **{key: value for key, value in options.items() if key not in TUNE_OPTIONS},
    )


def _remote_trainer(context: click.Context, options: dict[str, Any]) -> RemoteTrainer | None:
    """The trainer of SageMaker's training jobs with --remote, None for a local study; refuses the
    options the chosen kind of run does not read."""
    if not options["remote"]:
        if options["trainer"] != DEFAULT_TRAINER:
            raise InputError("--trainer is for --remote runs; a local study runs txt2img's trainer")
        return None
    refuse_local_options(context, LOCAL_STUDY_OPTIONS, "SageMaker Automatic Model Tuning keeps the study")
    trainer = remote_trainer(options["trainer"])
    if trainer.evaluation_refusal is not None:
        refuse_local_options(context, EVALUATION_OPTIONS, trainer.evaluation_refusal)
    return trainer


def _tune_options(
    data_dir: str, base: str, name: str, options: dict[str, Any], trainer: RemoteTrainer | None
) -> TuneOptions:
    """The search and each trial's evaluation, from the options; a bad or repeated one is one line."""
    try:
        searches = [SearchRange.parse(text) for text in options["ranges"]] or list(DEFAULT_RANGES)
    except TuningError as error:
        raise InputError(f"--range: {error}") from None
    hyperparameters = parse_hyperparameters(options["fixed"])
    names = [search.name for search in searches]
    fixed = hyperparameters.model_dump(exclude_unset=True)
    overlap = sorted(set(names) & set(fixed)) or sorted({n for n in names if names.count(n) > 1})
    if overlap:
        raise InputError(f"{', '.join(overlap)} is given more than once (--range and --hp, or two --range)")
    # Each trial's evaluation: a local study's, or each job's of a remote trainer that evaluates as a
    # local trial does, computing the objective alone unless told more (each metric costs GPU time).
    evaluation = None
    if trainer is None:
        evaluation = _evaluation_settings(options)
    elif trainer.evaluation_refusal is None:
        evaluation = _evaluation_settings(options, (options["objective"],))
    return TuneOptions(
        data_dir=data_dir,
        base=base,
        name=name,
        objective=options["objective"],
        trials=options["trials"],
        parallel=options["parallel"],
        searches=searches,
        hyperparameters=hyperparameters,
        evaluation=evaluation,
    )


def _study_config(tune_options: TuneOptions, options: dict[str, Any]) -> StudyConfig:
    """The local study of ``tune_options``, with the options only a local study reads."""
    if tune_options.trials is None:
        raise InputError("--trials is required (how many trials the study should finish)")
    if tune_options.data_dir.startswith("s3://"):
        raise InputError(f"{tune_options.data_dir} is on S3: add --remote to tune on SageMaker, or download it first")
    return StudyConfig(
        data_dir=str(Path(tune_options.data_dir).expanduser().resolve()),
        base=tune_options.base,
        name=tune_options.name,
        trials=tune_options.trials,
        parallel=tune_options.parallel or 1,
        objective=tune_options.objective,
        ranges=tune_options.searches,
        hyperparameters=tune_options.hyperparameters.model_dump(mode="json", exclude_unset=True),
        storage=options["storage"],
        study_dir=str((options["study_dir"] or default_study_dir(tune_options.name)).expanduser().resolve()),
        keep_top_k=options["keep_top_k"],
        prune=not options["no_prune"],
        seed=options["seed"],
        evaluation=tune_options.evaluation,
    )


def _run_local_study(config: StudyConfig, resume: bool) -> None:
    """Run (or resume) the study on this machine, then show its trials and its best."""
    require_extra("tune")

    plan = plan_metrics(trial_evaluation(config))
    if config.objective not in plan.skipped:  # otherwise the study refuses to start, saying why
        _announce_skipped(plan, "each trial: ")
    try:
        result = run_study(config, resume=resume)
    except TrainingInterrupted:
        raise Interrupted(
            f"interrupted; run the same command with --resume to continue study '{config.name}'"
        ) from None
    _print_trials(result)
    _print_metrics(result.best.metrics, {}, f"best trial {result.best.number}, registered as {result.name}")
    click.echo(f"wrote {result.trials_path} and {result.plot_path}")
