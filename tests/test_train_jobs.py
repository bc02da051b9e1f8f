"""Training jobs over HTTP (``POST /jobs/train``) against a real two-worker ``bentoml serve`` on tiny-sd:
bad uploads refused with nothing left behind, a fine-tune canceled and resumed to the loss of an
uninterrupted run, and its model served at once by both workers."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from training.checkpoints import latest_checkpoint
from training.dreambooth import train
from training.hyperparameters import Hyperparameters

PROMPT = "a photo of sks toy"
# Steps enough for a cancel to land mid-run; one validation prompt keeps the report short.
FIELDS = {"max_steps": "30", "learning_rate": "2e-3", "seed": "0", "checkpointing_steps": "1000"}
HYPERPARAMETERS = {**FIELDS, "validation_prompts": PROMPT}
FAST = {"prompt": PROMPT, "num_inference_steps": 2, "width": 64, "height": 64}


def _photo(index: int, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (64, 64), (120, 130, 140))
    ImageDraw.Draw(image).ellipse((8 + 4 * index, 16, 40 + 4 * index, 48), fill=(220, 40, 40))
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, "PNG")
    else:  # a mark in the top left corner as stored, which the EXIF orientation turns elsewhere
        ImageDraw.Draw(image).rectangle((0, 0, 15, 15), fill=(20, 200, 20))
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def _photos(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{index}.png", _photo(index), "image/png")) for index in range(count)]


def _submit(url: str, name: str, files: list, **fields: str) -> httpx.Response:
    data = {"name": name, "instance_prompt": PROMPT, "method": "lora", **HYPERPARAMETERS, **fields}
    return httpx.post(f"{url}/jobs/train", data=data, files=files, timeout=120)


def _wait(url: str, job_id: str, done, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=60).json()
        if done(job):
            return job
        assert job["status"] not in ("failed",) and time.monotonic() < deadline, job
        time.sleep(0.2)


def _left_behind(url: str, home: Path, name: str) -> list[str]:
    """What a refused upload must not leave: a job, a job folder, a run folder, a catalog entry."""
    leftovers = [f"job {job['id']}" for job in httpx.get(f"{url}/jobs", timeout=60).json()["jobs"]]
    images = home / "jobs" / "images"
    leftovers += [str(path) for path in images.iterdir()] if images.is_dir() else []
    leftovers += [str(path) for path in (home / "models" / name, home / "catalog" / f"{name}.yaml") if path.exists()]
    return leftovers


def _bomb() -> bytes:
    """A small PNG that decodes to 25 million pixels."""
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("case", "files", "name", "status", "message"),
    [
        ("not an image", [*_photos(3), ("images", ("notes.txt", b"hello", "text/plain"))], "refused", 400,
         "file 4 ('notes.txt') is not an image"),
        ("two not images", [*_photos(2), ("images", ("a.txt", b"a", "text/plain")),
                            ("images", ("b.gif", b"GIF89a", "image/gif"))], "refused", 400,
         "file 3 ('a.txt') is not an image this server can read; file 4 ('b.gif') is not an image"),
        ("decompression bomb", [*_photos(3), ("images", ("bomb.png", _bomb(), "image/png"))], "refused", 400,
         "file 4 ('bomb.png') is 5000x5000 pixels, more than TXT2IMG_TRAIN_MAX_IMAGE_PIXELS (65536)"),
        ("too many files", _photos(7), "refused", 400, "takes 3 to 6 files in field 'images'; got 7"),
        ("too few files", _photos(2), "refused", 400, "takes 3 to 6 files in field 'images'; got 2"),
        ("path name", [*_photos(3), ("images", ("../escape.png", _photo(5), "image/png"))], "refused", 400,
         "file 4 ('../escape.png') has a path for a name"),
        ("absolute path name", [*_photos(3), ("images", ("/tmp/abs.png", _photo(5), "image/png"))], "refused", 400,
         "file 4 ('/tmp/abs.png') has a path for a name"),
        ("name taken", _photos(3), "tiny-sd", 409, "model 'tiny-sd' already exists in the catalog"),
        ("bad hyperparameter", _photos(3), "refused", 400, "--hp max_steps: Input should be a valid integer"),
    ],
)  # fmt: skip
def test_a_bad_upload_is_refused_naming_the_problem_and_leaves_nothing(training_server, case, files, name, status,
                                                                        message):  # fmt: skip
    url, home = training_server
    extra = {"max_steps": "many"} if case == "bad hyperparameter" else {}
    response = _submit(url, name, files, **extra)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "Traceback" not in response.text
    assert _left_behind(url, home, name) == []


def test_a_train_body_may_exceed_the_request_limit_on_that_route_alone(training_server):
    url, _ = training_server
    big = {"prompt": "x" * (2 * 1024 * 1024)}
    assert httpx.post(f"{url}/txt2img", json=big, timeout=60).status_code == 413
    response = _submit(url, "refused", [*_photos(2), ("images", ("big.png", b"\0" * (2 * 1024 * 1024), "image/png"))])
    assert response.status_code == 400  # read whole (past TXT2IMG_MAX_BODY_BYTES), then refused as bad input
    assert response.json()["error"] == "file 3 ('big.png') is not an image this server can read"


def _answering_workers(url: str, tries: int = 100) -> dict[int, dict]:
    seen: dict[int, dict] = {}
    for _ in range(tries):
        body = httpx.get(f"{url}/models", timeout=60).json()  # a new connection: the kernel picks a worker
        seen[body["worker"]["index"]] = body
        if len(seen) == 2:
            break
    return seen


def test_cancel_then_resume_reaches_the_loss_of_an_uninterrupted_run_served_by_both_workers(training_server, tmp_path):
    url, home = training_server
    files = [*_photos(2), ("images", ("upside-down.jpg", _photo(2, orientation=3), "image/jpeg"))]
    submitted = _submit(url, "served-run", files)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["kind"] == "train" and job["status"] == "queued"
    assert set(job["urls"]) == {"get", "cancel", "resume"}

    running = _wait(url, job["id"], lambda job: job["progress"]["step"] >= 2)
    assert running["status"] == "running" and running["curve"][0]["step"] == 1
    canceled = httpx.delete(f"{url}/jobs/{job['id']}", timeout=60)
    assert canceled.status_code == 200
    stopped = _wait(url, job["id"], lambda job: job["status"] != "running")
    assert stopped["status"] == "canceled", stopped
    step = stopped["progress"]["step"]
    assert 2 <= step < 30
    # The trainer checkpointed where it stopped: the resume continues from there, not from step 0.
    checkpoint = latest_checkpoint(home / "models" / "served-run" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{step}"

    resumed = httpx.post(f"{url}/jobs/{job['id']}/resume", timeout=60)
    assert resumed.status_code == 202 and resumed.json()["status"] == "queued", resumed.text
    done = _wait(url, job["id"], lambda job: job["status"] == "succeeded")
    assert [point["step"] for point in done["curve"]] == list(range(1, 31))
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 30
    assert done["result"] == {"model": "served-run", "urls": {"model": "/models/served-run"}}
    for link in done["validation_images"]:
        assert httpx.get(f"{url}{link}", timeout=60).headers["content-type"] == "image/png"
    # The photo was stored upright (EXIF orientation 3: turned half a circle), as a PNG named by its number.
    upright = Image.open(home / "jobs" / "images" / job["id"] / "photos" / "03.png")
    assert upright.getpixel((60, 60)) == pytest.approx((20, 200, 20), abs=30)
    assert upright.getpixel((3, 3)) == pytest.approx((120, 130, 140), abs=30)
    served_loss = httpx.get(f"{url}/models/served-run", timeout=60).json()["metrics"]["final_loss"]

    data = home / "jobs" / "images" / job["id"] / "photos"
    hyperparameters = Hyperparameters.from_pairs([f"{key}={value}" for key, value in HYPERPARAMETERS.items()])
    hyperparameters.method = "lora"
    straight = train(data, "tiny-sd", "straight", hyperparameters, progress=False)
    assert served_loss == pytest.approx(straight.metrics["final_loss"], rel=1e-5)

    # Served at once by both workers, the one that ran the job and the other, without a restart.
    workers = _answering_workers(url)
    assert sorted(workers) == [1, 2]
    assert all("served-run" in {model["id"] for model in body["models"]} for body in workers.values())
    for _ in range(10):
        answers = [httpx.post(f"{url}/txt2img", json={**FAST, "model": "served-run"}, timeout=120) for _ in range(4)]
        assert [answer.status_code for answer in answers] == [200] * 4, answers[0].text
        loaded = {index: body["loaded"] for index, body in _answering_workers(url).items()}
        if all("served-run" in models for models in loaded.values()):
            break
    assert all("served-run" in models for models in loaded.values()), loaded


def test_only_a_canceled_training_resumes(training_server):
    url, _ = training_server
    assert httpx.post(f"{url}/jobs/no-such-job/resume", timeout=60).status_code == 404
    generation = httpx.post(f"{url}/jobs", json=FAST, timeout=60).json()
    refused = httpx.post(f"{url}/jobs/{generation['id']}/resume", timeout=60)
    assert refused.status_code == 409 and "only a canceled training resumes" in refused.json()["error"]
