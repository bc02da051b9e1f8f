"""Per-request LoRAs in-process (issue 23, items 2 to 4): exact semantics against diffusers' own
``set_adapters``, the batch key, and the adapter cache's budget, memory and speed.

The LoRAs are tiny-sd fine-tunes trained by ``txt2img train`` (conftest's ``composable_lora_home``).
"""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
from serving_finetunes import FULL_LORA_ID, STYLE_LORA_ID, SUBJECT_LORA_ID, write_random_loras

from catalog.pipelines import lora_weights_file
from serving.schema import GenerationRequest, LoraWeight

STEPS = 3
SEED = 11


@pytest.fixture(autouse=True)
def use_lora_home(composable_lora_home, monkeypatch, one_torch_thread):
    """Every test here reads the catalog holding the LoRAs."""
    monkeypatch.setenv("TXT2IMG_HOME", str(composable_lora_home))


def make_manager(**settings):
    from serving.manager import PipelineManager
    from serving.settings import ServingSettings

    return PipelineManager(ServingSettings(**{"device": "cpu", **settings}))


def draw(pipeline) -> np.ndarray:
    """One 64 px image of a fixed prompt and seed, as pixels."""
    from serving.generation import BatchItem, generate_images

    items = [BatchItem("a photo of sks toy", None, SEED)]
    (image,) = generate_images(pipeline, items, width=64, height=64, num_inference_steps=STEPS, guidance_scale=7.5)
    return np.asarray(image)


def served(manager, model_id: str, *loras: tuple[str, float]) -> np.ndarray:
    weights = [LoraWeight(model=lora_id, scale=scale) for lora_id, scale in loras]
    return draw(manager.pipeline_for(manager.entry(model_id), weights))


def test_scale_zero_gives_the_base_image_byte_for_byte():
    manager = make_manager()
    base = served(manager, "tiny-sd")
    assert not np.array_equal(served(manager, "tiny-sd", (SUBJECT_LORA_ID, 1.0)), base)  # the LoRA does change it
    assert served(manager, "tiny-sd", (SUBJECT_LORA_ID, 0.0)).tobytes() == base.tobytes()
    assert served(manager, SUBJECT_LORA_ID, (SUBJECT_LORA_ID, 0.0)).tobytes() == base.tobytes()
    assert served(manager, "tiny-sd").tobytes() == base.tobytes()  # and nothing stays on afterwards


def test_one_lora_at_scale_one_is_that_fine_tune_served_by_its_id():
    manager = make_manager()
    by_id = served(manager, SUBJECT_LORA_ID)
    composed = served(manager, "tiny-sd", (SUBJECT_LORA_ID, 1.0))
    assert composed.tobytes() == by_id.tobytes()
    # The model's own adapter plus a listed one: the same as both listed on the base.
    both = served(manager, SUBJECT_LORA_ID, (STYLE_LORA_ID, 0.6))
    assert both.tobytes() == served(manager, "tiny-sd", (STYLE_LORA_ID, 0.6), (SUBJECT_LORA_ID, 1.0)).tobytes()


def diffusers_reference(scales: dict[str, float]) -> np.ndarray:
    """tiny-sd with the LoRAs applied by diffusers' own load_lora_weights and set_adapters, no txt2img code."""
    from catalog.store import load_catalog
    from catalog.tiny_sd import build_tiny_sd_pipeline

    catalog = load_catalog()
    pipeline = build_tiny_sd_pipeline()
    for index, lora_id in enumerate(scales):
        weights = lora_weights_file(catalog.get(lora_id))
        pipeline.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=f"reference{index}")
    pipeline.set_adapters([f"reference{index}" for index in range(len(scales))], list(scales.values()))
    return draw(pipeline)


def test_two_loras_match_diffusers_set_adapters_at_their_scales_in_any_order():
    manager = make_manager()
    scales = {SUBJECT_LORA_ID: 0.7, STYLE_LORA_ID: -0.5}
    composed = served(manager, "tiny-sd", *scales.items())
    reversed_order = served(manager, "tiny-sd", *reversed(scales.items()))
    assert reversed_order.tobytes() == composed.tobytes()
    reference = diffusers_reference(scales)
    assert np.abs(composed.astype(int) - reference.astype(int)).max() <= 1  # sums of adapters may round apart
    at_one = served(manager, "tiny-sd", (SUBJECT_LORA_ID, 1.0), (STYLE_LORA_ID, 1.0))
    assert np.abs(at_one.astype(int) - reference.astype(int)).max() > 8  # the scales matter


def test_only_requests_with_the_same_adapters_and_scales_share_a_batch():
    from catalog.store import load_catalog
    from serving.generation_queue import Job

    entry = load_catalog().get("tiny-sd")

    def key(*loras: tuple[str, float]):
        weights = [LoraWeight(model=lora_id, scale=scale) for lora_id, scale in loras]
        request = GenerationRequest(prompt="a toy", num_inference_steps=STEPS, loras=weights)
        return Job.create(entry, request, 64, 64, 60).batch_key

    pair = key((SUBJECT_LORA_ID, 0.5), (STYLE_LORA_ID, 1.0))
    assert key((STYLE_LORA_ID, 1.0), (SUBJECT_LORA_ID, 0.5)) == pair  # list order is no difference
    assert key((SUBJECT_LORA_ID, 0.5)) != pair
    assert key((SUBJECT_LORA_ID, 0.5), (STYLE_LORA_ID, 0.9)) != pair
    assert key() != key((SUBJECT_LORA_ID, 0.5))
    assert key() == key((SUBJECT_LORA_ID, 0.0))  # scale 0 draws the base's image


def test_each_refused_lora_names_itself():
    from serving.adapters import LoraRefused, UnknownLora
    from serving.schema import LimitExceeded, check_limits
    from serving.settings import ServingSettings

    manager = make_manager()
    base = manager.entry("tiny-sd")

    def refusal(entry, *lora_ids: str) -> LoraRefused:
        with pytest.raises(LoraRefused) as raised:
            manager.check_loras(entry, [LoraWeight(model=lora_id) for lora_id in lora_ids])
        return raised.value

    unknown = refusal(base, "tiny-subject-lor")
    assert isinstance(unknown, UnknownLora) and unknown.http_status == 404
    assert SUBJECT_LORA_ID in unknown.as_json()["suggestions"]
    assert "'tiny-full'" in str(refusal(base, "tiny-full"))  # a full model, not a LoRA
    assert "listed twice" in str(refusal(base, STYLE_LORA_ID, STYLE_LORA_ID))
    wrong_base = refusal(base, STYLE_LORA_ID, FULL_LORA_ID)
    assert f"'{FULL_LORA_ID}' needs base 'tiny-full'" in str(wrong_base)
    assert wrong_base.as_json()["loras"] == [{"model": FULL_LORA_ID, "base": "tiny-full"}]
    manager.check_loras(manager.entry(SUBJECT_LORA_ID), [LoraWeight(model=STYLE_LORA_ID)])  # a LoRA's base counts
    manager.check_loras(manager.entry("tiny-full"), [LoraWeight(model=FULL_LORA_ID)])
    request = GenerationRequest(
        prompt="a toy", num_inference_steps=2, loras=[LoraWeight(model=f"l{n}") for n in range(3)]
    )
    with pytest.raises(LimitExceeded, match="loras is 3, above the limit of 2"):
        check_limits(request, ServingSettings(max_loras=2), 64, 64)


def test_a_calls_own_adapters_stay_loaded_beyond_the_budget():
    manager = make_manager(lora_cache_mb=0.000001)  # room for no adapter at all
    both = served(manager, "tiny-sd", (SUBJECT_LORA_ID, 0.7), (STYLE_LORA_ID, -0.5))
    assert np.abs(both.astype(int) - diffusers_reference({SUBJECT_LORA_ID: 0.7, STYLE_LORA_ID: -0.5})).max() <= 1
    assert sorted(manager.loaded_ids()) == sorted(["tiny-sd", SUBJECT_LORA_ID, STYLE_LORA_ID])
    served(manager, "tiny-sd", (FULL_LORA_ID, 0.0))  # no adapter switched on: nothing to load or evict
    assert sorted(manager.loaded_ids()) == sorted(["tiny-sd", SUBJECT_LORA_ID, STYLE_LORA_ID])
    assert served(manager, SUBJECT_LORA_ID).tobytes() == served(make_manager(), SUBJECT_LORA_ID).tobytes()
    assert manager.loaded_ids() == ["tiny-sd", SUBJECT_LORA_ID]  # the style LoRA unloaded for it


@pytest.fixture(scope="module")
def random_loras(composable_lora_home) -> list[str]:
    """20 LoRAs of tiny-sd of some 6 MiB each: cheap to make, and big enough to show in RSS if kept."""
    return write_random_loras(composable_lora_home, 20, rank=256)


def test_cycling_twenty_loras_keeps_memory_and_activation_time_flat(random_loras):
    budget_mb = 4 * 6.2  # four adapters
    manager = make_manager(lora_cache_mb=budget_mb)
    base = manager.entry("tiny-sd")
    process = psutil.Process()
    seconds, rss_after = [], {}
    for activation in range(200):
        lora_id = random_loras[activation % len(random_loras)]
        started = time.perf_counter()
        pipeline = manager.pipeline_for(base, [LoraWeight(model=lora_id, scale=0.8)])
        seconds.append(time.perf_counter() - started)
        loaded = manager.loaded_ids()[1:]
        assert loaded[-1] == lora_id and len(loaded) <= 4
        assert set(pipeline.unet.peft_config) == {manager_adapter_name(lora) for lora in loaded}  # the rest unloaded
        assert pipeline.get_active_adapters() == [manager_adapter_name(lora_id)]
        rss_after[activation + 1] = process.memory_info().rss
    assert manager.adapter_bytes() <= budget_mb * 2**20
    assert rss_after[200] <= rss_after[20] * 1.05, (rss_after[20], rss_after[200])
    first, last = np.median(seconds[20:60]), np.median(seconds[-40:])
    assert last < 2 * first, (first, last)  # generous: the cores are shared; a growing cost doubles it


def manager_adapter_name(lora_id: str) -> str:
    """The adapter name catalog/pipelines.py's apply_lora gives a LoRA."""
    return lora_id.replace(".", "_")


def test_a_lora_that_cannot_load_fails_its_request_and_leaves_the_base_served(composable_lora_home, tmp_path):
    from catalog.pipelines import ModelLoadError
    from catalog.schema import CatalogEntry
    from catalog.store import write_entry
    from serving.adapters import LoraLoadError

    gone = CatalogEntry(
        id="tiny-gone-lora", source="finetune", family="tiny", resolution=64, base="tiny-sd", method="lora",
        artifact=str(tmp_path / "deleted"),
    )  # fmt: skip
    write_entry(gone, user_dir=composable_lora_home / "catalog")
    manager = make_manager()
    base = served(manager, "tiny-sd")
    with pytest.raises(LoraLoadError, match="tiny-gone-lora") as raised:
        served(manager, "tiny-sd", (gone.id, 1.0))
    assert raised.value.http_status == 503
    assert not isinstance(raised.value, ModelLoadError)  # the queue does not refuse the base for a minute
    assert served(manager, "tiny-sd").tobytes() == base.tobytes()


def test_a_base_compiled_with_lora_slots_takes_each_requests_loras_through_the_slots(monkeypatch):
    """The manager's compiled path (serving/lora_hotswap.py wired into serving/manager.py): slots are made at load
    and a request's set is swapped into them, giving the image the adapter cache gives. Slots are made for CUDA
    only; here the check is told the CPU is CUDA, and the UNet stays uncompiled (device.py compiles on CUDA)."""
    monkeypatch.setattr("serving.lora_hotswap.is_cuda", lambda device: True)
    slotted = make_manager(compile=True)
    plain = make_manager()
    scales = ((SUBJECT_LORA_ID, 0.7), (STYLE_LORA_ID, -0.5))
    composed = served(slotted, "tiny-sd", *scales)
    base = slotted._bases["tiny-sd"]
    assert base.slots is not None and not base.adapters  # the slots, never the adapter cache
    assert np.abs(composed.astype(int) - served(plain, "tiny-sd", *scales).astype(int)).max() <= 1
    assert served(slotted, "tiny-sd").tobytes() == served(plain, "tiny-sd").tobytes()  # slots zeroed: the base
