"""`txt2img tune --parallel N` runs N trials at once, and exactly ``--trials`` of them in all.

test_tuning.py checks that parallel workers lose no trial; a study that ran its trials one at a
time would pass that too. Here each trial's interval (asked, told) comes from the study's
storage: with ``--parallel 2`` two of them must overlap, and never more than two.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from subject_dataset import write_dataset

from txt2img.cli import app

# Tiny trials: 1-2 optimisation steps, one validation prompt, the objective without image metrics.
TINY_TRIAL = [
    "--range",
    "learning_rate=1e-5:1e-3:log",
    "--range",
    "max_steps=1:2",
    "--hp",
    "validation_prompts=a toy",
    "--objective",
    "instance_loss",
    "--prompts-per-subject",
    "1",
    "--steps",
    "1",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_local_metric_weights")


def most_at_once(intervals: list[tuple]) -> int:
    """The largest number of intervals that hold one instant in common."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:  # at a tie the end (-1) sorts first: touching intervals do not overlap
        running += change
        most = max(most, running)
    return most


def test_parallel_trials_overlap_and_their_count_is_exact(tmp_path, txt2img_home):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    data = write_dataset(tmp_path / "data")
    arguments = ["tune", str(data), "--base", "tiny-sd", "--name", "overlap", "--trials", "3", "--parallel", "2"]
    result = CliRunner().invoke(app, [*arguments, *TINY_TRIAL])
    assert result.exit_code == 0, result.output

    journal = JournalFileBackend(str(txt2img_home / "studies" / "overlap" / "journal.log"))
    trials = optuna.load_study(study_name="overlap", storage=JournalStorage(journal)).get_trials(deepcopy=False)
    assert [trial.number for trial in trials] == [0, 1, 2]
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(trial.state in finished for trial in trials), [trial.state for trial in trials]
    intervals = [(trial.datetime_start, trial.datetime_complete) for trial in trials]
    assert most_at_once(intervals) == 2, intervals
