"""Nothing lost: ``kill -9`` of the whole server mid-job, then a restart on the same TXT2IMG_HOME. The
interrupted and the queued jobs run again with the seeds drawn at submission and give the images /images
gives for those seeds; a job finished before the kill is still there."""

from __future__ import annotations

import base64
import contextlib
import time

import httpx
import psutil
from bentoml_server import server_process

BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64}
SETTINGS = {"torch_threads": "1", "local_files_only": "1", "max_batch_size": "1", "max_steps": "1000"}


def wait_for(url: str, job_id: str, done) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if done(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {job}")


def finished(job: dict) -> bool:
    return job["status"] not in ("queued", "running")


def submit(url: str, body: dict) -> dict:
    answer = httpx.post(f"{url}/jobs", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()


def kill_whole_server(server) -> None:
    """SIGKILL to the server and every process it started, all at once: no shutdown code runs."""
    processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


def image(url: str, path: str) -> bytes:
    return httpx.get(f"{url}{path}", timeout=30).content


def test_jobs_survive_kill_9_of_the_whole_server_and_give_the_same_images(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    with server_process(tmp_path, env=env, **SETTINGS) as (url, server):
        done = wait_for(url, submit(url, {**BODY, "num_inference_steps": 2})["id"], finished)
        done_image = image(url, done["images"][0]["url"])
        interrupted = submit(url, {**BODY, "num_inference_steps": 300})  # seed drawn by the server
        queued = submit(url, {**BODY, "num_inference_steps": 2, "num_images": 2})
        running = wait_for(url, interrupted["id"], lambda job: job["progress"]["steps_done"] > 0 or finished(job))
        assert running["status"] == "running"  # killed mid-job
        kill_whole_server(server)
    with server_process(tmp_path, env=env, log_path=tmp_path / "restarted.log", **SETTINGS) as (url, _):
        assert image(url, done["images"][0]["url"]) == done_image
        for job in (interrupted, queued):
            rerun = wait_for(url, job["id"], finished)
            assert rerun["status"] == "succeeded", rerun
            assert [item["seed"] for item in rerun["images"]] == job["seeds"]
            request = {**BODY, "num_inference_steps": rerun["progress"]["total_steps"], "seed": job["seeds"][0]}
            direct = httpx.post(f"{url}/images", json={**request, "num_images": len(job["seeds"])}, timeout=300)
            for item, expected in zip(rerun["images"], direct.json()["images"]):
                assert image(url, item["url"]) == base64.b64decode(expected["image"])
