"""Waiting for SageMaker: one loop for training jobs, tuning jobs, endpoints and async answers.

Each of them is a describe call whose answer holds a status; ``wait_for`` calls it until the
status is final, shows the progress on stderr, and turns a failure, a timeout or Ctrl-C into one
line that says what happened and what keeps running on AWS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from jumpstart.errors import SageMakerError, aws_errors
from txt2img.errors import Interrupted


class WaitFailed(SageMakerError):
    """What was waited for ended in a failed state; ``reason`` is SageMaker's FailureReason."""

    def __init__(self, what: str, status: str, reason: str):
        super().__init__(f"{what} ended {status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Waiting:
    """How to read one kind of describe answer."""

    status_key: str  # e.g. "TrainingJobStatus"
    succeeded: Collection[str]
    failed: Collection[str]
    # The progress text for one answer; by default its status.
    progress: Callable[[dict], str] | None = None


TRAINING_JOB = Waiting(
    "TrainingJobStatus",
    succeeded=("Completed",),
    failed=("Failed", "Stopped"),
    progress=lambda job: job.get("SecondaryStatus") or job["TrainingJobStatus"],
)
TUNING_JOB = Waiting(
    "HyperParameterTuningJobStatus",
    succeeded=("Completed",),
    failed=("Failed", "Stopped", "DeleteFailed"),
    progress=lambda job: (
        ", ".join(f"{count} {state}" for state, count in job.get("TrainingJobStatusCounters", {}).items() if count)
        or job["HyperParameterTuningJobStatus"]
    ),
)
ENDPOINT = Waiting(
    "EndpointStatus",
    succeeded=("InService",),
    failed=("Failed", "OutOfService"),
    progress=lambda endpoint: f"{endpoint['EndpointStatus']} (usually 5-15 min)",
)

# An async invocation's answer, read from S3 by jumpstart.endpoints in this shape.
ASYNC_ANSWER = Waiting("Status", succeeded=("Completed",), failed=("Failed",))


def wait_for(
    what: str,
    describe: Callable[[], dict],
    waiting: Waiting,
    *,
    poll_seconds: float,
    timeout_seconds: float | None = None,
    still_running: str = "",
) -> dict:
    """Call ``describe()`` every ``poll_seconds`` until its status is final; return the last answer.

    ``what`` names the thing in messages ("training job dog-2024..."), ``still_running`` is what
    the user can do when we stop waiting but AWS goes on (after a timeout or Ctrl-C).
    Raises WaitFailed for a failed state, SageMakerError on timeout, Interrupted on Ctrl-C.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    after = f"; {still_running}" if still_running else ""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
            task = progress.add_task(f"{what}: starting", total=None)
            while True:
                with aws_errors(f"waiting for {what}"):
                    description = describe()
                status = description[waiting.status_key]
                shown = waiting.progress(description) if waiting.progress else status
                progress.update(task, description=f"{what}: {shown}")
                if status in waiting.succeeded:
                    return description
                if status in waiting.failed:
                    raise WaitFailed(what, status, description.get("FailureReason") or "no reason given")
                if deadline is not None and time.monotonic() >= deadline:
                    raise SageMakerError(f"{what} is still {status} after {timeout_seconds:.0f} s{after}")
                time.sleep(poll_seconds)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped waiting for {what}; it carries on in AWS{after}") from None
