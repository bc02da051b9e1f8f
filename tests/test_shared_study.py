"""Two ``txt2img tune`` processes sharing one study through a real PostgreSQL server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog.store import load_catalog
from training.demo_dataset import write_demo_dataset
from training.tuning_report import SURPLUS_ATTRIBUTE

REPO = Path(__file__).resolve().parents[1]
# Tiny trials: 1-3 optimisation steps, each evaluated on one prompt at one inference step.
TINY_TRIALS = [
    "--range",
    "learning_rate=1e-5:1e-3:log",
    "--range",
    "max_steps=1:3",
    "--hp",
    "validation_prompts=a toy",
    "--objective",
    "instance_loss",
    "--prompts-per-subject",
    "1",
    "--steps",
    "1",
    "--no-prune",
]

pytestmark = pytest.mark.usefixtures("no_local_metric_weights")


def test_two_tune_processes_share_one_study_on_postgresql(tmp_path, txt2img_home, postgresql_url):
    import optuna

    data = write_demo_dataset(tmp_path / "data")
    command = [sys.executable, "-m", "txt2img", "tune", str(data), "--base", "tiny-sd", "--name", "shared"]
    command += ["--trials", "4", "--storage", postgresql_url, *TINY_TRIALS]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(txt2img_home), "OMP_NUM_THREADS": "1"}

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*command, *extra], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    first = start()
    deadline = time.monotonic() + 120
    while "shared" not in optuna.get_all_study_names(postgresql_url):  # the first process has created it
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the study was never created"
        time.sleep(0.1)
    second = start("--resume")  # the same study, joined from another process
    outputs = [process.communicate(timeout=400) for process in (first, second)]

    asked = optuna.load_study(study_name="shared", storage=postgresql_url).get_trials()
    # A trial asked by both processes at once stands down unrun; every other one counts.
    trials = [trial for trial in asked if not trial.user_attrs.get(SURPLUS_ATTRIBUTE)]
    # The asked number in total: none lost (all finished), none run twice (one folder per number).
    assert len(trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    folders = sorted(path.name for path in (txt2img_home / "studies" / "shared" / "trials").iterdir())
    assert folders == [f"{trial.number:04d}" for trial in sorted(trials, key=lambda trial: trial.number)]
    # Registered once, as the best of all four trials, whichever process ran it; both processes succeed.
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert [path.name for path in (txt2img_home / "catalog").glob("*.yaml")] == ["shared.yaml"]
    entry = load_catalog().get("shared")
    best = min(trials, key=lambda trial: trial.value)
    assert entry.tuning["best_trial"] == best.number and len(entry.tuning["trials"]) == 4
    assert entry.metrics["instance_loss"] == pytest.approx(best.value)
