"""Per-request LoRAs in-process (issue 23, items 2 to 4): exact semantics against diffusers' own
``set_adapters``, the batch key, and the adapter cache's budget, memory and speed.

The LoRAs are tiny-sd fine-tunes trained by ``txt2img train`` (conftest's ``composable_lora_home``).
"""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
from serving_finetunes import (
    FULL_LORA_ID,
    STYLE_LORA_ID,
    SUBJECT_LORA_ID,
    UNET_ATTENTION,
    save_lora_adapter,
    tiny_lora_entry,
    write_random_loras,
)

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


def test_requests_share_a_batch_by_base_whatever_their_unet_loras(composable_lora_home, tmp_path, monkeypatch):
    """UNet-only LoRA sets mix in one call (serving/mixed_loras.py); a set with text-encoder layers, or any set
    on a base compiled with hot-swap slots, keeps its own batches."""
    from catalog.store import load_catalog, write_entry

    text_lora = tiny_lora_entry("tiny-text-lora", save_lora_adapter(tmp_path / "text", text_encoder=True))
    written = write_entry(text_lora, user_dir=composable_lora_home / "catalog")
    try:
        check_batch_keys(load_catalog(), text_lora.id, monkeypatch)
    finally:  # the home is shared with other tests
        written.unlink()


def check_batch_keys(catalog, text_lora_id: str, monkeypatch) -> None:
    from serving.generation_queue import Job

    def key(manager, model_id: str, *loras: tuple[str, float]):
        weights = [LoraWeight(model=lora_id, scale=scale) for lora_id, scale in loras]
        request = GenerationRequest(prompt="a toy", num_inference_steps=STEPS, loras=weights)
        job = Job.create(catalog.get(model_id), request, 64, 64, 60)
        job.lora_group = manager.batch_group(job.entry, job.request.loras)  # what GenerationQueue.submit does
        return job.batch_key

    manager = make_manager()
    pair = key(manager, "tiny-sd", (SUBJECT_LORA_ID, 0.5), (STYLE_LORA_ID, 1.0))
    assert key(manager, "tiny-sd") == pair == key(manager, "tiny-sd", (SUBJECT_LORA_ID, 0.9))
    assert key(manager, SUBJECT_LORA_ID) == pair  # a LoRA asked for by id runs on its base
    assert key(manager, "tiny-full") != pair and key(manager, FULL_LORA_ID) == key(manager, "tiny-full")
    text = key(manager, "tiny-sd", (text_lora_id, 0.5))
    assert text != pair and text != key(manager, "tiny-sd", (text_lora_id, 0.5), (SUBJECT_LORA_ID, 1.0))
    assert text == key(manager, "tiny-sd", (text_lora_id, 0.5))
    assert key(manager, "tiny-sd", (text_lora_id, 0.0)) == pair  # scale 0: not in the set
    monkeypatch.setattr("serving.lora_hotswap.is_cuda", lambda device: True)
    slotted = make_manager(compile=True)
    assert key(slotted, "tiny-sd") != key(slotted, "tiny-sd", (SUBJECT_LORA_ID, 0.5))


MIXED_SETS = [(), ((SUBJECT_LORA_ID, 0.7), (STYLE_LORA_ID, -0.5)), ((STYLE_LORA_ID, 1.0),)]


def test_a_mixed_batch_gives_each_request_its_own_image_and_leaves_no_hook():
    check_mixed_batch(make_manager(), MIXED_SETS)


def check_mixed_batch(manager, sets: list[tuple[tuple[str, float], ...]]) -> None:
    """One call of one image per set, each the image its set gives alone, then no hook left."""
    from serving.generation import BatchItem, generate_images

    alone = [served(manager, "tiny-sd", *loras) for loras in sets]
    for index, image in enumerate(alone):  # each set draws its own image
        assert all(np.abs(image.astype(int) - other).max() > 10 for other in alone[index + 1 :])
    entry = manager.entry("tiny-sd")
    images = [(entry, [LoraWeight(model=lora_id, scale=scale) for lora_id, scale in loras]) for loras in sets]
    pipeline, mix = manager.pipeline_for_batch(images)
    assert mix is not None and len(mix.names) == 2
    items = [BatchItem("a photo of sks toy", None, SEED) for _ in sets]
    together = generate_images(
        pipeline, items, width=64, height=64, num_inference_steps=STEPS, guidance_scale=7.5, adapter_mix=mix
    )
    differences = [int(np.abs(np.asarray(image, dtype=int) - own).max()) for image, own in zip(together, alone)]
    assert max(differences) <= 2, differences  # what batching alone may round apart
    assert not wrapped_layers(pipeline.unet)
    for loras, own in zip(sets, alone):  # unbatched calls after it: as before, byte for byte
        assert served(manager, "tiny-sd", *loras).tobytes() == own.tobytes()


def test_a_mixed_batch_of_convolution_loras_gives_each_request_its_own_image(composable_lora_home, tmp_path):
    """LoRAs on the UNet's convolutions as well (as kohya's LoCon files have): its Conv2d layers weigh each
    adapter in turn, its Linear layers stacked."""
    from peft.tuners.lora.layer import Conv2d

    from catalog.store import write_entry

    targets = (*UNET_ATTENTION, "conv1", "conv2")
    written = []
    for seed, lora_id in enumerate(("tiny-conv-lora-a", "tiny-conv-lora-b")):
        folder = save_lora_adapter(tmp_path / lora_id, seed=seed, unet_targets=targets)
        written.append(write_entry(tiny_lora_entry(lora_id, folder), user_dir=composable_lora_home / "catalog"))
    try:
        sets = [(), (("tiny-conv-lora-a", 0.8),), (("tiny-conv-lora-a", 0.5), ("tiny-conv-lora-b", -0.7))]
        manager = make_manager()
        check_mixed_batch(manager, sets)
        unet = manager.pipeline_for(manager.entry("tiny-sd")).unet
        assert any(isinstance(module, Conv2d) and "tiny-conv-lora-b" in module.lora_A for module in unet.modules())
    finally:  # the home is shared with other tests
        for path in written:
            path.unlink()


def test_one_set_for_the_whole_batch_switches_adapters_as_for_one_request():
    manager = make_manager()
    entry = manager.entry("tiny-sd")
    weights = [LoraWeight(model=SUBJECT_LORA_ID, scale=0.7)]
    pipeline, mix = manager.pipeline_for_batch([(entry, weights), (manager.entry(SUBJECT_LORA_ID), [])])
    assert mix is not None  # the LoRA at 0.7, and the model's own adapter at 1.0: two sets
    pipeline, mix = manager.pipeline_for_batch([(entry, weights), (manager.entry(SUBJECT_LORA_ID), weights)])
    assert mix is None  # listed, the model's own adapter takes the listed scale: one set
    pipeline, mix = manager.pipeline_for_batch([(entry, weights), (entry, weights)])
    assert mix is None and pipeline.get_active_adapters() == [manager_adapter_name(SUBJECT_LORA_ID)]


def test_the_layers_own_forwards_come_back_when_a_mixed_call_fails():
    from serving.mixed_loras import AdapterMix, mixed_loras

    manager = make_manager()
    before = served(manager, "tiny-sd", (SUBJECT_LORA_ID, 0.7))
    unet = manager.pipeline_for(manager.entry("tiny-sd")).unet
    mix = AdapterMix((manager_adapter_name(SUBJECT_LORA_ID),), ((1.0,), (0.0,)))
    with pytest.raises(RuntimeError, match="interrupted"), mixed_loras(unet, mix):
        assert wrapped_layers(unet)
        raise RuntimeError("interrupted")
    assert not wrapped_layers(unet)
    assert served(manager, "tiny-sd", (SUBJECT_LORA_ID, 0.7)).tobytes() == before.tobytes()


def wrapped_layers(unet) -> list[str]:
    """UNet modules whose forward is an instance attribute: serving/mixed_loras.py's, while it runs."""
    return [name for name, module in unet.named_modules() if "forward" in vars(module)]


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
