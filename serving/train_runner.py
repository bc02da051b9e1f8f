"""Each worker's training runner: claims queued training jobs (``POST /jobs/train``) from the job store and
runs each as the real trainer, ``txt2img train``, in a child process: the CLI's code, name claim and
catalog registration.

* At most TXT2IMG_MAX_TRAININGS trainings run at once on the whole server (the claim counts the running
  ones of every worker in the same transaction); the others stay queued.
* The child dies with its worker (``PR_SET_PDEATHSIG``, as serving workers die with their server); a
  worker that died leaves its job running in the store, the sweeper queues it again, and it continues
  from its last checkpoint (``--resume``), as any job of a killed worker runs again.
* Progress is the run's own per-step log (training/step_log.py), read as it grows.
* A cancel sends the child SIGTERM once its training loop runs: the trainer saves a checkpoint and exits
  (130), and the job is canceled; ``POST /jobs/{id}/resume`` queues it again, to ``txt2img train --resume``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from serving.engine import Engine
from serving.jobs import JobStore, StoredJob
from serving.jobs_runner import JobRunner
from training.dreambooth import RUN_HYPERPARAMETERS, default_output_dir
from training.step_log import read_step_log
from txt2img.errors import EXIT_INTERRUPTED, Txt2ImgError
from txt2img.processes import kill_when_parent_dies

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often a running training's progress is recorded and its cancel read
TRAINING_LOG = "train.log"  # the child's stdout and stderr, in the job's folder


class NoRoomToTrain(Txt2ImgError):
    """The GPU cannot hold a training beside the models this server has loaded."""

    http_status = 503


def training_room_problem(engine: Engine) -> str | None:
    """Why a training cannot run beside this worker's loaded models now; None when it can (always on CPU)."""
    device = engine.manager.device
    if not str(device).startswith("cuda"):
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    needed = engine.settings.train_gpu_bytes
    if free >= needed:
        return None
    return (
        f"the GPU has {free / 2**30:.1f} GiB free beside the loaded models, and a training needs "
        f"TXT2IMG_TRAIN_GPU_BYTES ({needed / 2**30:.1f} GiB); unload models (TXT2IMG_MAX_LOADED_MODELS) or try later"
    )


def training_command(job: StoredJob) -> list[str]:
    """``txt2img train`` for ``job``, with ``--resume`` when its run has begun (a resume, or a rerun)."""
    request = job.request
    command = [sys.executable, "-m", "txt2img", "train", request["data_dir"], "--base", request["base"]]
    command += ["--name", request["name"], "--method", request["method"]]
    for pair in request["hyperparameters"]:
        command += ["--hp", pair]
    if (default_output_dir(request["name"]) / RUN_HYPERPARAMETERS).is_file():
        command.append("--resume")
    return command


@dataclass
class _Training:
    job: StoredJob
    process: subprocess.Popen
    stopping: bool = False


class TrainingRunner:
    """The thread of one worker that runs training jobs, one child process at a time."""

    def __init__(self, engine: Engine, jobs: JobRunner) -> None:
        self.engine = engine
        self.jobs = jobs  # its store, and its webhooks: a training job's events go out as any job's
        self.store: JobStore = jobs.store
        self._current: _Training | None = None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="txt2img-training", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        # PR_SET_PDEATHSIG fires when the thread that started the child ends: this one lives as long as the worker.
        while True:
            try:
                if self._current is None:
                    self._claim()
                else:
                    self._follow()
            except Exception:  # a broken database must not end the worker's trainings for good
                logger.exception("training runner step failed")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _claim(self) -> None:
        if training_room_problem(self.engine) is not None:
            return  # it stays queued until the GPU has room
        job = self.store.claim(os.getpid(), kind="train", at_most_running=self.engine.settings.max_trainings)
        if job is None:
            return
        folder = self.store.images / job.id
        with open(folder / TRAINING_LOG, "ab") as log:
            process = subprocess.Popen(
                training_command(job),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=folder,
                preexec_fn=kill_when_parent_dies(os.getpid()),
            )
        self._current = _Training(job, process)
        self.jobs.notify(job, "started")

    def _follow(self) -> None:
        training = self._current
        steps = read_step_log(default_output_dir(training.job.request["name"]))
        step = steps[-1]["step"] if steps else 0
        canceled = training.job.id in self.store.progress({training.job.id: step})
        # Before its loop runs the trainer has no checkpoint to save; the signal waits for its first step.
        if canceled and steps and not training.stopping:
            training.process.send_signal(signal.SIGTERM)
            training.stopping = True
        if training.process.poll() is not None:
            self._current = None
            self._finish(training, canceled)

    def _finish(self, training: _Training, canceled: bool) -> None:
        job, returncode = training.job, training.process.returncode
        if returncode == 0:
            self.engine.manager.refresh_catalog()
            finished, event = self.store.succeed(job, []), "succeeded"
        elif returncode == EXIT_INTERRUPTED and canceled:
            finished, event = self.store.mark_canceled(job.id), "canceled"
        else:
            finished, event = self.store.fail(job.id, self._last_line(job)), "failed"
        if finished is not None:
            self.jobs.notify(finished, event)

    def _last_line(self, job: StoredJob) -> str:
        """The trainer's last words: its one-line error, as the CLI prints it."""
        with contextlib.suppress(OSError):
            lines = (self.store.images / job.id / TRAINING_LOG).read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1][-1000:]
        return "the trainer ended without a word"
