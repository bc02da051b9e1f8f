"""The pipeline manager in-process (LRU by count and by bytes, LoRAs sharing their base, catalog ids
only), and its LRU order once more through a real ``bentoml serve``."""

from __future__ import annotations

import httpx
import pytest
from bentoml_server import running_server
from serving_finetunes import FULL_ID, LORA_ID, OTHER_FULL_ID, register_finetunes


@pytest.fixture(scope="module")
def finetuned_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    register_finetunes(home)
    return home


@pytest.fixture(autouse=True)
def use_finetuned_home(finetuned_home, monkeypatch):
    """Every test here reads the catalog holding the fine-tunes."""
    monkeypatch.setenv("TXT2IMG_HOME", str(finetuned_home))


def make_manager(**settings):
    from serving.manager import PipelineManager
    from serving.settings import ServingSettings

    # One torch thread: the test machine's two cores are shared, and oversubscribed threads crawl.
    return PipelineManager(ServingSettings(**{"device": "cpu", "torch_threads": 1, **settings}))


def test_count_bound_evicts_least_recently_used():
    manager = make_manager(max_loaded_models=2)
    catalog = manager.catalog
    manager.pipeline_for(catalog.get("tiny-sd"))
    manager.pipeline_for(catalog.get(FULL_ID))
    manager.pipeline_for(catalog.get("tiny-sd"))  # now FULL_ID is the least recently used
    assert manager.loaded_ids() == [FULL_ID, "tiny-sd"]
    manager.pipeline_for(catalog.get(OTHER_FULL_ID))
    assert manager.loaded_ids() == ["tiny-sd", OTHER_FULL_ID]


def test_memory_budget_evicts_before_loading():
    from serving.device import weights_bytes

    probe = make_manager()
    size = weights_bytes(probe.pipeline_for(probe.catalog.get("tiny-sd")))
    manager = make_manager(max_loaded_models=10, memory_budget_gb=1.5 * size / 2**30)
    manager.pipeline_for(manager.catalog.get("tiny-sd"))
    manager.pipeline_for(manager.catalog.get(FULL_ID))
    assert manager.loaded_ids() == [FULL_ID]
    assert manager.resident_bytes() == size


def test_memory_budget_holds_at_the_peak_while_a_model_loads(monkeypatch):
    """Room is made before a model reaches the device, so the device never holds more than the budget.

    On the CPU the device is simulated: a pipeline counts as on it from the manager's move
    (optimize_for_device) until nothing references it any more.
    """
    import gc
    import weakref

    import serving.manager
    from serving.device import weights_bytes

    probe = make_manager()
    size = weights_bytes(probe.pipeline_for(probe.catalog.get("tiny-sd")))
    budget = 1.5 * size
    on_device = weakref.WeakSet()
    peaks = []
    move = serving.manager.optimize_for_device

    def move_and_measure(pipeline, device, settings):
        gc.collect()  # an evicted pipeline nothing references is off the device
        on_device.add(pipeline)
        peaks.append(sum(weights_bytes(resident) for resident in on_device))
        return move(pipeline, device, settings)

    monkeypatch.setattr(serving.manager, "optimize_for_device", move_and_measure)
    manager = make_manager(max_loaded_models=10, memory_budget_gb=budget / 2**30)
    for model_id in ("tiny-sd", FULL_ID, OTHER_FULL_ID):
        manager.pipeline_for(manager.catalog.get(model_id))
    assert manager.loaded_ids() == [OTHER_FULL_ID]
    assert peaks == [size, size, size]  # never two models on the device at once
    assert max(peaks) <= budget


def test_lora_shares_its_base_and_switches_adapters():
    import torch

    from serving.generation import BatchItem, generate_images

    manager = make_manager(max_loaded_models=1)
    catalog = manager.catalog

    def image(model_id):
        pipeline = manager.pipeline_for(catalog.get(model_id))
        items = [BatchItem("a red cube", None, 7)]
        return pipeline, torch.tensor(
            list(
                generate_images(pipeline, items, width=64, height=64, num_inference_steps=2, guidance_scale=7.5)[
                    0
                ].getdata()
            )
        )

    base_pipeline, base_before = image("tiny-sd")
    lora_pipeline, lora = image(LORA_ID)
    _, base_after = image("tiny-sd")
    assert lora_pipeline is base_pipeline  # one base in memory, not two
    assert manager.loaded_ids() == ["tiny-sd", LORA_ID]
    assert not torch.equal(lora, base_before)  # the adapter is applied...
    assert torch.equal(base_after, base_before)  # ...and switched off again for the base


def test_only_catalog_ids_load(tmp_path):
    from catalog.index import UnknownModelError

    manager = make_manager()
    for name in ("runwayml/stable-diffusion-v1-5", str(tmp_path), "../tiny-sd"):
        with pytest.raises(UnknownModelError):
            manager.entry(name)


def test_eviction_releases_gpu_memory():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    manager = make_manager(device="cuda", max_loaded_models=1)
    before = torch.cuda.memory_allocated()
    manager.pipeline_for(manager.catalog.get("tiny-sd"))
    with_one_model = torch.cuda.memory_allocated()
    manager.pipeline_for(manager.catalog.get(FULL_ID))  # evicts tiny-sd
    assert with_one_model > before
    assert torch.cuda.memory_allocated() - before <= (with_one_model - before) * 1.05


def test_a_server_with_two_slots_evicts_the_least_recently_used_of_three_models(finetuned_home):
    with running_server(finetuned_home, max_loaded_models="2", torch_threads="1") as url:

        def generate(model: str) -> list[str]:
            body = {"prompt": "a red cube", "model": model, "num_inference_steps": 1, "width": 64, "height": 64}
            assert httpx.post(f"{url}/txt2img", json=body, timeout=120).status_code == 200
            return httpx.get(f"{url}/models", timeout=30).json()["loaded"]

        assert set(generate(FULL_ID)) == {"tiny-sd", FULL_ID}  # tiny-sd was warmed first
        generate("tiny-sd")  # now FULL_ID is the least recently used, though tiny-sd came first
        assert set(generate(OTHER_FULL_ID)) == {"tiny-sd", OTHER_FULL_ID}
        assert set(generate(FULL_ID)) == {OTHER_FULL_ID, FULL_ID}
