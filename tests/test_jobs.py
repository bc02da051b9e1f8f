"""The jobs API (serving/jobs_api.py) on a real two-worker ``bentoml serve``: submission, polling, images
identical to /images', idempotency, cancel, the same limits and browser rules as every route, signed
and retried webhooks, and two workers sharing one store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import time

import httpx
import pytest
from bentoml_server import offline_server

SECRET = "test-webhook-secret"
WEBHOOK_RETRIES = 2
BODY = {"prompt": "a red bicycle", "num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory):
    """Two workers (each with one torch thread) sharing TXT2IMG_HOME's job store; webhooks to loopback."""
    home = tmp_path_factory.mktemp("jobs-home")
    settings = {
        "workers": "2",
        "max_steps": "900",
        "max_batch_size": "2",
        "webhook_secret": SECRET,
        "webhook_hosts": "127.0.0.1",
        "webhook_retries": str(WEBHOOK_RETRIES),
        "webhook_backoff_s": "0.2",
    }
    with offline_server(home, **settings) as url:
        yield url, home


@pytest.fixture
def client(jobs_server):
    with httpx.Client(base_url=jobs_server[0], timeout=60) as session:
        yield session


def submit(client: httpx.Client, body: dict, **headers: str) -> dict:
    answer = client.post("/jobs", json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    return answer.json()


def finished(job: dict) -> bool:
    return job["status"] not in ("queued", "running")


def wait_for(client: httpx.Client, job_id: str, done=finished) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']}: {job}")


def test_a_job_gives_the_images_images_gives_for_its_seeds(client):
    accepted = submit(client, {**BODY, "num_images": 2})  # no seed: drawn at submission, and kept
    assert accepted["status"] == "queued"
    assert accepted["urls"] == {"get": f"/jobs/{accepted['id']}", "cancel": f"/jobs/{accepted['id']}"}
    job = wait_for(client, accepted["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"steps_done": 2, "total_steps": 2}
    seeds = [image["seed"] for image in job["images"]]
    assert seeds == accepted["seeds"] == [seeds[0], seeds[0] + 1]
    direct = client.post("/images", json={**BODY, "num_images": 2, "seed": seeds[0]}).json()
    for image, expected in zip(job["images"], direct["images"]):
        served = client.get(image["url"])
        assert served.headers["content-type"] == "image/png"
        assert served.content == base64.b64decode(expected["image"])


def test_jobs_are_listed_newest_first_a_page_at_a_time(client):
    ids = [submit(client, {**BODY, "prompt": f"list {index}"})["id"] for index in range(3)]
    page = client.get("/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in page["jobs"]] == ids[:0:-1]
    following = client.get(page["next"]).json()
    assert following["jobs"][0]["id"] == ids[0]
    assert client.get("/jobs", params={"limit": 0}).status_code == 400
    assert "limit" in client.get("/jobs", params={"limit": "x"}).json()["error"]


def test_one_idempotency_key_gives_one_job_and_refuses_another_body(client):
    first = submit(client, BODY, **{"Idempotency-Key": "key-1"})
    again = submit(client, BODY, **{"Idempotency-Key": "key-1"})
    assert again["id"] == first["id"]
    other = client.post("/jobs", json={**BODY, "prompt": "another"}, headers={"Idempotency-Key": "key-1"})
    assert other.status_code == 409
    assert "key-1" in other.json()["error"] and first["id"] in other.json()["error"]
    assert submit(client, BODY, **{"Idempotency-Key": "key-2"})["id"] != first["id"]


def test_a_running_job_is_canceled_at_its_next_step(client):
    job = submit(client, {**BODY, "num_inference_steps": 900})
    running = wait_for(client, job["id"], lambda state: state["progress"]["steps_done"] > 0 or finished(state))
    assert running["status"] == "running"
    assert client.delete(f"/jobs/{job['id']}").status_code == 200
    ended = wait_for(client, job["id"])
    assert ended["status"] == "canceled"
    assert ended["progress"]["steps_done"] < 900
    assert "images" not in ended
    assert client.get(f"/jobs/{job['id']}/images/0").status_code == 404


def test_a_get_with_wait_answers_once_the_job_has_ended(client):
    ids = [submit(client, {**BODY, "num_inference_steps": 40})["id"] for _ in range(2)]  # one on each worker
    for job_id in ids:
        assert client.get(f"/jobs/{job_id}", params={"wait": "60"}).json()["status"] == "succeeded"
    for bad in ("61", "-1", "soon"):
        refused = client.get(f"/jobs/{ids[0]}", params={"wait": bad})
        assert refused.status_code == 400 and "wait" in refused.json()["error"]


def test_an_unknown_job_is_a_json_404(client):
    for answer in (client.get("/jobs/nope"), client.delete("/jobs/nope"), client.get("/jobs/nope/images/0")):
        assert answer.status_code == 404
        assert "nope" in answer.json()["error"]


@pytest.mark.parametrize(
    "change",
    [{"num_inference_steps": 5000}, {"model": "no-such-model"}, {"num_inference_steps": "2"}, {"unknown": 1}],
)
def test_a_job_is_refused_at_submission_as_images_refuses_it(client, change):
    body = {**BODY, **change}
    refused = client.post("/jobs", json=body)
    direct = client.post("/images", json=body)
    assert refused.status_code == direct.status_code
    assert 400 <= refused.status_code < 500
    assert refused.json()["error"] == direct.json()["error"]


def test_browser_rules_hold_on_jobs(client):
    foreign = client.post("/jobs", json=BODY, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    as_text = client.post("/jobs", content=json.dumps(BODY), headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 415


@pytest.mark.parametrize("url", ["http://example.com/hook", "file:///etc/passwd", "http://localhost:1/hook"])
def test_a_webhook_outside_the_allowed_hosts_is_refused_at_submission(client, url):
    refused = client.post("/jobs", json={**BODY, "webhook": url})
    assert refused.status_code == 400
    assert refused.json()["field"] == "webhook"


def signed_events(receiver) -> list[dict]:
    """Every delivery's event, each checked against its X-Txt2img-Signature."""
    events = []
    for body, signature in receiver.deliveries:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature or "", expected), "an unsigned or wrongly signed webhook"
        events.append(json.loads(body))
    return events


def test_webhooks_are_signed_and_retried_after_a_500(client, webhook_receiver):
    job = submit(client, {**BODY, "webhook": webhook_receiver.url("/flaky")})
    assert wait_for(client, job["id"])["status"] == "succeeded"
    # Each event fails once (500), then arrives on its retry.
    webhook_receiver.wait_for(4)
    events = signed_events(webhook_receiver)
    assert sorted(event["event"] for event in events) == ["started", "started", "succeeded", "succeeded"]
    assert {event["id"] for event in events} == {job["id"]}
    assert all(abs(event["timestamp"] - time.time()) < 300 for event in events)
    assert events[-1]["images"][0]["seed"] == job["seeds"][0]


def test_a_failing_webhook_is_tried_at_most_retries_plus_one_times(client, webhook_receiver):
    job = submit(client, {**BODY, "webhook": webhook_receiver.url("/down")})
    assert wait_for(client, job["id"])["status"] == "succeeded"
    webhook_receiver.wait_for(2 * (WEBHOOK_RETRIES + 1))
    time.sleep(2)  # the backoff is 0.2 s doubling: any extra try would have come by now
    events = [event["event"] for event in signed_events(webhook_receiver)]
    assert sorted(events) == ["started"] * (WEBHOOK_RETRIES + 1) + ["succeeded"] * (WEBHOOK_RETRIES + 1)


def test_a_canceled_queued_job_tells_its_webhook(client, webhook_receiver):
    blocker = submit(client, {**BODY, "num_inference_steps": 400})
    # Both workers take 2 batches of 2 (TXT2IMG_MAX_BATCH_SIZE) at most: 8 long jobs fill them, the 9th waits.
    blockers = [submit(client, {**BODY, "num_inference_steps": 400}) for _ in range(8)]
    queued = submit(client, {**BODY, "webhook": webhook_receiver.url("/ok")})
    canceled = client.delete(f"/jobs/{queued['id']}").json()
    for other in [blocker, *blockers]:
        client.delete(f"/jobs/{other['id']}")
    assert canceled["status"] == "canceled"
    webhook_receiver.wait_for(1)
    assert [event["event"] for event in signed_events(webhook_receiver)] == ["canceled"]


def test_both_workers_run_jobs_from_the_one_store_and_each_job_runs_once(client, jobs_server, webhook_receiver):
    ids = [
        submit(client, {**BODY, "num_inference_steps": 20, "webhook": webhook_receiver.url("/ok")})["id"]
        for _ in range(10)
    ]
    for job_id in ids:
        assert wait_for(client, job_id)["status"] == "succeeded"
    webhook_receiver.wait_for(2 * len(ids))
    time.sleep(1)
    events = signed_events(webhook_receiver)
    for job_id in ids:
        assert sorted(event["event"] for event in events if event["id"] == job_id) == ["started", "succeeded"]
    with sqlite3.connect(jobs_server[1] / "jobs" / "jobs.sqlite") as database:
        placeholders = ",".join("?" * len(ids))
        workers = database.execute(f"SELECT DISTINCT claimed_by FROM jobs WHERE id IN ({placeholders})", ids)
        assert len(workers.fetchall()) == 2
