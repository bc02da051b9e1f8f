"""What a finished study leaves behind: its trial records, the objective plot, the registered best
trial and ``trials.json``.

``training.tuning`` runs the trials; this module reads them back from the study's storage,
copies the best trial's run to the models folder, registers it as a catalog entry with every
trial as its provenance, and removes the weights of the trials no one keeps.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from catalog.paths import atomic_write_text
from catalog.schema import CatalogEntry
from catalog.store import claim_name, load_catalog, write_entry
from training.dreambooth import default_output_dir

if TYPE_CHECKING:
    from training.tuning import StudyConfig

TRIALS_FILE_NAME = "trials.json"
PLOT_FILE_NAME = "objective.png"
# Set by the study loop on a trial that two workers asked for at once (training/tuning.py).
SURPLUS_ATTRIBUTE = "surplus"

logger = logging.getLogger("txt2img.training")


class TrialRecord(BaseModel):
    """One trial's outcome, as the report and the catalog provenance show it."""

    model_config = ConfigDict(extra="forbid")

    number: int
    state: str
    params: dict[str, Any]
    value: float | None = None
    metrics: dict[str, float | None] = Field(default_factory=dict)
    grid: str | None = Field(None, description="The trial's contact sheet of validation images.")
    artifact: str | None = None
    error: str | None = None


class TuningResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    objective: str
    direction: str
    best: TrialRecord
    trials: list[TrialRecord]
    study_dir: str
    plot_path: str
    trials_path: str


def model_dir(name: str) -> Path:
    """Where the registered best trial's run goes: where ``txt2img train`` would have put it."""

    return default_output_dir(name)


def trial_records(study) -> list[TrialRecord]:
    """Every trial of ``study``, in order, from what its worker recorded in the storage."""
    records = []
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get(SURPLUS_ATTRIBUTE):  # asked by two workers at once, stood down, never run
            continue
        entry = trial.user_attrs.get("entry") or {}
        records.append(
            TrialRecord(
                number=trial.number,
                state=trial.state.name,
                params=trial.params,
                value=trial.value,
                metrics=trial.user_attrs.get("metrics", {}),
                grid=trial.user_attrs.get("grid"),
                artifact=entry.get("artifact"),
                error=trial.user_attrs.get("error"),
            )
        )
    return records


def ranked_trials(records: list[TrialRecord], direction: str) -> list[TrialRecord]:
    """The completed trials, best first."""
    complete = [record for record in records if record.state == "COMPLETE" and record.value is not None]
    return sorted(complete, key=lambda record: record.value if direction == "minimize" else -record.value)


def plot_objective(records: list[TrialRecord], config: StudyConfig, path: Path) -> None:
    """One scatter panel per searched hyperparameter: the objective of each completed trial, best marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    ranked = ranked_trials(records, config.direction)
    figure, axes = pyplot.subplots(1, len(config.ranges), figsize=(4.5 * len(config.ranges), 3.6), squeeze=False)
    for axis, search in zip(axes[0], config.ranges):
        points = [(record.params[search.name], record.value) for record in ranked if search.name in record.params]
        if points:
            axis.scatter(*zip(*points), color="tab:blue", label="trial")
            best = ranked[0]
            axis.scatter([best.params[search.name]], [best.value], color="tab:red", marker="*", s=160, label="best")
        if search.log:
            axis.set_xscale("log")
        axis.set_xlabel(search.name)
        axis.set_ylabel(f"{config.objective} ({config.direction})")
        axis.grid(alpha=0.3)
    axes[0][0].legend(loc="best")
    figure.suptitle(f"study {config.name}: {len(ranked)} completed trials")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _register_best(study, best: TrialRecord, records: list[TrialRecord], config: StudyConfig):
    """Copy the best trial's run (weights and training report) to the models folder and register it."""

    trial = next(trial for trial in study.get_trials(deepcopy=False) if trial.number == best.number)
    entry = CatalogEntry.model_validate(trial.user_attrs["entry"])
    weights = Path(entry.artifact or "")
    destination = model_dir(config.name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(weights.parent, destination)
    tuning = {
        "study": config.name,
        "storage": config.storage_label,
        "objective": config.objective,
        "direction": config.direction,
        "best_trial": best.number,
        "ranges": [search.model_dump() for search in config.ranges],
        "trials": [record.model_dump(include={"number", "state", "params", "value", "metrics"}) for record in records],
    }
    registered = entry.model_copy(
        update={
            "id": config.name,
            "artifact": str(destination / weights.name),
            "metrics": {**(entry.metrics or {}), **best.metrics},
            "tags": [*entry.tags, "tuned"],
            "tuning": tuning,
            "created": datetime.now(timezone.utc),
            "description": (
                f"Best of {len(records)} tuning trials of {config.base} ({config.objective}={best.value:.6f})."
            ),
        }
    )
    write_entry(CatalogEntry.model_validate(registered.model_dump()))
    return registered


def _prune_artifacts(ranked: list[TrialRecord], records: list[TrialRecord], keep_top_k: int) -> None:
    """Delete the weights of every trial outside the top ``keep_top_k``; contact sheets and evaluations stay.

    The best trial's weights now live in the models folder, so its copy in the study goes too.
    """
    keep = {record.number for record in ranked[1:keep_top_k]}
    for record in records:
        if record.number not in keep and record.artifact:
            path = Path(record.artifact)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _register_once(
    study, best: TrialRecord, ranked: list[TrialRecord], records: list[TrialRecord], config: StudyConfig
) -> None:
    """Register the best trial as ``config.name`` unless another worker of the study already has.

    Every worker of a shared study ends here with the same best; the name's claim makes them take
    turns, and only a worker that holds the best trial's weights can register them.
    """

    with claim_name(config.name, wait=True):
        if config.name in load_catalog():
            logger.info("another worker of study '%s' registered its best trial already", config.name)
            return
        if not best.artifact or not Path(best.artifact).exists():
            logger.warning(
                "best trial %d of study '%s' was trained on another machine; it is registered there",
                best.number,
                config.name,
            )
            return
        _register_best(study, best, records, config)
        _prune_artifacts(ranked, records, config.keep_top_k)


def register_and_report(study, config: StudyConfig, records: list[TrialRecord]) -> TuningResult:
    """Plot the study, register its best completed trial as ``config.name`` and write ``trials.json``."""
    ranked = ranked_trials(records, config.direction)
    best = ranked[0]
    report_dir = Path(config.study_dir) / "report"
    plot_objective(records, config, report_dir / PLOT_FILE_NAME)
    _register_once(study, best, ranked, records, config)
    result = TuningResult(
        name=config.name,
        objective=config.objective,
        direction=config.direction,
        best=best,
        trials=records,
        study_dir=config.study_dir,
        plot_path=str(report_dir / PLOT_FILE_NAME),
        trials_path=str(report_dir / TRIALS_FILE_NAME),
    )
    atomic_write_text(report_dir / TRIALS_FILE_NAME, result.model_dump_json(indent=2) + "\n")
    return result
