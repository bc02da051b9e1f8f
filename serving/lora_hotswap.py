"""LoRAs on a compiled UNet without recompiling: a fixed set of adapter slots, filled by hot-swapping weights.

Under ``TXT2IMG_COMPILE`` a UNet is compiled once. Loading, deleting or switching adapters
(``load_lora_weights``, ``delete_adapters``, ``set_adapters``) changes the modules or the floats the compiled
graph was guarded on, and every such change recompiles. So a compiled pipeline keeps ``slot_count``
(``TXT2IMG_MAX_LORAS``) adapters of rank ``max_rank`` (``TXT2IMG_LORA_MAX_RANK``) on its UNet for its
whole life, all of them always active, their scalings turned into tensors (peft's
``prepare_model_for_compiled_hotswap``). Activating a request's set of LoRAs copies each one's weights
into a slot in place (diffusers' ``hotswap=True``), its strength into the slot's scaling tensors; a slot
the set does not need is zeroed, and a zero slot adds exactly nothing.

The slots cover the UNet's transformer layers that LoRA trainers (diffusers', kohya's) target; a LoRA with
layers elsewhere, of a higher rank, or with text-encoder layers (diffusers cannot hot-swap those) is refused.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from catalog.families import family
from catalog.pipelines import lora_weights_file
from catalog.schema import CatalogEntry
from serving.device import is_cuda
from serving.settings import ServingSettings
from txt2img.errors import InputError

# The UNet layers a slot covers: attention projections, the transformer's in/out projections and its
# feed-forward, which diffusers' and kohya's LoRA trainers target on Stable Diffusion's UNet.
SLOT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
UNET_PREFIX = "unet."
# LoRA files kept in memory, converted, so that a set seen before swaps in without reading its files again.
CACHED_STATE_DICTS = 32


class HotswapRefused(InputError, ValueError):
    """A LoRA that the fixed slots of a compiled pipeline cannot take; the message says what does not fit."""


@dataclass(frozen=True)
class SlotContent:
    """What a slot holds: a LoRA's catalog id and the strength folded into its weights."""

    lora_id: str
    scale: float


@dataclass
class LoraSlots:
    """The fixed adapter slots of one pipeline's UNet; ``prepare_slots`` makes them before compiling."""

    pipeline: object
    max_rank: int
    names: tuple[str, ...]
    contents: list[SlotContent | None]
    _state_dicts: OrderedDict[str, tuple[dict, dict | None]] = field(default_factory=OrderedDict)

    def activate(self, loras: Sequence[tuple[CatalogEntry, float]]) -> None:
        """Make the UNet apply exactly ``loras`` (each a LoRA entry and its scale): slots already holding a
        wanted (LoRA, scale) keep it, the others are swapped or zeroed. Nothing recompiles."""
        if len(loras) > len(self.names):
            raise HotswapRefused(
                f"{len(loras)} LoRAs asked for, but this compiled pipeline has {len(self.names)} slots"
            )
        wanted = {SlotContent(entry.id, float(scale)): entry for entry, scale in loras}
        missing = [content for content in wanted if content not in self.contents]
        free = [index for index, content in enumerate(self.contents) if content not in wanted]
        for content, index in zip(missing, free):
            self._swap_in(index, wanted[content], content.scale)
        for index in free[len(missing) :]:
            if self.contents[index] is not None:
                self._zero(index)

    def _swap_in(self, index: int, entry: CatalogEntry, scale: float) -> None:
        state_dict, network_alphas = self._unet_state_dict(entry)
        self._zero(index)  # layers the new LoRA lacks must not keep the old one's weights
        try:
            self.pipeline.load_lora_into_unet(
                dict(state_dict),
                network_alphas=network_alphas,
                unet=self.pipeline.unet,
                adapter_name=self.names[index],
                _pipeline=self.pipeline,
                hotswap=True,
            )
        except RuntimeError as error:  # peft's dry run found layers outside the slots; nothing was swapped
            raise HotswapRefused(f"LoRA '{entry.id}' does not fit the compiled pipeline's slots: {error}") from None
        name = self.names[index]
        for module in self._slot_layers(index):
            # The swap set the scaling tensor to alpha / rank; the strength multiplies it, as set_adapters' would.
            module.scaling[name].mul_(scale)
        self.contents[index] = SlotContent(entry.id, scale)

    def _zero(self, index: int) -> None:
        """Zero slot ``index``'s up-projections: the slot then adds exactly nothing."""
        name = self.names[index]
        for module in self._slot_layers(index):
            module.lora_B[name].weight.data.zero_()
        self.contents[index] = None

    def _slot_layers(self, index: int) -> list:
        """The UNet's LoRA layers that hold slot ``index``."""
        name = self.names[index]
        return [
            module for module in self.pipeline.unet.modules() if hasattr(module, "lora_B") and name in module.lora_B
        ]

    def _unet_state_dict(self, entry: CatalogEntry) -> tuple[dict, dict | None]:
        """The LoRA's UNet layers in diffusers' layout (kohya files converted), checked against the slots."""
        cached = self._state_dicts.get(entry.id)
        if cached is not None:
            self._state_dicts.move_to_end(entry.id)
            return cached
        weights = lora_weights_file(entry)
        state_dict, network_alphas = self.pipeline.lora_state_dict(str(weights))
        check_fits_slots(entry.id, state_dict, self.max_rank)
        self._state_dicts[entry.id] = (state_dict, network_alphas)
        if len(self._state_dicts) > CACHED_STATE_DICTS:
            self._state_dicts.popitem(last=False)
        return state_dict, network_alphas


def check_fits_slots(lora_id: str, state_dict: dict, max_rank: int) -> None:
    """Refuse a LoRA (diffusers-layout ``state_dict``) with text-encoder layers or a rank above ``max_rank``."""
    elsewhere = sorted(key for key in state_dict if not key.startswith(UNET_PREFIX))
    if elsewhere:
        raise HotswapRefused(
            f"LoRA '{lora_id}' has {len(elsewhere)} text-encoder layers (e.g. {elsewhere[0]}); a compiled "
            "pipeline hot-swaps UNet layers only: serve it without TXT2IMG_COMPILE"
        )
    ranks = {tensor.shape[0] for key, tensor in state_dict.items() if ".lora_A." in key or ".lora.down." in key}
    if ranks and max(ranks) > max_rank:
        raise HotswapRefused(
            f"LoRA '{lora_id}' has rank {max(ranks)}, above TXT2IMG_LORA_MAX_RANK={max_rank}; raise it and restart"
        )


def prepare_slots(pipeline, slot_count: int, max_rank: int) -> LoraSlots:
    """Give ``pipeline``'s UNet ``slot_count`` zero adapters of rank ``max_rank``, all active, ready for
    hot-swapping. Call it after loading and before compiling (serving/device.py ``optimize_for_device``)."""
    from peft import LoraConfig
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    names = tuple(f"slot{index}" for index in range(slot_count))
    for name in names:
        # init_lora_weights=True: random down-projections and zero up-projections, so an empty slot adds zero.
        config = LoraConfig(r=max_rank, lora_alpha=max_rank, target_modules=list(SLOT_TARGETS))
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: the slots are several
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipeline.unet.add_adapter(config, adapter_name=name)
    pipeline.unet.set_adapters(list(names))  # before the scalings become tensors: set_adapters rewrites them
    prepare_model_for_compiled_hotswap(pipeline.unet, target_rank=max_rank)
    return LoraSlots(pipeline=pipeline, max_rank=max_rank, names=names, contents=[None] * slot_count)


def takes_lora_slots(entry: CatalogEntry, settings: ServingSettings, device: str) -> bool:
    """Whether base ``entry``, once loaded, is compiled with LoRA slots (``compiled_lora_slots``)."""
    return settings.compile and is_cuda(device) and settings.max_loras > 0 and family(entry.family).lora


def compiled_lora_slots(pipeline, entry: CatalogEntry, settings: ServingSettings, device: str) -> LoraSlots | None:
    """The slots a base about to be compiled needs, made now; None when it will not be compiled (serving/device.py
    compiles on CUDA only) or takes no LoRAs. The pipeline manager calls it between loading a base and
    ``optimize_for_device``."""
    if not takes_lora_slots(entry, settings, device):
        return None
    return prepare_slots(pipeline, settings.max_loras, settings.lora_max_rank)
