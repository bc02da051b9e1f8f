"""What the jobs API says about a training job beyond what every job has: its progress, loss curve and
validation images, read from the run's own files (training/step_log.py, training/report.py), and once it
succeeded the catalog entry it made."""

from __future__ import annotations

from pathlib import Path

from serving.jobs import StoredJob
from training.dreambooth import default_output_dir
from training.report import CONTACT_SHEET, VALIDATION_DIR
from training.step_log import read_step_log

RATE_WINDOW = 20  # the last steps the time left is estimated from


def train_job_path(job_id: str) -> str:
    return f"/jobs/{job_id}"


def model_path(model_id: str) -> str:
    return f"/models/{model_id}"


def training_details(job: StoredJob) -> dict:
    """``kind``, ``progress`` ({step, total_steps, loss, lr, eta_s}), ``curve`` (every logged step),
    ``validation_images`` (URLs), ``urls`` and, once succeeded, ``result``: the model and its URL."""
    steps = read_step_log(default_output_dir(job.request["name"]))
    last = steps[-1] if steps else {}
    details = {
        "kind": "train",
        "progress": {
            "step": last.get("step", 0),
            "total_steps": last.get("total_steps", job.total_steps or None),
            "loss": last.get("loss"),
            "lr": last.get("lr"),
            "eta_s": _seconds_left(steps) if job.status == "running" else None,
        },
        "curve": [{"step": line["step"], "loss": line["loss"], "lr": line["lr"]} for line in steps],
        "validation_images": [f"{train_job_path(job.id)}/validation/{name}" for name in validation_images(job)],
        "urls": {
            "get": train_job_path(job.id),
            "cancel": train_job_path(job.id),
            "resume": f"{train_job_path(job.id)}/resume",
        },
    }
    if job.status == "succeeded":
        name = job.request["name"]
        details["result"] = {"model": name, "urls": {"model": model_path(name)}}
    return details


def _seconds_left(steps: list[dict]) -> float | None:
    """The steps to go times the mean time of the last RATE_WINDOW logged steps."""
    recent = steps[-RATE_WINDOW:]
    if len(recent) < 2 or recent[-1]["time"] <= recent[0]["time"]:
        return None
    per_step = (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])
    return round(max(recent[-1]["total_steps"] - recent[-1]["step"], 0) * per_step, 1)


def validation_images(job: StoredJob) -> list[str]:
    """The validation images the run has written (its contact sheet first), as names under its folder."""
    output_dir = default_output_dir(job.request["name"])
    names = [CONTACT_SHEET] if (output_dir / CONTACT_SHEET).is_file() else []
    folder = output_dir / VALIDATION_DIR
    if folder.is_dir():
        names += sorted(f"{VALIDATION_DIR}/{path.name}" for path in folder.glob("*.png"))
    return names


def validation_image_file(job: StoredJob, name: str) -> Path | None:
    """The file of validation image ``name`` if the run wrote it; only listed names, never a path of the caller's."""
    if name not in validation_images(job):
        return None
    return default_output_dir(job.request["name"]) / name
