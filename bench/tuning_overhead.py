"""What a ``txt2img tune`` trial costs beyond its training, as a ratio to that training, on tiny-sd.

A study of ``--trials`` trials runs in this process (``parallel`` 1, one torch thread) with
``--objective instance_loss`` and otherwise the command's defaults: JumpStart's ranges
(learning_rate 1e-7..3e-6 on a log scale, max_steps 50..400), every metric requested, no metric
weights on the machine. For each trial it prints:

- training: the trainer's own ``train_seconds`` (loading the base, the optimisation, saving);
- validation: the run's validation images, which ``train`` draws after that (its contact sheet,
  the trial's small grid for looking);
- evaluation: ``evaluate_pipeline`` (here: ``instance_loss`` only, since the image metrics are skipped);
- trial: Optuna's start-to-finish time of the trial (``FrozenTrial.duration``);
- overhead ratio: (trial - training) / training, the validation images counted as overhead.
  Target: at most 1.0. "tuner only" leaves out everything ``train`` does: (trial - train call) / training.

The baseline, measured in the same run, is what each trial spent before the image metrics were
planned: generating the DreamBooth paper's 25 prompts at 25 steps with the trial's model,
timed once on the registered best (scored with a stand-in extractor, since the cost is the
generation). The timings wrap library functions in this process; nothing in the library changes.

    OMP_NUM_THREADS=1 python bench/tuning_overhead.py [--trials 3] [--range max_steps=50:400 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import training.dreambooth
import training.evaluation
import training.tuning
from training.demo_dataset import write_demo_dataset
from training.evaluation import EvaluationSettings, evaluate_model
from training.tuning import DEFAULT_RANGES, SearchRange, StudyConfig, tune

REPO = Path(__file__).resolve().parents[1]


def timed(module, name: str, spent: list[float]) -> None:
    """Replace ``module.name`` with a wrapper that appends each call's wall time to ``spent``."""
    function = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            spent.append(time.monotonic() - started)

    setattr(module, name, wrapper)


class StandInFeatures:
    """Random features for the baseline's fid_score: its cost is the generation, not the network."""

    def embed_images(self, images) -> object:
        import numpy as np

        return np.random.default_rng(0).normal(size=(len(images), 8))


def baseline_seconds(model_id: str, data: Path, output: Path) -> tuple[float, int]:
    """Seconds and images of the old per-trial evaluation: the paper's prompts, generated whatever the metrics."""

    settings = EvaluationSettings(metrics=["fid_score"])
    started = time.monotonic()
    report = evaluate_model(
        model_id, data, settings, output_dir=output, feature_extractors={"inception": StandInFeatures()}, progress=False
    )
    return time.monotonic() - started, sum(len(job.images) for job in report.generations)


@dataclass
class PhaseTimes:
    """Wall times of each call, in call order: the trainer's ``train``, its validation images, the evaluation."""

    train_calls: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    evaluation: list[float] = field(default_factory=list)

    def instrument(self) -> None:
        timed(training.tuning, "train", self.train_calls)  # the name each trial calls
        timed(training.dreambooth, "generate_validation_images", self.validation)  # the name the trainer calls
        timed(training.evaluation, "evaluate_pipeline", self.evaluation)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--range", dest="ranges", action="append", default=[], metavar="KEY=LO:HI[:log]")
    return parser.parse_args()


def isolated_scratch() -> Path:
    """A scratch folder that is txt2img's home and the HF cache, and one torch thread."""
    sys.path.insert(0, str(REPO))
    scratch = Path(tempfile.mkdtemp(prefix="txt2img-tuning-bench-"))
    os.environ["TXT2IMG_HOME"] = str(scratch / "home")
    os.environ["HF_HUB_CACHE"] = str(scratch / "hf-cache")  # no CLIP or DINO weights from the user's cache
    import torch

    torch.set_num_threads(1)
    return scratch


def study_config(args: argparse.Namespace, data: Path, scratch: Path) -> StudyConfig:
    return StudyConfig(
        data_dir=str(data),
        base="tiny-sd",
        name="bench",
        trials=args.trials,
        objective="instance_loss",
        ranges=[SearchRange.parse(text) for text in args.ranges] or list(DEFAULT_RANGES),
        study_dir=str(scratch / "study"),
        prune=False,  # every trial runs to its end, so each has one training, validation and evaluation
        evaluation=EvaluationSettings(),
    )


def frozen_trials(study_dir: Path) -> dict:
    """Optuna's record of each trial of the study in ``study_dir``, by number."""
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log")))
    return {trial.number: trial for trial in optuna.load_study(study_name="bench", storage=storage).get_trials()}


def print_trials(result, frozen: dict, times: PhaseTimes, study_seconds: float) -> list[tuple[float, float]]:
    """Print each trial's row, the study's time and the ratios; returns each trial's (overhead, training) seconds."""
    print("trial  max_steps  training  validation  evaluation   trial  overhead ratio  tuner only")
    ratios, tuner_ratios, overheads = [], [], []
    for index, record in enumerate(result.trials):
        training_seconds = frozen[record.number].user_attrs["entry"]["metrics"]["train_seconds"]
        trial_seconds = frozen[record.number].duration.total_seconds()
        overheads.append((trial_seconds - training_seconds, training_seconds))
        ratios.append((trial_seconds - training_seconds) / training_seconds)
        tuner_ratios.append((trial_seconds - times.train_calls[index]) / training_seconds)
        print(
            f"{record.number:5d}  {record.params.get('max_steps', '-'):>9}  {training_seconds:7.1f}s"
            f"  {times.validation[index]:9.1f}s  {times.evaluation[index]:9.1f}s  {trial_seconds:5.1f}s"
            f"  {ratios[-1]:14.2f}  {tuner_ratios[-1]:10.2f}"
        )
    print(f"study: {study_seconds:.1f}s in all (registration and report included)")
    print(
        f"overhead ratio: max {max(ratios):.2f}, mean {sum(ratios) / len(ratios):.2f} (target <= 1.0); "
        f"tuner only: max {max(tuner_ratios):.2f}, mean {sum(tuner_ratios) / len(tuner_ratios):.2f}"
    )
    return overheads


def print_baseline(model_id: str, data: Path, output: Path, overheads: list[tuple[float, float]]) -> None:
    seconds, images = baseline_seconds(model_id, data, output)
    old = [(overhead + seconds) / training for overhead, training in overheads]
    print(
        f"baseline: evaluating on the paper's prompts ({images} images at 25 steps, model load included) "
        f"took {seconds:.1f}s; with it in every trial the overhead ratio would be max {max(old):.2f}, "
        f"mean {sum(old) / len(old):.2f}"
    )


def main() -> None:
    args = parse_arguments()
    scratch = isolated_scratch()
    import torch

    times = PhaseTimes()
    times.instrument()
    data = write_demo_dataset(scratch / "data")
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    result = tune(study_config(args, data, scratch), progress=False)
    study_seconds = time.monotonic() - started

    print(
        f"tiny-sd, objective instance_loss, {args.trials} trials, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after"
    )
    overheads = print_trials(result, frozen_trials(scratch / "study"), times, study_seconds)
    print_baseline(result.name, data, scratch / "baseline", overheads)


if __name__ == "__main__":
    main()
