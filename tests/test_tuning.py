"""`txt2img tune` on tiny-sd: search ranges, a full study, parallel workers, a killed study resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from subject_dataset import write_dataset
from tiny_metric_networks import tiny_inception

from training.tuning import DEFAULT_RANGES, SearchRange, StudyConfig, TuningError, _ask, _prepare_study
from txt2img.cli import app

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tiny trials: 1-3 optimisation steps, a checkpoint (and so a pruning report) every step, one
# validation prompt, and each evaluation on 2 of the paper's prompts at 1 inference step.
TINY_TRIAL = [
    "--range",
    "learning_rate=1e-5:1e-3:log",
    "--range",
    "max_steps=1:3",
    "--hp",
    "checkpointing_steps=1",
    "--hp",
    "validation_prompts=a toy",
    "--objective",
    "instance_loss",
    "--prompts-per-subject",
    "2",
    "--steps",
    "1",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_local_metric_weights")


def study_trials(study_dir: Path, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


# --- search ranges --------------------------------------------------------------------------------


def test_range_parsing():
    assert SearchRange.parse("learning_rate=1e-6:1e-4:log") == SearchRange(
        name="learning_rate", low=1e-6, high=1e-4, log=True, integer=False
    )
    assert SearchRange.parse("max_steps=10:20").integer
    assert SearchRange.parse("prior_loss_weight=0:2") == SearchRange(name="prior_loss_weight", low=0, high=2)
    assert [r.name for r in DEFAULT_RANGES] == ["learning_rate", "max_steps"]
    assert (DEFAULT_RANGES[0].low, DEFAULT_RANGES[0].high, DEFAULT_RANGES[1].low, DEFAULT_RANGES[1].high) == (
        1e-7,
        3e-6,
        50,
        400,
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rat=1e-6:1e-4", "did you mean 'learning_rate'"),
        ("lr_scheduler=1:2", "not numeric"),
        ("learning_rate=1e-4:1e-6", "lo must be below hi"),
        ("prior_loss_weight=0:2:log", "lo > 0"),
        ("max_steps=0:10", "not a valid value"),
        ("max_steps=1.5:10", "integer"),
        ("learning_rate=1e-6", "expected key=lo:hi"),
    ],
)
def test_bad_ranges_are_refused(text, message):
    with pytest.raises(TuningError, match=message):
        SearchRange.parse(text)


def test_tune_refuses_bad_input_before_training(tmp_path):
    data = write_dataset(tmp_path / "data")
    runner = CliRunner()
    base = ["tune", str(data), "--base", "tiny-sd", "--name", "tuned", "--trials", "2"]
    # The default objective is fid_score, and no Inception weights are on this machine.
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "fid_score cannot be computed" in result.output, result.output
    assert "TXT2IMG_INCEPTION_PATH" in result.output
    for extra, message in [
        (["--range", "max_steps=1:3", "--hp", "max_steps=2"], "more than once"),
        (["--objective", "sharpness"], "unknown objective"),
        (["--hp", "learning_rate=-1", "--objective", "instance_loss"], "--hp"),
        (["--objective", "instance_loss", "--resume"], "no study 'tuned'"),
        (["--objective", "instance_loss", "--storage", "nosuch://db"], "cannot open storage nosuch://db"),
    ]:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output


@pytest.mark.parametrize("command, extra", [("train", []), ("tune", ["--trials", "1"])])
def test_a_bad_hp_is_one_line_naming_it_in_train_and_tune(tmp_path, command, extra, capsys):
    from txt2img.cli import main

    data = write_dataset(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(data), "--base", "tiny-sd", "--name", "x", *extra, "--hp", "batch_size=0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "txt2img: error: --hp batch_size: Input should be greater than or equal to 1\n"


STUDY_KEPT_BY_SAGEMAKER = "SageMaker Automatic Model Tuning keeps the study"
JUMPSTART_EVALUATES = "JumpStart's script evaluates on its own (--trainer txt2img evaluates as a local trial)"


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        (["--resume"], STUDY_KEPT_BY_SAGEMAKER),
        (["--storage", "sqlite:///x.db"], STUDY_KEPT_BY_SAGEMAKER),
        (["--study-dir", "studies"], STUDY_KEPT_BY_SAGEMAKER),
        (["--keep-top-k", "1"], STUDY_KEPT_BY_SAGEMAKER),  # given, even with the default value
        (["--no-prune"], STUDY_KEPT_BY_SAGEMAKER),
        (["--seed", "0"], JUMPSTART_EVALUATES),
        (["--prompts", "prompts.txt"], JUMPSTART_EVALUATES),
        (["--steps", "25"], JUMPSTART_EVALUATES),
        (["--metric", "dino"], JUMPSTART_EVALUATES),
        (["--inception-path", "inception.pt"], JUMPSTART_EVALUATES),
    ],
)
def test_tune_remote_refuses_local_only_options(option, reason, capsys):
    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "s3://bucket/dogs/", "--base", "tiny-sd", "--name", "x", "--remote", *option])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"txt2img: error: {option[0]} is for local runs; {reason}\n"


def test_train_remote_refuses_resume_through_the_same_check(capsys):
    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "s3://bucket/dogs/", "--base", "tiny-sd", "--name", "x", "--remote", "--resume"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "txt2img: error: --resume is for local runs; a SageMaker job runs to completion on its own\n"
    )


# --- studies ----------------------------------------------------------------------------------------


def test_a_resumed_or_shared_study_never_repeats_a_configuration(tmp_path):
    """Each trial draws from the seed and its own number, so a study reopened by --resume, or by a
    second process on the same storage, continues the search instead of starting it over."""
    config = StudyConfig(
        data_dir=str(tmp_path), base="tiny-sd", name="again", trials=8, study_dir=str(tmp_path / "study")
    )
    first = _prepare_study(config, resume=False)
    for value in (3.0, 2.0, 1.0):
        first.tell(_ask(first, config), value)
    resumed = _prepare_study(config, resume=True)
    joined = _prepare_study(config, resume=True)  # another tune process sharing the study
    for study in (resumed, joined, resumed, joined):
        study.tell(_ask(study, config), 1.5)

    trials = resumed.get_trials(deepcopy=False)
    assert [trial.number for trial in trials] == list(range(7))
    configurations = [tuple(sorted(trial.params.items())) for trial in trials]
    assert len(set(configurations)) == len(configurations), configurations


def test_parallel_workers_on_the_journal_lose_no_trial(tmp_path, txt2img_home):
    import optuna

    data = write_dataset(tmp_path / "data")
    result = CliRunner().invoke(
        app, ["tune", str(data), "--base", "tiny-sd", "--name", "para", "--trials", "3", "--parallel", "2", *TINY_TRIAL]
    )
    assert result.exit_code == 0, result.output
    trials = study_trials(txt2img_home / "studies" / "para", "para")
    assert [t.number for t in trials] == [0, 1, 2]
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in trials), [t.state for t in trials]
    # Each worker process wrote its checkpoint losses (for the pruner) and results to the journal.
    assert all(t.intermediate_values for t in trials)
    assert all("metrics" in t.user_attrs for t in trials if t.state == optuna.trial.TrialState.COMPLETE)


def kill_during_the_second_trial(command: list[str], study_dir: Path) -> None:
    """Run ``txt2img`` ``command`` in a process and SIGKILL it once trial 0 is done and trial 1 has begun."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "txt2img", *command],
        env=environment,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if (study_dir / "trials" / "0001").is_dir():
                break
            time.sleep(0.2)
        assert process.poll() is None, "the study ended before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def assert_best_is_registered_alone(catalog, best, trials: list, home: Path) -> None:
    """The best trial is the catalog entry ``tuned``, with the study's record; no trial is registered."""
    entry = catalog.get("tuned")
    assert entry.source == "finetune" and entry.base == "tiny-sd" and "tuned" in entry.tags
    assert entry.tuning["best_trial"] == best.number and entry.tuning["objective"] == "instance_loss"
    assert [t["number"] for t in entry.tuning["trials"]] == [t.number for t in trials]
    assert next(t for t in entry.tuning["trials"] if t["number"] == best.number)["params"] == best.params
    assert entry.metrics["instance_loss"] == pytest.approx(best.value)
    assert entry.hyperparameters["max_steps"] == best.params["max_steps"]
    assert Path(entry.artifact) == home / "models" / "tuned" / "model"
    assert not any(name.startswith("tuned-trial") for name in catalog.ids())


def test_a_killed_study_resumes_and_registers_a_servable_best(tmp_path, txt2img_home):
    """Three instance_loss trials; the process is killed during the second, and --resume finishes the study."""
    import optuna

    from catalog.pipelines import load_pipeline
    from catalog.store import load_catalog

    data = write_dataset(tmp_path / "data")
    study_dir = txt2img_home / "studies" / "tuned"
    command = ["tune", str(data), "--base", "tiny-sd", "--name", "tuned", "--trials", "3", "--no-prune", *TINY_TRIAL]
    kill_during_the_second_trial(command, study_dir)
    before = study_trials(study_dir, "tuned")
    assert [t.state for t in before] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]

    result = CliRunner().invoke(app, command + ["--resume"])
    assert result.exit_code == 0, result.output
    assert "instance_loss=" in result.output
    assert result.stderr.startswith(
        "each trial: skipping fid_score, clip_i, clip_t, dino: weights not on this machine; "
        "no image metric can run, so no image is generated\n"
    )
    trials = study_trials(study_dir, "tuned")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(complete) == 3
    # The interrupted trial was failed and its parameters run again.
    assert [t.number for t in failed] == [1]
    retry = next(t for t in complete if t.user_attrs.get("retry_of") == 1)
    assert retry.params == failed[0].params
    # Apart from that retry, each trial has its own configuration: the resumed sampler went on.
    fresh = [tuple(sorted(t.params.items())) for t in trials if "retry_of" not in t.user_attrs]
    assert len(set(fresh)) == len(fresh) == 3, fresh
    best = min(complete, key=lambda t: t.value)
    catalog = load_catalog()
    assert_best_is_registered_alone(catalog, best, trials, txt2img_home)

    # Only the best's weights survive (in the models folder); every trial keeps its contact sheet
    # of validation images. No image metric has weights here, so no evaluation image was made.
    for trial in complete:
        folder = study_dir / "trials" / f"{trial.number:04d}"
        assert not (folder / "run" / "model").exists()
        assert trial.user_attrs["grid"] == str(folder / "run" / "contact_sheet.png")
        assert (folder / "run" / "contact_sheet.png").is_file()
        assert len(list((folder / "run" / "validation").iterdir())) == 1  # the one validation prompt
        assert sorted(path.name for path in (folder / "evaluation").iterdir()) == ["metrics.json"]
        assert set(trial.user_attrs["metrics"]) == {"instance_loss", "fid_score", "clip_i", "clip_t", "dino"}
    report = json.loads((study_dir / "report" / "trials.json").read_text())
    assert report["best"]["number"] == best.number and len(report["trials"]) == 4
    assert (study_dir / "report" / "objective.png").stat().st_size > 1000

    pipeline = load_pipeline(catalog.get("tuned"), catalog)
    image = pipeline("a sks toy", num_inference_steps=1, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_a_study_on_an_rdb_url_generates_images_only_for_the_metric_that_can_run(tmp_path, txt2img_home):
    """Inception weights are present, CLIP and DINO are not: each trial generates its 2 prompts' images
    once, for fid_score, after its objective; clip_i, clip_t and dino are skipped without images."""
    import optuna
    import torch

    from catalog.store import load_catalog

    data = write_dataset(tmp_path / "data")
    inception_file = tmp_path / "inception.pt"
    torch.jit.script(tiny_inception()).save(str(inception_file))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    command = ["tune", str(data), "--base", "tiny-sd", "--name", "on-rdb", "--trials", "1", "--storage", url]
    result = CliRunner().invoke(app, [*command, *TINY_TRIAL, "--inception-path", str(inception_file)])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="on-rdb", storage=url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    metrics = trials[0].user_attrs["metrics"]
    assert list(metrics)[0] == "instance_loss" and metrics["fid_score"] is not None
    assert metrics["clip_i"] is None and metrics["dino"] is None
    images = txt2img_home / "studies" / "on-rdb" / "trials" / "0000" / "evaluation" / "images"
    assert len(list(images.iterdir())) == 2  # --prompts-per-subject 2, one image each
    assert not (txt2img_home / "studies" / "on-rdb" / "journal.log").exists()
    assert load_catalog().get("on-rdb").tuning["storage"] == url
