"""An acceleration LoRA composes with a subject LoRA through the request API (issue 23, item 8).

On a server of tiny-sd with the serving fine-tunes, a random LoRA stands in for LCM-LoRA; a request with
it and the subject LoRA ``tiny-lora`` at 4 ``lcm`` steps and guidance 1.5 gives the image diffusers' own
adapters give at those scales, in either order.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from bentoml_server import offline_server
from PIL import Image
from serving_finetunes import LORA_ID, register_finetunes, save_lora_adapter, tiny_lora_entry

from catalog.store import write_entry

ACCELERATION_ID = "tiny-acceleration"
FEW_STEPS = {"prompt": "a red cube", "seed": 3, "num_inference_steps": 4, "guidance_scale": 1.5, "scheduler": "lcm"}
SCALES = {ACCELERATION_ID: 1.0, LORA_ID: 0.8}


@pytest.fixture(scope="module")
def acceleration_home(tmp_path_factory) -> Path:
    """The serving fine-tunes, and a random LoRA standing in for LCM-LoRA."""
    home = tmp_path_factory.mktemp("acceleration-home")
    register_finetunes(home)
    folder = save_lora_adapter(home / "models" / ACCELERATION_ID, seed=5, rank=8)
    write_entry(tiny_lora_entry(ACCELERATION_ID, folder), user_dir=home / "catalog")
    return home


@pytest.fixture(scope="module")
def acceleration_client(acceleration_home):
    with offline_server(acceleration_home) as url, httpx.Client(base_url=url, timeout=120) as http:
        yield http


def _served(client: httpx.Client, loras: list[str]) -> np.ndarray:
    body = {**FEW_STEPS, "loras": [{"model": lora_id, "scale": SCALES[lora_id]} for lora_id in loras]}
    response = client.post("/txt2img", json=body)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def _reference(acceleration_home) -> np.ndarray:
    """Both LoRAs applied by diffusers' own set_adapters, at the request's scales and sampler."""
    from catalog.pipelines import apply_lora
    from catalog.store import load_catalog
    from catalog.tiny_sd import build_tiny_sd_pipeline
    from serving.generation import BatchItem, generate_images

    catalog = load_catalog(user_dir=acceleration_home / "catalog")
    pipeline = build_tiny_sd_pipeline()
    names = [apply_lora(pipeline, catalog.get(lora_id)) for lora_id in SCALES]
    pipeline.set_adapters(names, list(SCALES.values()))
    [image] = generate_images(
        pipeline,
        [BatchItem(FEW_STEPS["prompt"], None, FEW_STEPS["seed"])],
        width=64,
        height=64,
        num_inference_steps=FEW_STEPS["num_inference_steps"],
        guidance_scale=FEW_STEPS["guidance_scale"],
        scheduler=FEW_STEPS["scheduler"],
    )
    return np.asarray(image)


def test_an_acceleration_lora_composes_with_a_subject_lora_at_four_lcm_steps(
    acceleration_client, acceleration_home, one_torch_thread
):
    base = _served(acceleration_client, [])
    accelerated = _served(acceleration_client, [ACCELERATION_ID])
    subject = _served(acceleration_client, [LORA_ID])
    composed = _served(acceleration_client, [ACCELERATION_ID, LORA_ID])
    assert len({image.tobytes() for image in (base, accelerated, subject, composed)}) == 4
    assert np.array_equal(_served(acceleration_client, [LORA_ID, ACCELERATION_ID]), composed)
    assert np.array_equal(composed, _reference(acceleration_home))
