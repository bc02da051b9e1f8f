"""jumpstart.polling: the one wait loop for training jobs, tuning jobs, endpoints and async answers,
and what the commands built on it do when a job fails, times out or is interrupted."""

from __future__ import annotations

import pytest
from aws_fixtures import FIXTURE_MODEL, ROLE

from jumpstart.errors import SageMakerError
from jumpstart.polling import ENDPOINT, TRAINING_JOB, WaitFailed, Waiting, wait_for
from txt2img.errors import Interrupted

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")

JOB = Waiting("Status", succeeded=("Completed",), failed=("Failed", "Stopped"))


def _answers(*statuses: str, reason: str | None = None):
    """A describe call answering each status in turn, then the last one forever."""
    calls = []

    def describe() -> dict:
        calls.append(len(calls))
        answer = {"Status": statuses[min(len(calls), len(statuses)) - 1]}
        if reason is not None:
            answer["FailureReason"] = reason
        return answer

    return describe, calls


def test_wait_for_returns_the_final_answer_after_polling():
    describe, calls = _answers("Pending", "InProgress", "Completed")
    assert wait_for("job a", describe, JOB, poll_seconds=0) == {"Status": "Completed"}
    assert len(calls) == 3


def test_a_failed_state_is_an_error_naming_sagemakers_reason():
    describe, _ = _answers("InProgress", "Failed", reason="AlgorithmError: CUDA out of memory")
    with pytest.raises(WaitFailed, match="^job b ended Failed: AlgorithmError: CUDA out of memory$") as failure:
        wait_for("job b", describe, JOB, poll_seconds=0)
    assert (failure.value.status, failure.value.reason) == ("Failed", "AlgorithmError: CUDA out of memory")
    describe, _ = _answers("Stopped")
    with pytest.raises(WaitFailed, match="job c ended Stopped: no reason given"):
        wait_for("job c", describe, JOB, poll_seconds=0)


def test_a_timeout_says_what_keeps_running():
    describe, calls = _answers("InProgress")
    with pytest.raises(SageMakerError, match="^job d is still InProgress after 0 s; it goes on$") as error:
        wait_for("job d", describe, JOB, poll_seconds=0, timeout_seconds=0, still_running="it goes on")
    assert not isinstance(error.value, WaitFailed)
    assert len(calls) == 1


def test_ctrl_c_stops_waiting_but_not_the_job(monkeypatch):
    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("jumpstart.polling.time.sleep", interrupted)
    describe, _ = _answers("InProgress")
    with pytest.raises(Interrupted, match="stopped waiting for job e; it carries on in AWS; delete it later"):
        wait_for("job e", describe, JOB, poll_seconds=1, still_running="delete it later")


def test_progress_text_comes_from_the_answer(monkeypatch):
    shown = []
    from rich.progress import Progress

    original = Progress.update
    monkeypatch.setattr(
        Progress, "update", lambda self, task, **kw: shown.append(kw.get("description")) or original(self, task, **kw)
    )
    answers = iter(
        [
            {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Downloading"},
            {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"},
            {"TrainingJobStatus": "Completed", "SecondaryStatus": "Completed"},
        ]
    )
    wait_for("training job f", lambda: next(answers), TRAINING_JOB, poll_seconds=0)
    assert shown == ["training job f: Downloading", "training job f: Training", "training job f: Completed"]
    assert ENDPOINT.progress({"EndpointStatus": "Creating"}) == "Creating (usually 5-15 min)"


def test_an_aws_error_while_waiting_is_one_line(aws):
    sagemaker = aws.client("sagemaker")
    with pytest.raises(SageMakerError, match="^AWS error while waiting for training job nope") as error:
        wait_for(
            "training job nope",
            lambda: sagemaker.describe_training_job(TrainingJobName="nope"),
            TRAINING_JOB,
            poll_seconds=0,
        )
    assert "\n" not in str(error.value)


def test_an_endpoint_still_starting_after_the_timeout_stays_recorded(aws, monkeypatch):
    from moto.sagemaker.models import FakeEndpoint

    from jumpstart import deploy as deploy_module
    from jumpstart.records import recorded_endpoints

    original_init = FakeEndpoint.__init__

    def creating_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.endpoint_status = "Creating"

    monkeypatch.setattr(FakeEndpoint, "__init__", creating_init)
    monkeypatch.setattr(deploy_module, "ENDPOINT_TIMEOUT_SECONDS", 0)
    with pytest.raises(SageMakerError, match="endpoint slow is still Creating after 0 s; it is billed once InService"):
        deploy_module.deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="slow", poll_seconds=0)
    # Not removed, so still recorded: `txt2img endpoints list` shows it and `delete` finds its region.
    assert [record.endpoint.name for record in recorded_endpoints()] == ["slow"]
    assert aws.client("sagemaker").describe_endpoint(EndpointName="slow")["EndpointStatus"] == "Creating"
