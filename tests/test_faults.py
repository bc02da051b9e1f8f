"""Faults the server must survive: bad catalog files, a second server, short schedules, a killed worker.

The catalog and scheduler checks run in-process; the rest against real ``bentoml serve`` subprocesses.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from bentoml_server import server_process, service_workers, wait_until_ready
from serving_finetunes import FULL_ID, LORA_ID, register_finetunes

from catalog.paths import BUILTIN_CATALOG
from catalog.store import CatalogError, load_catalog_skipping_bad_files

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = {"prompt": "a red cube", "num_inference_steps": 2, "width": 64, "height": 64}
GOOD_ENTRY = {"id": "good-one", "source": "builtin", "family": "tiny", "resolution": 64}


# The lenient catalog load, in-process


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_user_files_are_skipped_and_named_and_good_ones_kept(tmp_path):
    user_dir = tmp_path / "catalog"
    write(user_dir / "good-one.yaml", yaml.safe_dump(GOOD_ENTRY))
    broken = write(user_dir / "broken.yaml", "id: [unclosed\n")
    wrong = write(user_dir / "wrong.yaml", yaml.safe_dump({**GOOD_ENTRY, "id": "wrong", "resolution": -1}))
    twin = write(user_dir / "twin.yaml", yaml.safe_dump({**GOOD_ENTRY, "id": "tiny-sd"}))
    catalog, problems = load_catalog_skipping_bad_files(user_dir)
    assert "good-one" in catalog and "tiny-sd" in catalog and "wrong" not in catalog
    assert catalog.origin("tiny-sd") == BUILTIN_CATALOG  # the built-in entry wins over the duplicate
    assert {problem.file for problem in problems} == {broken, wrong, twin}
    assert any("invalid YAML" in str(problem) for problem in problems)
    assert any(problem.field == "resolution" for problem in problems)


def test_an_entry_needing_a_skipped_file_is_skipped_too(tmp_path):
    user_dir = tmp_path / "catalog"
    write(user_dir / "base.yaml", "id: base\nsource: builtin\nfamily: tiny\nresolution: [\n")
    lora = {"id": "on-base", "source": "finetune", "family": "tiny", "resolution": 64}
    dependent = write(
        user_dir / "on-base.yaml", yaml.safe_dump({**lora, "base": "base", "method": "lora", "artifact": "/nowhere"})
    )
    catalog, problems = load_catalog_skipping_bad_files(user_dir)
    assert "on-base" not in catalog and "tiny-sd" in catalog
    assert any(problem.file == dependent and problem.field == "base" for problem in problems)


def test_a_bad_builtin_catalog_still_raises(tmp_path):
    builtin = write(tmp_path / "models.yaml", "models: {}\n")
    with pytest.raises(CatalogError):
        load_catalog_skipping_bad_files(tmp_path / "catalog", builtin=builtin)


# Every scheduler at the shortest schedules, in-process

SD_PNDM_CONFIG = {  # Stable Diffusion 1.x/2.x-base's own scheduler config, as JumpStart's models ship it
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


@pytest.mark.parametrize("own_scheduler", ["tiny-sd's DDIM", "Stable Diffusion's PNDM"])
def test_every_scheduler_runs_one_to_three_steps(own_scheduler, one_torch_thread):
    import numpy as np
    from diffusers import PNDMScheduler

    from catalog.families import FAMILIES
    from catalog.tiny_sd import build_tiny_sd_pipeline
    from serving.generation import BatchItem, generate_images

    pipeline = build_tiny_sd_pipeline()
    if own_scheduler == "Stable Diffusion's PNDM":
        pipeline.scheduler = PNDMScheduler.from_config(SD_PNDM_CONFIG)
    failures = []
    for name in [None, *FAMILIES["tiny"].schedulers]:
        for steps in (1, 2, 3):
            try:
                [image] = generate_images(
                    pipeline,
                    [BatchItem("a red cube", None, 0)],
                    width=64,
                    height=64,
                    num_inference_steps=steps,
                    guidance_scale=7.5,
                    scheduler=name,
                )
            except Exception as error:
                failures.append(f"{name} at {steps} steps: {type(error).__name__}: {error}")
                continue
            if not np.isfinite(np.asarray(image, dtype=float)).all() or image.size != (64, 64):
                failures.append(f"{name} at {steps} steps: a broken image")
    assert failures == []


# Real servers


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    """A txt2img home whose catalog holds good fine-tunes and one bad file from the start, and a BentoML home."""
    root = tmp_path_factory.mktemp("faults")
    home = root / "txt2img"
    register_finetunes(home)
    write(home / "catalog" / "at-start.yaml", "id: at-start\nsource: [builtin\n")
    return home, root / "bentoml"


@pytest.fixture(scope="module")
def fault_server(homes):
    home, bentoml_home = homes
    settings = {"max_steps": "1000", "torch_threads": "1"}  # a long request to kill the worker in
    with server_process(home, bentoml_home=bentoml_home, env={"HF_HUB_OFFLINE": "1"}, **settings) as running:
        yield running


@pytest.fixture()
def client(fault_server):
    with httpx.Client(base_url=fault_server[0], timeout=120) as http:
        yield http


def metric(client, name: str, label: str = "") -> float:
    """A metric's value, summed over its lines that carry ``label`` (say ``endpoint="/txt2img"``)."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if (key == name or key.startswith(name + "{")) and label in key:
            total += float(value)
    return total


def test_a_bad_catalog_file_at_start_is_reported_and_every_good_entry_served(client, homes):
    body = client.get("/models").json()
    assert [problem["file"] for problem in body["catalog_problems"]] == [str(homes[0] / "catalog" / "at-start.yaml")]
    assert {"tiny-sd", FULL_ID, LORA_ID} <= {model["id"] for model in body["models"]}
    assert client.post("/txt2img", json={**FAST, "model": FULL_ID}).status_code == 200
    assert client.post("/txt2img", json={**FAST, "model": "no-such-model"}).status_code == 404


def test_a_bad_catalog_file_appearing_while_serving_is_skipped_and_logged_once(client, homes):
    home = homes[0]
    late = write(home / "catalog" / "late.yaml", "{not yaml")
    for _ in range(2):
        response = client.post("/txt2img", json={**FAST, "model": "still-no-such-model"})
        assert response.status_code == 404, response.text
    assert client.post("/txt2img", json={**FAST, "model": LORA_ID}).status_code == 200
    files = [problem["file"] for problem in client.get("/models").json()["catalog_problems"]]
    assert str(late) in files
    log = (home / "server.log").read_text()
    assert log.count(f"catalog file skipped: {late}") == 1


def test_pndm_at_one_step_over_http(client):
    response = client.post("/txt2img", json={**FAST, "scheduler": "pndm", "num_inference_steps": 1})
    assert response.status_code == 200, response.text


def test_a_second_server_on_the_same_bentoml_home_leaves_the_first_ones_metrics_alone(client, homes, tmp_path):
    for seed in range(3):
        assert client.post("/txt2img", json={**FAST, "seed": seed}).status_code == 200
    served = metric(client, "txt2img_batch_images_count")
    requests = metric(client, "bentoml_service_request_total", 'endpoint="/txt2img"')
    assert served >= 3 and requests >= 3
    second_home = tmp_path / "second"
    with server_process(second_home, bentoml_home=homes[1], torch_threads="1") as (second_url, _):
        assert httpx.post(f"{second_url}/txt2img", json=FAST, timeout=120).status_code == 200
        assert metric(client, "txt2img_batch_images_count") == served
        assert metric(client, "bentoml_service_request_total", 'endpoint="/txt2img"') == requests
        with httpx.Client(base_url=second_url) as second:
            assert metric(second, "txt2img_batch_images_count") == 1
    assert metric(client, "txt2img_batch_images_count") == served


def test_a_worker_killed_mid_request_is_replaced_and_the_server_serves_again(fault_server, client):
    url, process = fault_server
    served = metric(client, "txt2img_batch_images_count")
    [worker] = service_workers(process)
    with ThreadPoolExecutor(1) as pool:
        # Minutes of work on any CPU (900 steps at 256 px): it is still running when the worker dies.
        long_body = {**FAST, "num_inference_steps": 900, "width": 256, "height": 256}
        long_request = pool.submit(httpx.post, f"{url}/txt2img", json=long_body, timeout=300)
        deadline = time.monotonic() + 60
        while metric(client, "txt2img_running_images") != 1:
            assert time.monotonic() < deadline, "the long request never started"
            time.sleep(0.1)
        worker.send_signal(signal.SIGKILL)
        with pytest.raises(httpx.TransportError):
            long_request.result()
    wait_until_ready(process, url, Path(os.devnull))
    assert client.post("/txt2img", json=FAST).status_code == 200
    [replacement] = service_workers(process)
    assert replacement.pid != worker.pid
    # The killed worker's live gauge is forgotten; what it served still counts.
    assert metric(client, "txt2img_running_images") == 0
    assert metric(client, "txt2img_batch_images_count") == served + 1


def test_a_default_model_that_cannot_warm_keeps_ping_and_readyz_at_503_naming_why_and_others_still_serve(tmp_path):
    model = "model-txt2img-stabilityai-stable-diffusion-v2-1-base"  # a Hub model not in the (empty) cache
    hub_offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    # A short timeout: a queue that stopped serving after the failed warm-up would answer 504 within it.
    settings = {"model": model, "request_timeout_s": "60", "torch_threads": "1"}
    with server_process(tmp_path, env=hub_offline, ready_path="/livez", **settings) as (url, _):
        deadline = time.monotonic() + 120
        while "warm-up" not in (ping := httpx.get(f"{url}/ping", timeout=10)).text:
            assert ping.status_code == 503 and ping.json() == {"error": "warming up"}
            assert time.monotonic() < deadline, "the warm-up never failed"
            time.sleep(0.1)
        assert ping.status_code == 503
        assert ping.json()["error"].startswith(f"warm-up of '{model}' failed: cannot load model")
        assert "stabilityai/stable-diffusion-2-1-base" in ping.json()["error"]
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
        assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
        # The queue keeps serving the models that load; the failed one is refused at once, saying why.
        assert httpx.post(f"{url}/txt2img", json={**FAST, "model": "tiny-sd"}, timeout=120).status_code == 200
        refused = httpx.post(f"{url}/images", json={**FAST, "model": model}, timeout=120)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "60"
        assert refused.json()["error"].startswith(f"warm-up of '{model}' failed: cannot load model")
