"""Several server workers: how many, which GPU each takes, and a real two-worker server on the CPU.

The counting and device choice run in-process (CUDA faked: this machine has none); the rest
against one ``bentoml serve`` with ``TXT2IMG_WORKERS=2``.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from bentoml_server import server_process, service_workers
from serving_finetunes import FULL_ID, register_finetunes

from serving import device
from serving.settings import ServingSettings

FAST = {"prompt": "a red cube", "num_inference_steps": 2, "width": 64, "height": 64}


# The worker count and each worker's device, in-process


@pytest.mark.parametrize(
    ("settings", "gpus", "workers"),
    [
        ({}, 0, 1),
        ({}, 4, 4),
        ({"device": "cuda"}, 2, 2),
        ({"device": "cpu"}, 4, 1),
        ({"workers": 3}, 0, 3),
        ({"workers": 2}, 8, 2),
    ],
)
def test_one_worker_per_gpu_unless_told(monkeypatch, settings, gpus, workers):
    monkeypatch.setattr(device, "visible_gpu_count", lambda: gpus)
    assert device.serving_worker_count(ServingSettings(**settings)) == workers


def test_workers_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TXT2IMG_WORKERS", "2")
    assert device.serving_worker_count(ServingSettings()) == 2


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda as on a box with two GPUs; returns the GPUs set as current, in order."""
    import torch

    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_each_worker_takes_its_own_gpu_round_robin(two_fake_gpus):
    settings = ServingSettings()
    assert [device.pick_device(settings, worker) for worker in (1, 2, 3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert two_fake_gpus == [0, 1, 0]
    assert device.pick_device(settings) == "cuda:0"  # outside a server: the first GPU


def test_the_shared_image_folder_is_new_and_those_of_killed_servers_go(monkeypatch, tmp_path):
    import socket
    import tempfile

    from serving import image_files

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(image_files.SHARED_FOLDER_ENV, "")  # restored after the test
    host = socket.gethostname()
    killed = tmp_path / f"txt2img-images-{host}-{2**22 + 1}-abc"  # above Linux's largest pid: no such process
    running = tmp_path / f"txt2img-images-{host}-1-abc"
    killed.mkdir()
    running.mkdir()
    image_files.share_image_folder()
    assert not killed.exists() and running.exists()
    assert image_files.server_image_folder().parent == tmp_path
    assert image_files.server_image_folder().name.startswith(f"txt2img-images-{host}-")


# A real server with two workers


@pytest.fixture(scope="module")
def two_worker_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("workers")
    register_finetunes(home)
    with server_process(home, workers="2", torch_threads="1", env={"HF_HUB_OFFLINE": "1"}) as running:
        yield running


def answering_workers(url: str, want: int = 2, tries: int = 100) -> dict[int, dict]:
    """``/models`` as each worker answers it, by worker index, asked over new connections until ``want`` answered."""
    seen: dict[int, dict] = {}
    for _ in range(tries):
        body = httpx.get(f"{url}/models", timeout=60).json()  # a new connection: the kernel picks a worker
        seen[body["worker"]["index"]] = body
        if len(seen) == want:
            break
    return seen


def test_requests_reach_both_workers_each_with_its_own_models(two_worker_server):
    url, process = two_worker_server
    workers = answering_workers(url)
    assert sorted(workers) == [1, 2]
    assert {body["worker"]["pid"] for body in workers.values()} == {worker.pid for worker in service_workers(process)}
    assert all(body["worker"]["device"] == "cpu" for body in workers.values())
    # A model that no worker has warmed loads in a worker only when a request for it lands there.
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            statuses = pool.map(
                lambda _: httpx.post(f"{url}/txt2img", json={**FAST, "model": FULL_ID}, timeout=120), range(4)
            )
            assert [response.status_code for response in statuses] == [200] * 4
            loaded = {index: body["loaded"] for index, body in answering_workers(url).items()}
            if all(FULL_ID in models for models in loaded.values()):
                break
    assert all(FULL_ID in models for models in loaded.values()), loaded


def test_an_openai_image_link_works_whichever_worker_the_fetch_reaches(two_worker_server):
    url, _ = two_worker_server
    request = {"prompt": "a red cube", "size": "64x64", "num_inference_steps": 2, "response_format": "url", "n": 2}
    links = []
    for _ in range(3):  # each on a new connection, so they are made by either worker
        response = httpx.post(f"{url}/v1/images/generations", json=request, timeout=120)
        assert response.status_code == 200, response.text
        links += [image["url"] for image in response.json()["data"]]
    for link in links:
        for _ in range(4):  # new connections again: most links are fetched from both workers
            fetched = httpx.get(link, timeout=60)
            assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"


def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(two_worker_server):
    url, process = two_worker_server
    workers = answering_workers(url)
    victim = workers[2]["worker"]["pid"]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    # The survivor answers at once; the killed one's requests would fail, so none may go there.
    for seed in range(4):
        assert httpx.post(f"{url}/txt2img", json={**FAST, "seed": seed}, timeout=120).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=60).status_code == 200
    deadline = time.monotonic() + 180
    while True:
        workers = answering_workers(url, tries=20)
        if sorted(workers) == [1, 2] and victim not in {body["worker"]["pid"] for body in workers.values()}:
            break
        assert time.monotonic() < deadline, f"worker 2 was not replaced: {workers}"
        time.sleep(1)
    assert len(service_workers(process)) == 2
