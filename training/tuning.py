"""Bayesian hyperparameter tuning of DreamBooth fine-tunes with Optuna's TPE sampler.

Each trial trains an unregistered fine-tune with hyperparameters TPE suggests, reports its
training loss at each checkpoint (so the median pruner can stop a hopeless trial early), then
evaluates it, objective first, and tells the study its objective metric. A trial generates
evaluation images only for image metrics that can run; its run's contact sheet of validation
images is what a person looks at. The parent process asks the study for trials and hands their
numbers to ``parallel`` worker processes; the workers report and tell through the shared storage
(a journal file in the study folder by default, or any RDB URL), so a killed study resumes from
what storage holds. ``training.tuning_report`` then registers the best trial as catalog entry
``name``, with every trial's hyperparameters and metrics as its provenance.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from catalog.paths import atomic_write_text, txt2img_home
from catalog.store import CatalogError, load_catalog
from training.dataset import DatasetError, load_dataset
from training.dreambooth import TrainingInterrupted, train
from training.evaluation import EvaluationSettings, evaluate_entry, plan_metrics
from training.hyperparameters import Hyperparameters, numeric_kind
from training.metrics import METRIC_DIRECTIONS
from training.report import CONTACT_SHEET
from training.tuning_report import (
    SURPLUS_ATTRIBUTE,
    TuningResult,
    model_dir,
    ranked_trials,
    register_and_report,
    trial_records,
)
from txt2img.errors import InputError

JOURNAL_FILE_NAME = "journal.log"
CONFIG_FILE_NAME = "study.json"
CONFIG_ATTRIBUTE = "txt2img_config"
# Two workers of one study can both see room for one more trial and both ask for it: the later
# one stands down, marked with SURPLUS_ATTRIBUTE, and is never run or reported.
# On a shared database a running trial says it is alive this often; one silent for the grace
# period (its machine died) is failed, so the other workers do not wait for it forever.
HEARTBEAT_S = 20
GRACE_PERIOD_S = 120
WAIT_POLL_S = 2.0


class TuningError(InputError, ValueError):
    """The study cannot run as asked; the message says why and what to do."""


class SearchRange(BaseModel):
    """One hyperparameter's search interval."""

    model_config = ConfigDict(extra="forbid")

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @classmethod
    def parse(cls, text: str) -> SearchRange:
        """Parse ``key=lo:hi`` or ``key=lo:hi:log`` for a numeric hyperparameter."""
        key, separator, bounds = text.partition("=")
        parts = bounds.split(":")
        if not separator or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise TuningError(f"expected key=lo:hi or key=lo:hi:log, got '{text}'")
        key = key.strip()
        try:
            integer = numeric_kind(key) is int
        except ValueError as error:
            raise TuningError(str(error)) from None
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise TuningError(f"range bounds of '{key}' must be numbers, got '{bounds}'") from None
        if integer and (low != int(low) or high != int(high)):
            raise TuningError(f"'{key}' is an integer hyperparameter; its bounds must be integers")
        if not low < high:
            raise TuningError(f"range of '{key}': lo must be below hi, got {parts[0]}:{parts[1]}")
        log = len(parts) == 3
        if log and low <= 0:
            raise TuningError(f"a log range needs lo > 0 ('{key}')")
        candidate = cls(name=key, low=low, high=high, log=log, integer=integer)
        for bound in (low, high):
            try:
                Hyperparameters(**{key: int(bound) if integer else bound})
            except ValueError as error:
                message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
                raise TuningError(f"range of '{key}': {bound:g} is not a valid value ({message})") from None
        return candidate

    def suggest(self, trial) -> float | int:
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


# SageMaker JumpStart's default tuning ranges for Stable Diffusion fine-tuning.
DEFAULT_RANGES = (
    SearchRange(name="learning_rate", low=1e-7, high=3e-6, log=True),
    SearchRange(name="max_steps", low=50, high=400, integer=True),
)


class StudyConfig(BaseModel):
    """Everything a study needs; saved in the study folder and in the study itself, so workers and
    ``--resume`` see the same search."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str
    base: str
    name: str
    trials: int = Field(ge=1)
    parallel: int = Field(1, ge=1)
    objective: str = "fid_score"
    ranges: list[SearchRange] = Field(default_factory=lambda: list(DEFAULT_RANGES))
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="Fixed, non-searched values.")
    storage: str | None = Field(None, description="An RDB URL; None means the journal file in the study folder.")
    study_dir: str
    keep_top_k: int = Field(1, ge=1)
    prune: bool = True
    seed: int = Field(0, description="The sampler's seed; the evaluation has its own in ``evaluation``.")
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)

    @property
    def direction(self) -> str:
        return METRIC_DIRECTIONS[self.objective]

    @property
    def storage_label(self) -> str:
        """Where the study lives, as shown to people and kept in the catalog: never with a password."""
        if not self.storage:
            return str(Path(self.study_dir) / JOURNAL_FILE_NAME)
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            return make_url(self.storage).render_as_string(hide_password=True)
        except ArgumentError:
            return "<unparsable storage URL>"

    def search_signature(self) -> dict[str, Any]:
        """What must not change when a study resumes."""
        return self.model_dump(mode="json", include={"data_dir", "base", "objective", "ranges", "hyperparameters"})


def default_study_dir(name: str) -> Path:
    return txt2img_home() / "studies" / name


def open_storage(config: StudyConfig):
    """The study's Optuna storage: the RDB URL if given, else the journal file (safe across processes)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if config.storage:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with _quiet_experimental():
                return optuna.storages.RDBStorage(
                    config.storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_PERIOD_S
                )
        except (ImportError, ValueError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
            reason = str(error).splitlines()[0]
            raise TuningError(f"cannot open storage {config.storage_label}: {reason}") from error
    path = Path(config.study_dir) / JOURNAL_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def _quiet_experimental():
    """Optuna warns that heartbeats are experimental, and meant for study.optimize; these trials are
    asked and told and beat by hand (_heartbeat), on purpose, so users need not read that on every run."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def _pruner(config: StudyConfig):
    import optuna

    if not config.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def _load_study(config: StudyConfig, storage=None):
    import optuna

    return optuna.load_study(
        study_name=config.name,
        storage=storage or open_storage(config),
        pruner=_pruner(config),
    )


def _trial_sampler(config: StudyConfig, number: int):
    """TPE seeded from the study's seed and the trial's number.

    A sampler seeded once per process would restart its random sequence in every process that
    opens the study (``--resume``, or a second ``tune`` sharing it) and repeat the first trials'
    values; the trial number is unique in the study, so each trial draws its own.
    """
    import numpy
    import optuna

    seed = int(numpy.random.SeedSequence([config.seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def trial_dir(config: StudyConfig, number: int) -> Path:
    return Path(config.study_dir) / "trials" / f"{number:04d}"


def objective_first(evaluation: EvaluationSettings, objective: str) -> EvaluationSettings:
    """``evaluation`` with ``objective`` as its first metric, so it is computed before any other (here
    and in each training job of a SageMaker tuning job)."""
    others = [name for name in evaluation.metrics if name != objective]
    return evaluation.model_copy(update={"metrics": [objective, *others]})


def trial_evaluation(config: StudyConfig) -> EvaluationSettings:
    """The trial's evaluation settings, the objective first."""
    return objective_first(config.evaluation, config.objective)


def _trial_id(study, storage, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def _asked_trial(study, storage, number: int):
    """The running trial ``number`` of ``study``, as the worker that runs it reports and records through."""
    import optuna

    return optuna.trial.Trial(study, _trial_id(study, storage, number))


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int):
    """While the block runs, tell a shared database that the trial is alive (Optuna's heartbeat).

    Optuna beats only inside ``study.optimize``; these trials are asked and told, so they beat here.
    """
    if not (hasattr(storage, "is_heartbeat_enabled") and storage.is_heartbeat_enabled()):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trial(config_json: str, number: int) -> None:
    """Train and evaluate asked trial ``number``, then tell the study; runs in a worker process or in-process."""
    import optuna

    config = StudyConfig.model_validate_json(config_json)
    storage = open_storage(config)
    study = _load_study(config, storage)
    trial = _asked_trial(study, storage, number)
    folder = trial_dir(config, number)
    hyperparameters = Hyperparameters.model_validate({**config.hyperparameters, **trial.params})
    report_losses = config.prune and config.direction == "minimize"

    def on_checkpoint(step: int, values: dict[str, float]) -> None:
        # The training loss is a stand-in for the (lower-is-better) objective at this step; for a
        # higher-is-better objective it would point the wrong way, so such studies do not prune.
        if report_losses and values.get("loss") is not None:
            trial.report(float(values["loss"]), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

    try:
        with _heartbeat(storage, _trial_id(study, storage, number)):
            entry = train(
                Path(config.data_dir),
                config.base,
                f"{config.name}-trial-{number}",
                hyperparameters,
                output_dir=folder / "run",
                progress=False,
                register=False,
                on_checkpoint=on_checkpoint,
            )
            report = evaluate_entry(
                entry,
                Path(config.data_dir),
                trial_evaluation(config),
                hyperparameters=hyperparameters,
                output_dir=folder / "evaluation",
                progress=False,
            )
    except optuna.TrialPruned:
        shutil.rmtree(folder / "run", ignore_errors=True)
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
        return
    except TrainingInterrupted:
        raise  # Ctrl-C stops the study; the trial stays RUNNING, so --resume runs it again
    except Exception as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}")
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        return
    value = report.metrics.get(config.objective)
    trial.set_user_attr("metrics", report.metrics)
    trial.set_user_attr("grid", str(folder / "run" / CONTACT_SHEET))
    trial.set_user_attr("entry", entry.model_dump(mode="json", exclude_none=True))
    if value is None:
        trial.set_user_attr("error", report.skipped.get(config.objective, "objective not computed"))
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        return
    study.tell(number, value)


def _limit_threads(parallel: int) -> None:
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel))


def _check_inputs(config: StudyConfig) -> None:
    """Fail before any training if the base, dataset, name or objective cannot work."""
    if config.objective not in METRIC_DIRECTIONS:
        raise TuningError(f"unknown objective '{config.objective}'; choose from {', '.join(METRIC_DIRECTIONS)}")
    try:
        catalog = load_catalog()
    except CatalogError as error:
        raise TuningError(f"the catalog is broken: {error}") from error
    base = catalog.get(config.base)
    if not base.locally_trainable:
        raise TuningError(f"'{config.base}' cannot be fine-tuned locally (family {base.family})")
    if config.name in catalog:
        raise TuningError(f"'{config.name}' is already in the catalog; pick another --name")
    if model_dir(config.name).exists():
        raise TuningError(f"{model_dir(config.name)} already exists; remove it or pick another --name")
    try:
        hyperparameters = Hyperparameters.model_validate(config.hyperparameters)
        load_dataset(Path(config.data_dir), hyperparameters, base.resolution)
    except DatasetError as error:
        raise TuningError(str(error)) from error
    objective_only = config.evaluation.model_copy(update={"metrics": [config.objective]})
    skipped = plan_metrics(objective_only).skipped
    if skipped:
        raise TuningError(f"objective {config.objective} cannot be computed: {skipped[config.objective]}")


def _prepare_study(config: StudyConfig, resume: bool):
    """Create the study, or (``resume``) reopen it; on the journal, re-queue the trials a crash left running."""
    import optuna

    storage = open_storage(config)
    existing = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    if config.name in existing and not resume:
        raise TuningError(
            f"study '{config.name}' already exists in {config.storage_label}; pass --resume to continue it"
        )
    if config.name not in existing and resume:
        raise TuningError(f"no study '{config.name}' in {config.storage_label} to resume")
    if not resume:
        study = optuna.create_study(
            study_name=config.name,
            storage=storage,
            direction=config.direction,
            pruner=_pruner(config),
        )
        study.set_user_attr(CONFIG_ATTRIBUTE, config.search_signature())
        return study
    study = _load_study(config, storage)
    saved = study.user_attrs.get(CONFIG_ATTRIBUTE)
    if saved != config.search_signature():
        raise TuningError(
            f"study '{config.name}' was started with a different search ({saved}); "
            "resume it with the same data, base, objective, ranges and --hp values"
        )
    if config.storage:
        return study  # an RDB study may be shared with other machines whose trials are still running
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # The journal is one machine's: a trial left running by a killed process will never be
        # told, so it is failed and its parameters queued again.
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        shutil.rmtree(trial_dir(config, trial.number), ignore_errors=True)
    return study


def _count(study, *states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _claimed(study) -> int:
    """Trials that count towards the study's total: finished, or being run by some worker."""
    from optuna.trial import TrialState

    return _count(study, TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _ask(study, config: StudyConfig) -> int | None:
    """Start a trial with TPE's suggestions for the searched ranges; its worker finds it by number.

    None when another worker took the last place first (this trial stands down, see SURPLUS_ATTRIBUTE).
    """
    from optuna.trial import TrialState

    with _quiet_experimental():
        trial = study.ask()
    # The sampler draws when a value is suggested, so this trial's own sampler decides its values.
    study.sampler = _trial_sampler(config, trial.number)
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    ahead = [other for other in study.get_trials(deepcopy=False, states=counted) if other.number < trial.number]
    if len(ahead) >= config.trials:
        trial.set_user_attr(SURPLUS_ATTRIBUTE, True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    for search in config.ranges:
        search.suggest(trial)
    return trial.number


def _failed(study) -> list:
    """The trials that ran and failed (not those that stood down as surplus)."""
    from optuna.trial import TrialState

    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return [trial for trial in failed if not trial.user_attrs.get(SURPLUS_ATTRIBUTE)]


def _check_failures(study, config: StudyConfig, failed_before: int) -> None:
    """Stop a study whose trials keep failing instead of retrying forever."""
    failed = _failed(study)[failed_before:]
    if len(failed) >= config.trials:
        errors = sorted({trial.user_attrs.get("error", "unknown error") for trial in failed})
        raise TuningError(f"{len(failed)} trials of study '{config.name}' failed: {'; '.join(errors)}")


def _run_trials(study, config: StudyConfig, progress: bool) -> None:
    """Run trials until ``config.trials`` have completed or been pruned, ``parallel`` at a time.

    The count comes from the storage, so several ``tune`` processes (or machines, on an RDB)
    sharing one study run ``config.trials`` trials between them.
    """
    from optuna.trial import TrialState
    from rich.console import Console
    from rich.progress import Progress

    config_json = config.model_dump_json()
    failed_before = len(_failed(study))
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    with Progress(console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(f"tuning {config.name}", total=config.trials, completed=_count(study, *finished))
        if config.parallel == 1:
            while _claimed(study) < config.trials:
                number = _ask(study, config)
                if number is not None:
                    run_trial(config_json, number)
                bar.update(task, completed=_count(study, *finished))
                _check_failures(study, config, failed_before)
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        context = multiprocessing.get_context("spawn")  # torch does not survive fork with threads running
        with ProcessPoolExecutor(
            config.parallel, mp_context=context, initializer=_limit_threads, initargs=(config.parallel,)
        ) as pool:
            running: set = set()
            while True:
                while len(running) < config.parallel and _claimed(study) < config.trials:
                    number = _ask(study, config)
                    if number is not None:
                        running.add(pool.submit(run_trial, config_json, number))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a crashed worker process surfaces here
                bar.update(task, completed=_count(study, *finished))
                _check_failures(study, config, failed_before)


def _wait_for_other_workers(study) -> None:
    """On a shared database, wait until no trial runs anywhere, so that every worker sees the same best.

    A trial whose worker died stops beating and is failed after the grace period (Optuna's
    fail_stale_trials), so a dead machine cannot make the others wait forever.
    """
    import optuna
    from optuna.trial import TrialState

    while True:
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        if not _count(study, TrialState.RUNNING):
            return
        time.sleep(WAIT_POLL_S)


def tune(config: StudyConfig, *, resume: bool = False, progress: bool = True) -> TuningResult:
    """Run (or resume) the study, register its best trial as ``config.name`` and write the report."""
    _check_inputs(config)
    study_dir = Path(config.study_dir)
    study = _prepare_study(config, resume)
    atomic_write_text(study_dir / CONFIG_FILE_NAME, config.model_dump_json(indent=2) + "\n")
    _run_trials(study, config, progress)
    if config.storage:
        _wait_for_other_workers(study)

    records = trial_records(study)
    if not ranked_trials(records, config.direction):
        errors = sorted({record.error for record in records if record.error})
        raise TuningError(f"no trial of study '{config.name}' completed" + (f": {'; '.join(errors)}" if errors else ""))
    return register_and_report(study, config, records)
