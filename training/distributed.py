"""Data-parallel DreamBooth: ``txt2img train --processes N`` runs N copies of the trainer under
torchrun (``torch.distributed.run``), one per GPU (nccl backend) or CPU process (gloo).

Each worker runs ``training.dreambooth.train``, whose ``Accelerator`` joins the torchrun world:
every process holds the whole model (DistributedDataParallel, which averages the gradients while
the backward pass runs) and draws its own micro-batches of each optimizer step, so one step sees
``batch_size x processes x gradient_accumulation_steps`` examples. With ``sharding=fsdp`` (a full
fine-tune) each process holds a 1/N shard of the UNet and its optimizer state instead
(training/sharding.py); the batches and the loss are the same. Rank 0 alone
claims the name and writes checkpoints, images and the catalog entry. torchrun's agent
watches the processes: when one dies, it stops the others and this launcher reports why.

Run as a module, this file is the worker torchrun starts in each process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from catalog.paths import atomic_write_text
from training.dreambooth import TrainingInterrupted, train
from training.evaluation import EvaluationSettings, evaluate_entry, metric_lines
from training.hyperparameters import Hyperparameters
from training.servable import add_serving_code
from training.sharding import check_sharding
from txt2img.errors import InputError, Interrupted, Txt2ImgError
from txt2img.processes import die_with_parent

logger = logging.getLogger("txt2img.training")

# The key in a worker's error file (torchelastic's reply file) that marks an expected failure.
_EXIT_CODE_KEY = "txt2img_exit_code"
# How long torchrun's agent lets the workers finish their checkpoint after a Ctrl-C.
_SHUTDOWN_SECONDS = 600


# --- the launcher (the txt2img process) -------------------------------------------------------------


def launch_training(
    processes: int, data_dir: Path, base: str, name: str, hyperparameters: Any, *, resume: bool
) -> None:
    """Run ``train()`` in ``processes`` processes under torchrun on this machine; raise a
    Txt2ImgError saying what went wrong if any of them fails."""
    # Before torch loads: c10d's C++ warnings about the local rendezvous are noise for a user.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    import torch
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    check_sharding(hyperparameters, processes)  # here too, to refuse before any process starts
    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise InputError(
            f"--processes {processes} needs {processes} GPUs (one per process); this machine has "
            f"{torch.cuda.device_count()}"
        )
    payload = json.dumps(
        {
            "data_dir": str(Path(data_dir).expanduser().resolve()),
            "base": base,
            "name": name,
            "hyperparameters": hyperparameters.model_dump(mode="json"),
            "resume": resume,
            "launcher_pid": os.getpid(),  # the process the workers must not outlive
        }
    )
    # The workers run in sessions of their own, so a Ctrl-C reaches only this process: torchrun's
    # agent forwards it to them, and each saves a checkpoint after the same step. Saving a big model
    # can outlast the agent's default 30 s of patience before it kills them.
    arguments = torchrun.parse_args(
        ["--standalone", "--nnodes=1", f"--nproc-per-node={processes}", "--max-restarts=0"]
        + [f"--shutdown-timeout={_SHUTDOWN_SECONDS}", "--module", "training.distributed", payload]
    )
    # The agent's own log says the same as the one line below, at length. Its loggers set their own levels.
    for logger_name in list(logging.root.manager.loggerDict):
        if logger_name.startswith("torch.distributed"):
            logging.getLogger(logger_name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(arguments)
    except ChildFailedError as error:
        raise _explain(error.failures, processes) from None
    except SignalException as error:
        if error.sigval != signal.SIGINT:
            raise Txt2ImgError(
                f"stopped by {error.sigval.name}; continue with the same command plus --resume"
            ) from None
        raise Interrupted(
            "interrupted; the processes saved a checkpoint after their last step; "
            "continue with the same command plus --resume"
        ) from None


def _explain(failures: dict[int, Any], processes: int) -> Txt2ImgError:
    """The error that stopped the run: an expected one from a worker, a killed worker, or a crash."""
    for _, failure in sorted(failures.items()):
        data = failure.error_file_data
        if isinstance(data, dict) and _EXIT_CODE_KEY in data:
            kind = {InputError.exit_code: InputError, Interrupted.exit_code: Interrupted}.get(
                data[_EXIT_CODE_KEY], Txt2ImgError
            )
            return kind(data["message"])
    # The agent stops the survivors with SIGTERM, so a SIGTERM is the cause only when nothing else is.
    killed = [(rank, failure) for rank, failure in failures.items() if failure.exitcode < 0]
    killed.sort(key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[0]))
    crashed = sorted((item for item in failures.items() if item[1].exitcode > 0), key=lambda item: item[1].timestamp)
    if killed and (killed[0][1].exitcode != -signal.SIGTERM or not crashed):
        rank, failure = killed[0]
        return Txt2ImgError(
            f"training process {rank} of {processes} was killed ({failure.signal_name()}), so the run "
            "stopped; continue it with the same command plus --resume"
        )
    rank, failure = crashed[0]
    sys.stderr.write(f"{failure.message}\n")
    return Txt2ImgError(f"training process {rank} of {processes} failed (exit code {failure.exitcode}); see above")


# --- the worker (one per process, started by torchrun) ----------------------------------------------


def _record(message: str, exit_code: int | None = None) -> None:
    """Leave the failure in torchelastic's reply file, where the launcher reads it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data: dict[str, Any] = {"message": message, "timestamp": int(time.time())}
    if exit_code is not None:
        data[_EXIT_CODE_KEY] = exit_code
    # Atomically: the agent stops the other processes with SIGTERM, maybe mid-write, and reads the file.
    atomic_write_text(Path(path), json.dumps(data))


def _log_to_stderr(rank: int) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    # Rank 0 tells the story; the others only speak up when something is wrong.
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _print_metrics(entry, data_dir: Path, hyperparameters, evaluation: dict, output_dir: Path) -> None:
    """Evaluate the trained model as a local trial is evaluated and print ``name=value`` lines; a
    missing objective fails the job (SageMaker's tuner then counts it failed, not merely unscored)."""
    settings = EvaluationSettings.model_validate(evaluation)  # the weights from this machine's environment
    report = evaluate_entry(
        entry, data_dir, settings, hyperparameters=hyperparameters, output_dir=output_dir, progress=False
    )
    objective = settings.metrics[0]
    if report.metrics.get(objective) is None:
        raise Txt2ImgError(f"the objective {objective} was not computed: {report.skipped.get(objective)}")
    print("\n".join(metric_lines(report.metrics)), flush=True)


def _worker(payload: str) -> int:
    job = json.loads(payload)
    # torchrun starts each worker in a session of its own (so that a Ctrl-C reaches only the agent), which
    # also shields it from a kill -9 of the launcher's group. The torchrun CLI under SageMaker
    # (jumpstart/sagemaker_entry.py) is the parent it names no pid for.
    die_with_parent(job.get("launcher_pid") or os.getppid())
    rank = int(os.environ["RANK"])
    _log_to_stderr(rank)
    import torch.distributed as dist

    try:  # train() joins the process group through accelerate (nccl on GPUs, gloo on the CPU)
        hyperparameters = Hyperparameters.model_validate(job["hyperparameters"])
        entry = train(
            Path(job["data_dir"]),
            job["base"],
            job["name"],
            hyperparameters,
            resume=job["resume"],
            # Set by the SageMaker entry point (jumpstart/sagemaker_entry.py): /opt/ml/model, unregistered.
            output_dir=Path(job["output_dir"]) if job.get("output_dir") else None,
            register=job.get("register", True),
        )
        if rank == 0 and job.get("evaluation"):
            # A training job of a SageMaker tuning job: its objective is read from these lines.
            _print_metrics(
                entry, Path(job["data_dir"]), hyperparameters, job["evaluation"], Path(job["evaluation_dir"])
            )
        if rank == 0 and job.get("inference_code"):
            # A SageMaker job (jumpstart/sagemaker_entry.py): make its model.tar.gz deployable as it is.
            add_serving_code(entry, Path(job["output_dir"]), Path(job["inference_code"]))
    except TrainingInterrupted as error:
        _record(f"{error}; continue with the same command plus --resume", Interrupted.exit_code)
        return Interrupted.exit_code
    except Txt2ImgError as error:
        _record(str(error), error.exit_code)
        return error.exit_code
    except KeyboardInterrupt:
        message = "stopped at once by a second Ctrl-C; --resume continues from the last checkpoint"
        _record(message, Interrupted.exit_code)
        return Interrupted.exit_code
    except BaseException:
        # Printed by the launcher only if this is what stopped the run: when another process died,
        # this one's broken collective is a consequence, not news.
        import traceback

        _record(traceback.format_exc())
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and job.get("register", True):
        print(f"registered {entry.id} ({entry.method} fine-tune of {entry.base}) at {entry.artifact}", flush=True)
        print(f"try it: txt2img catalog show {entry.id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
