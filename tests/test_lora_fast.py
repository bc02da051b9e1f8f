"""Few-step samplers for acceleration LoRAs, and LoRAs on a compiled UNet (issue 23, items 8 and 5).

``lcm`` and ``tcd`` are samplers of the Stable Diffusion families (not of Flux), under their own diffusers
classes and AUTOMATIC1111's names. Under ``TXT2IMG_COMPILE`` a pipeline keeps fixed adapter slots and
hot-swaps LoRAs into them (serving/lora_hotswap.py): swapping through LoRAs of different ranks and alphas
never recompiles, and a set in the slots gives the image diffusers' own adapters give at those scales.
"""

from __future__ import annotations

import numpy as np
import pytest
from serving_finetunes import save_lora_adapter, tiny_lora_entry

from catalog.families import FAMILIES, FAMILY_NAMES
from catalog.schema import CatalogEntry
from serving.a1111 import SAMPLER_LOOKUP, A1111RequestError, sampler_scheduler
from serving.infotext import A1111_SAMPLERS
from serving.lora_hotswap import HotswapRefused, prepare_slots
from serving.schema import SCHEDULER_CLASSES, LimitExceeded

FEW_STEP_SAMPLERS = ("lcm", "tcd")


def _image(pipeline, scheduler: str | None = None, steps: int = 2, guidance_scale: float = 7.5) -> np.ndarray:
    from serving.generation import BatchItem, generate_images

    [image] = generate_images(
        pipeline,
        [BatchItem("a red cube", None, 0)],
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
    )
    return np.asarray(image)


# Few-step samplers


def test_lcm_and_tcd_are_samplers_of_the_stable_diffusion_families_and_not_of_flux():
    for name in FAMILY_NAMES:
        takes_them = all(sampler in FAMILIES[name].schedulers for sampler in FEW_STEP_SAMPLERS)
        assert takes_them != FAMILIES[name].flow_matching, name


def test_lcm_and_tcd_run_as_diffusers_own_few_step_schedulers_on_the_models_schedule():
    from catalog.tiny_sd import build_tiny_sd_pipeline
    from serving.generation import fresh_scheduler

    pipeline = build_tiny_sd_pipeline()
    for name, class_name in (("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")):
        scheduler = fresh_scheduler(pipeline, name)
        assert type(scheduler).__name__ == class_name
        assert scheduler.config.prediction_type == pipeline.scheduler.config.prediction_type  # tiny-sd: v


def test_a_few_step_sampler_refuses_more_steps_than_its_distillation_schedule_holds(one_torch_thread):
    from catalog.tiny_sd import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline()
    for name in FEW_STEP_SAMPLERS:
        with pytest.raises(LimitExceeded) as refused:
            _image(pipeline, scheduler=name, steps=51, guidance_scale=1.0)
        assert (refused.value.field, refused.value.limit, refused.value.value) == ("num_inference_steps", 50, 51)


def test_a_few_step_sampler_makes_a_four_step_image_at_low_guidance(one_torch_thread):
    from catalog.tiny_sd import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline()
    images = [_image(pipeline, scheduler=name, steps=4, guidance_scale=1.5) for name in (None, *FEW_STEP_SAMPLERS)]
    assert all(image.std() > 0 for image in images)
    assert len({image.tobytes() for image in images}) == 3  # each sampler its own image


def test_every_scheduler_has_an_automatic1111_name_and_lcm_is_a1111s_own():
    assert set(A1111_SAMPLERS) == set(SCHEDULER_CLASSES)  # an infotext names every sampler
    assert SAMPLER_LOOKUP["lcm"] == SAMPLER_LOOKUP["k_lcm"] == "LCM"
    assert sampler_scheduler("LCM", FAMILIES["sd1"]) == "lcm"
    assert sampler_scheduler("TCD", FAMILIES["sdxl"]) == "tcd"
    with pytest.raises(A1111RequestError, match="sampler 'LCM' does not fit a flux model"):
        sampler_scheduler("LCM", FAMILIES["flux"])


# Hot-swapping into the fixed slots of a compiled UNet

SLOT_COUNT = 2
MAX_RANK = 8


@pytest.fixture(scope="module")
def swap_loras(tmp_path_factory) -> list[CatalogEntry]:
    """Three LoRAs of tiny-sd of different ranks and alphas (so different scalings), and a fourth of rank 16."""
    root = tmp_path_factory.mktemp("swap-loras")
    shapes = {"rank2": (2, 1, 11), "rank4": (4, 8, 12), "rank8": (8, 3, 13), "rank16": (16, 16, 14)}
    return [
        tiny_lora_entry(name, save_lora_adapter(root / name, rank=rank, alpha=alpha, seed=seed))
        for name, (rank, alpha, seed) in shapes.items()
    ]


def test_swapping_through_three_loras_on_a_compiled_unet_never_recompiles(swap_loras, one_torch_thread):
    import torch

    from catalog.tiny_sd import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    base = _image(pipeline)
    slots = prepare_slots(pipeline, SLOT_COUNT, MAX_RANK)
    torch._dynamo.reset()
    pipeline.unet.compile_repeated_blocks(fullgraph=True)  # as serving/device.py compiles under TXT2IMG_COMPILE
    assert np.array_equal(_image(pipeline), base)  # empty slots add nothing; this call compiles
    images = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for entry in swap_loras[:3]:
            slots.activate([(entry, 1.0)])
            images.append(_image(pipeline))
        slots.activate([(swap_loras[0], 0.5), (swap_loras[2], 1.0)])
        images.append(_image(pipeline))
        slots.activate([])
        assert np.array_equal(_image(pipeline), base)
        # What the slots avoid does recompile: diffusers' set_adapters turns the scalings back into floats.
        pipeline.unet.set_adapters(list(slots.names), [0.5] * SLOT_COUNT)
        with pytest.raises(torch._dynamo.exc.RecompileError):
            _image(pipeline)
    torch._dynamo.reset()
    assert len({image.tobytes() for image in [base, *images]}) == 5  # each set changed the image its own way


def test_a_set_in_the_slots_gives_the_image_of_diffusers_own_adapters_at_those_scales(swap_loras, one_torch_thread):
    from catalog.pipelines import apply_lora
    from catalog.tiny_sd import build_tiny_sd_pipeline

    chosen = [(swap_loras[1], 0.6), (swap_loras[2], -0.8)]
    reference = build_tiny_sd_pipeline()
    names = [apply_lora(reference, entry) for entry, _ in chosen]
    reference.set_adapters(names, [scale for _, scale in chosen])
    expected = _image(reference)

    pipeline = build_tiny_sd_pipeline()
    slots = prepare_slots(pipeline, SLOT_COUNT, MAX_RANK)
    slots.activate([(swap_loras[0], 1.0)])  # a LoRA swapped out again must leave nothing behind
    slots.activate(chosen)
    assert np.array_equal(_image(pipeline), expected)
    slots.activate(list(reversed(chosen)))  # the same set: kept in its slots, the same image
    assert np.array_equal(_image(pipeline), expected)


def test_loras_the_slots_cannot_take_are_refused_saying_why(swap_loras, tmp_path, one_torch_thread):
    from catalog.tiny_sd import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline()
    slots = prepare_slots(pipeline, SLOT_COUNT, MAX_RANK)
    with pytest.raises(HotswapRefused, match="LoRA 'rank16' has rank 16, above TXT2IMG_LORA_MAX_RANK=8"):
        slots.activate([(swap_loras[3], 1.0)])
    with pytest.raises(HotswapRefused, match="3 LoRAs asked for, but this compiled pipeline has 2 slots"):
        slots.activate([(entry, 1.0) for entry in swap_loras[:3]])
    text_encoder = swap_loras[0].model_copy(
        update={"id": "with-te", "artifact": str(save_lora_adapter(tmp_path / "te", text_encoder=True))}
    )
    with pytest.raises(HotswapRefused, match="LoRA 'with-te' has .* text-encoder layers"):
        slots.activate([(text_encoder, 1.0)])
    slots.activate([(swap_loras[0], 1.0)])  # the refusals left the slots usable
    assert slots.contents[0] is not None


def test_only_a_base_that_will_be_compiled_gets_slots_one_per_lora_a_request_may_apply():
    from catalog.store import load_catalog
    from catalog.tiny_sd import build_tiny_sd_pipeline
    from serving.lora_hotswap import compiled_lora_slots
    from serving.settings import ServingSettings

    tiny_sd = load_catalog().get("tiny-sd")
    compiled = ServingSettings(compile=True, max_loras=3, lora_max_rank=16)
    assert compiled_lora_slots(build_tiny_sd_pipeline(), tiny_sd, compiled, "cpu") is None  # compiled on CUDA only
    assert compiled_lora_slots(build_tiny_sd_pipeline(), tiny_sd, ServingSettings(), "cuda:0") is None
    slots = compiled_lora_slots(build_tiny_sd_pipeline(), tiny_sd, compiled, "cuda:0")
    assert (slots.names, slots.max_rank) == (("slot0", "slot1", "slot2"), 16)
    ranks = {module.r[name] for module in slots.pipeline.unet.modules() if hasattr(module, "r") for name in module.r}
    assert ranks == {16}
