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
from catalog.schema import CatalogEntry
from catalog.store import NameInUse, claim_name, load_catalog, validate_path, write_entry
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

    resume = ("train", str(data), "--base", "tiny-sd", "--name", "saved", "--resume", "--hp", "max_steps=3")

    # --resume continues the run as it was started: other values (here learning_rate left at its
    # default, and more steps) are refused, each named, and nothing is registered.
    changed = run_cli(*resume[:-1], "max_steps=4")
    assert changed.returncode == 2, changed.stderr
    assert changed.stderr == (
        "txt2img: error: cannot resume 'saved' with other hyperparameters than its run: "
        "learning_rate 0.001 (the run's) vs 2e-06 (given), max_steps 3 (the run's) vs 4 (given); "
        "pass the run's values, or train under another --name\n"
    )
    assert "saved" not in load_catalog()

    result = run_cli(*resume, "--hp", "learning_rate=1e-3")

    assert result.returncode == 0, result.stderr
    assert "registered saved" in result.stdout
    assert "resuming from" not in result.stderr and "starting from step 0" not in result.stderr
    assert {path: path.stat().st_mtime_ns for path in weights} == before  # registered, not trained again
    assert load_catalog().get("saved").metrics == unregistered.metrics


@pytest.mark.usefixtures("one_torch_thread")
def test_catalog_remove_frees_the_name_and_its_run_folder(txt2img_home, tmp_path, run_cli):
    data = write_demo_dataset(tmp_path / "data")
    train_reused = ("train", str(data), "--base", "tiny-sd", "--name", "reused", "--hp", "max_steps=1")
    run_cli(*train_reused, check_rc=0)
    run_folder = default_output_dir("reused")
    claim = txt2img_home / "catalog" / ".reused.claim"
    assert run_folder.is_dir() and claim.is_file()

    refused = run_cli("catalog", "remove", "reused")  # no terminal to ask on, and no --yes
    assert refused.returncode == 2
    assert refused.stderr == (
        "txt2img: error: catalog remove deletes reused and its folders; pass --yes to confirm without a terminal\n"
    )
    assert "reused" in load_catalog() and run_folder.is_dir()

    removed = run_cli("catalog", "remove", "reused", "--yes", check_rc=0)
    assert removed.stdout == f"removed reused and deleted {run_folder}\n"
    assert "reused" not in load_catalog() and not run_folder.exists() and not claim.exists()

    run_cli(*train_reused, check_rc=0)  # the name is free again
    assert load_catalog().get("reused").hyperparameters["max_steps"] == 1


def test_catalog_remove_deletes_a_tuned_models_study_folder_only_in_its_default_place(txt2img_home, run_cli):
    run_folder, study = txt2img_home / "models" / "tuned", txt2img_home / "studies" / "tuned"
    for folder in (run_folder / "model", study, txt2img_home / "elsewhere"):
        folder.mkdir(parents=True)
    for name, storage in (("tuned", study / "journal.log"), ("other", txt2img_home / "elsewhere" / "journal.log")):
        storage.touch()
        write_entry(
            CatalogEntry(
                id=name,
                source="finetune",
                family="tiny",
                resolution=64,
                base="tiny-sd",
                method="full",
                artifact=str(run_folder / "model") if name == "tuned" else "/w",
                tuning={"study": name, "storage": str(storage)},
            )
        )

    removed = run_cli("catalog", "remove", "tuned", "--yes", check_rc=0)
    assert removed.stdout == f"removed tuned and deleted {run_folder}, {study}\n"
    assert not run_folder.exists() and not study.exists()
    run_cli("catalog", "remove", "other", "--yes", check_rc=0)
    assert (txt2img_home / "elsewhere" / "journal.log").is_file()  # a study in another place is the user's


def test_catalog_remove_refuses_a_name_a_run_holds(txt2img_home, tmp_path, run_cli):
    entry = CatalogEntry(
        id="held", source="finetune", family="tiny", resolution=64, base="tiny-sd", method="full", artifact="/w"
    )
    write_entry(entry)
    holder = _start(HOLD_CLAIM, "held", home=txt2img_home)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        refused = run_cli("catalog", "remove", "held", "--yes")
    finally:
        holder.kill()
        holder.wait(timeout=30)

    assert refused.returncode == 2
    assert refused.stderr.startswith("txt2img: error: model 'held' is being created by another run")
    assert load_catalog().get("held") == entry


def _remove_on_a_terminal(model_id: str, answer: str, home: Path) -> subprocess.CompletedProcess:
    """``catalog remove`` with a terminal as its input, on which ``answer`` is typed."""
    controller, terminal = os.openpty()
    try:
        os.write(controller, f"{answer}\n".encode())
        return subprocess.run(
            [sys.executable, "-m", "txt2img", "catalog", "remove", model_id],
            stdin=terminal,
            capture_output=True,
            text=True,
            env=_env(home),
            timeout=120,
        )
    finally:
        os.close(terminal)
        os.close(controller)


def test_catalog_remove_asks_on_a_terminal(txt2img_home, tmp_path):
    entry = CatalogEntry(
        id="asked", source="finetune", family="tiny", resolution=64, base="tiny-sd", method="full", artifact="/w"
    )
    write_entry(entry)

    kept = _remove_on_a_terminal("asked", "n", txt2img_home)
    assert kept.stdout.startswith("Remove asked from the catalog? [y/N]: "), kept.stdout
    assert kept.returncode == 130 and load_catalog().get("asked") == entry

    removed = _remove_on_a_terminal("asked", "y", txt2img_home)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.endswith("removed asked; its weights remain at /w\n")
    assert "asked" not in load_catalog()


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
