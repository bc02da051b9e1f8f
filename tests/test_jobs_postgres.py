"""Beyond one machine: two ``bentoml serve`` servers, each with its own TXT2IMG_HOME, sharing one job store
on a real PostgreSQL server (TXT2IMG_JOBS_DB). Jobs submitted to either run once, on one of them, and
either server answers for every job and serves its images."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from bentoml_server import offline_server

REPO_ROOT = Path(__file__).resolve().parents[1]

BODY = {"prompt": "a harbour crane", "num_inference_steps": 12, "width": 64, "height": 64}
JOBS = 12


def wait_until_finished(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {job}")


def test_two_servers_share_a_postgresql_store_and_each_job_runs_once(tmp_path, postgresql_url, webhook_receiver):
    settings = {"jobs_db": postgresql_url, "max_batch_size": "2", "webhook_secret": "s", "webhook_hosts": "127.0.0.1"}
    with contextlib.ExitStack() as servers:
        urls = [servers.enter_context(offline_server(tmp_path / name, **settings)) for name in ("a", "b")]
        clients = [servers.enter_context(httpx.Client(base_url=url, timeout=60)) for url in urls]
        body = {**BODY, "webhook": webhook_receiver.url("/ok")}
        ids = [clients[index % 2].post("/jobs", json=body).json()["id"] for index in range(JOBS)]
        for index, job_id in enumerate(ids):
            job = wait_until_finished(clients[(index + 1) % 2], job_id)  # asked of the server it was not sent to
            assert job["status"] == "succeeded", job
            images = [[client.get(item["url"]) for client in clients] for item in job["images"]]
            for from_a, from_b in images:
                assert from_a.status_code == 200 and from_a.headers["content-type"] == "image/png"
                assert from_a.content == from_b.content and from_a.content.startswith(b"\x89PNG")
        webhook_receiver.wait_for(2 * JOBS)
        time.sleep(1)  # a job run twice would have said "started" again by now
    events = collections.Counter(
        (event["id"], event["event"]) for event in map(json.loads, deliveries(webhook_receiver))
    )
    assert events == {(job_id, event): 1 for job_id in ids for event in ("started", "succeeded")}
    with psycopg.connect(postgresql_url) as database:
        workers = database.execute("SELECT COUNT(DISTINCT claimed_by) FROM jobs").fetchone()[0]
    assert workers == 2  # both servers ran jobs


def deliveries(receiver) -> list[bytes]:
    return [body for body, _ in receiver.deliveries]


@pytest.mark.parametrize(
    ("hide_driver", "said"),
    [
        (False, "txt2img: error: cannot reach the jobs database 127.0.0.1:9/jobs: connection failed: "),
        (
            True,
            "txt2img: error: TXT2IMG_JOBS_DB is a PostgreSQL URL but its driver is missing (psycopg): "
            "pip install 'txt2img[postgres]'",
        ),
    ],
)
def test_a_job_store_the_server_cannot_use_stops_it_at_start_in_one_line(hide_driver, said):
    hide = "import sys; sys.modules['psycopg'] = None; " if hide_driver else ""
    env = {**os.environ, "TXT2IMG_JOBS_DB": "postgresql://txt2img:secret@127.0.0.1:9/jobs"}
    started = subprocess.run(
        [sys.executable, "-c", f"{hide}import serving.service"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert started.returncode == 1
    assert started.stderr.startswith(said) and started.stderr.count("\n") == 1, started.stderr
    assert "secret" not in started.stderr
