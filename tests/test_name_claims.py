"""A model name belongs to one run: claimed before any work, registered once, never overwritten.

Several processes race here for real (no mocks): registrations, `txt2img train` runs and
claims held by a process that is then killed.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalog.pipelines import export_model
from catalog.store import NameInUse, claim_name, load_catalog, validate_path
from training.demo_dataset import write_demo_dataset
from training.dreambooth import FINISHED_ENTRY, default_output_dir, train
from training.hyperparameters import Hyperparameters

REPO = Path(__file__).resolve().parents[1]

# Registers one tiny-sd fine-tune entry, exiting as the txt2img command would on a Txt2ImgError.
REGISTER = """
import sys
from catalog.schema import CatalogEntry
from catalog.store import write_entry
from txt2img.errors import Txt2ImgError

name, artifact = sys.argv[1], sys.argv[2]
entry = CatalogEntry(id=name, source="finetune", family="tiny", resolution=64, base="tiny-sd",
                     method="full", artifact=artifact)
try:
    write_entry(entry)
except Txt2ImgError as error:
    print(error, file=sys.stderr)
    raise SystemExit(error.exit_code)
"""

# REGISTER, but each process waits after write_entry has read the catalog until all of them have:
# every one has passed the "id already exists" check, so only the exclusive create can pick a winner.
REGISTER_PAST_THE_CHECK = (
    """
import os, sys, time
from pathlib import Path
import catalog.store

barrier, racers = Path(sys.argv[3]), int(sys.argv[4])
read_catalog = catalog.store.load_catalog

def load_catalog_then_wait(*args, **kwargs):
    catalog = read_catalog(*args, **kwargs)
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < racers and time.monotonic() < deadline:
        time.sleep(0.01)
    return catalog

catalog.store.load_catalog = load_catalog_then_wait
"""
    + REGISTER
)

# Holds a claim until killed; prints once it holds it.
HOLD_CLAIM = """
import sys, time
from catalog.store import claim_name

with claim_name(sys.argv[1]):
    print("claimed", flush=True)
    time.sleep(600)
"""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(home), "OMP_NUM_THREADS": "1"}


def _start(script: str, *args: str, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_twenty_concurrent_registrations_of_distinct_names_all_land(txt2img_home, tmp_path):
    processes = [
        _start(REGISTER, f"model-{index}", str(tmp_path / f"w{index}"), home=txt2img_home) for index in range(20)
    ]
    codes = [process.wait(timeout=120) for process in processes]

    assert codes == [0] * 20, [process.stderr.read() for process in processes]
    assert validate_path() == []
    assert {f"model-{index}" for index in range(20)} <= set(load_catalog().ids())


def test_twenty_concurrent_registrations_of_one_name_exactly_one_wins(txt2img_home, tmp_path):
    processes = [_start(REGISTER, "contested", str(tmp_path / f"w{index}"), home=txt2img_home) for index in range(20)]
    codes = [process.wait(timeout=120) for process in processes]

    assert sorted(codes) == [0] + [2] * 19
    winner = processes[codes.index(0)].args[-1]
    assert load_catalog().get("contested").artifact == winner
    losers = [process.stderr.read() for process, code in zip(processes, codes) if code]
    assert all("already exists" in message for message in losers), losers


def test_racing_registrations_all_past_the_existence_check_exactly_one_wins(txt2img_home, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    racers = 6
    processes = [
        _start(
            REGISTER_PAST_THE_CHECK, "raced", str(tmp_path / f"w{index}"), str(barrier), str(racers), home=txt2img_home
        )
        for index in range(racers)
    ]
    codes = [process.wait(timeout=180) for process in processes]

    assert len(list(barrier.iterdir())) == racers  # every process read the catalog before any wrote
    assert sorted(codes) == [0] + [2] * (racers - 1), [process.stderr.read() for process in processes]
    winner = processes[codes.index(0)].args[-3]
    assert load_catalog().get("raced").artifact == winner


def test_a_claim_refuses_a_second_process_and_dies_with_its_holder(txt2img_home):
    holder = _start(HOLD_CLAIM, "busy", home=txt2img_home)
    assert holder.stdout.readline().strip() == "claimed"

    with pytest.raises(NameInUse, match=rf"model 'busy' is being created by another run \(pid {holder.pid}\)"):
        with claim_name("busy"):
            pass

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with claim_name("busy"):  # the kernel released the killed holder's claim: nothing stale remains
        pass


def test_concurrent_train_runs_for_one_name_one_wins_the_rest_exit_2(txt2img_home, tmp_path):
    data = write_demo_dataset(tmp_path / "data")
    rates = ["1e-3", "2e-3", "3e-3"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "txt2img", "train", str(data), "--base", "tiny-sd", "--name", "dup"]
            + ["--hp", "max_steps=4", "--hp", f"learning_rate={rate}"],
            env=_env(txt2img_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rate in rates
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    codes = [process.returncode for process in processes]

    assert sorted(codes) == [0, 2, 2], outputs
    for (_, stderr), code in zip(outputs, codes):
        if code:
            assert stderr.count("\n") == 1 and stderr.startswith("txt2img: error: "), stderr
            assert "being created by another run" in stderr or "already exists" in stderr, stderr
    # The registered entry describes the winner's run, and so does the model folder's own record.
    entry = load_catalog().get("dup")
    assert entry.hyperparameters["learning_rate"] == float(rates[codes.index(0)])
    recorded = yaml.safe_load((default_output_dir("dup") / FINISHED_ENTRY).read_text())
    assert recorded["hyperparameters"] == entry.hyperparameters


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_registers_a_run_killed_between_saving_and_registering(txt2img_home, tmp_path, run_cli):
    data = write_demo_dataset(tmp_path / "data")
    hp = Hyperparameters(max_steps=3, learning_rate=1e-3)
    # register=False leaves exactly what a kill after the save leaves: the model and its entry, unregistered.
    unregistered = train(
        data, "tiny-sd", "saved", hp, output_dir=default_output_dir("saved"), progress=False, register=False
    )
    weights = sorted((default_output_dir("saved") / "model").rglob("*.safetensors"))
    before = {path: path.stat().st_mtime_ns for path in weights}

    result = run_cli("train", str(data), "--base", "tiny-sd", "--name", "saved", "--hp", "max_steps=3", "--resume")

    assert result.returncode == 0, result.stderr
    assert "registered saved" in result.stdout
    assert "resuming from" not in result.stderr and "starting from step 0" not in result.stderr
    assert {path: path.stat().st_mtime_ns for path in weights} == before  # registered, not trained again
    assert load_catalog().get("saved").metrics == unregistered.metrics


@pytest.mark.usefixtures("one_torch_thread")
def test_trained_and_exported_models_follow_the_umask(txt2img_home, tmp_path):
    data = write_demo_dataset(tmp_path / "data")
    previous = os.umask(0o022)
    try:
        entry = train(data, "tiny-sd", "perms", Hyperparameters(max_steps=2), progress=False)
        exported = export_model("perms", tmp_path / "exported", load_catalog())
    finally:
        os.umask(previous)

    for folder in (Path(entry.artifact), exported):
        modes = {stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.rglob("*")] if path.is_dir()}
        assert modes == {0o755}, (folder, modes)
        weights = list(folder.rglob("*.safetensors"))
        assert weights and {stat.S_IMODE(path.stat().st_mode) for path in weights} == {0o644}, folder
