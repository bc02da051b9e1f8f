"""Mixed-adapter batches: requests with different LoRA sets share one pipeline call (issue 23's bench target).

``set_adapters`` switches on one set of adapters, at one set of scales, for every image of a call. For the
call's duration, ``mixed_loras`` instead gives every peft LoRA ``Linear`` and ``Conv2d`` layer of the UNet a
forward that weighs each adapter per image:

    base(x) + sum_a w[image, a] * scaling_a * lora_B_a(lora_A_a(dropout_a(x)))

where ``w`` holds each image's scale of each adapter of the batch's union (0 where its set lacks it) and
``scaling_a`` is the adapter's own ``lora_alpha / r`` (peft's scale 1). On a Linear layer the adapters run
stacked: one down-projection of all their ranks, each image's scales on its rank blocks, one up-projection,
so that a call of 8 LoRAs costs about what a call of one does. The layers' own forwards come back
when the call ends, however it ends. Classifier-free guidance runs the UNet on [negatives, positives]
(diffusers' SD pipelines concatenate them in that order), twice the batch: the rows repeat per half.

A batch whose requests share one set uses plain ``set_adapters`` (serving/manager.py): no cost for the common
case. Two kinds of LoRA sets never mix, and stay in the batch key (serving/manager.py ``batch_group``):

* a LoRA with layers outside the UNet (its text encoder's): the text encoder runs per prompt in
  serving/prompts.py, with the adapters ``set_adapters`` switched on, not per image;
* any set on a compiled pipeline with hot-swap slots (serving/lora_hotswap.py): its slots hold one set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from catalog.checkpoint_files import ImportRefused, read_header
from catalog.lora_files import read_lora
from catalog.pipelines import lora_weights_file
from catalog.schema import CatalogEntry
from serving.adapters import AdapterSet


@dataclass(frozen=True)
class AdapterMix:
    """Each image's scale of each adapter of a batch: ``weights[image][index of the adapter in names]``."""

    names: tuple[str, ...]  # the adapters' names in the pipeline's modules, the union of the batch's sets
    weights: tuple[tuple[float, ...], ...]

    @classmethod
    def of(cls, sets: Sequence[AdapterSet], name_of) -> AdapterMix:
        """The mix of one AdapterSet per image; ``name_of`` gives a catalog id's adapter name."""
        union = sorted({lora_id for adapters in sets for lora_id, _ in adapters})
        weights = tuple(tuple(dict(adapters).get(lora_id, 0.0) for lora_id in union) for adapters in sets)
        return cls(tuple(name_of(lora_id) for lora_id in union), weights)

    def rows(self, indices: Sequence[int]) -> AdapterMix:
        """The mix of the images at ``indices`` (one pipeline call of serving/generation.py)."""
        return AdapterMix(self.names, tuple(self.weights[index] for index in indices))


def adapts_unet_only(entry: CatalogEntry) -> bool:
    """Whether every layer of LoRA ``entry``'s file adapts the UNet: such LoRAs mix in one call. Read from
    the file's header (cached while the file is unchanged); a file that cannot be read mixes with nothing."""
    path = lora_weights_file(entry)
    try:
        modified = path.stat().st_mtime_ns
    except OSError:
        return False
    return _header_adapts_unet_only(path, modified)


@lru_cache(maxsize=1024)
def _header_adapts_unet_only(path: Path, modified: int) -> bool:
    try:
        lora = read_lora(read_header(path), path)
    except (ImportRefused, OSError, ValueError):
        return False
    return not lora.unknown and all(tensor.component == "unet" for tensor in lora.tensors)


@contextmanager
def mixed_loras(unet, mix: AdapterMix) -> Iterator[None]:
    """For the ``with`` block, every peft LoRA Linear and Conv2d layer of ``unet`` weighs the adapters of
    ``mix`` per image; their own forwards come back afterwards, even on error or interrupt."""
    import torch
    from peft.tuners.lora import layer as lora_layers

    weights = torch.tensor(mix.weights, dtype=torch.float32)
    wrapped = []
    try:
        for module in unet.modules():
            if isinstance(module, (lora_layers.Linear, lora_layers.Conv2d)):
                own = module.__dict__.get("forward")
                wrapped.append((module, own))
                module.forward = _mixed_forward(module, mix.names, weights)
        yield
    finally:
        for module, own in wrapped:
            if own is None:
                del module.forward
            else:
                module.forward = own


def _mixed_forward(module, names: tuple[str, ...], weights):
    """``module``'s forward with each image's weights of ``names`` (``weights``: images x adapters)."""
    from peft.tuners.lora import layer as lora_layers

    present = [(column, name) for column, name in enumerate(names) if name in module.lora_A]
    variants = [name for _, name in present if name in getattr(module, "lora_variant", {})]
    if variants:  # DoRA and other variants compute more than a product of two matrices
        raise ValueError(f"LoRA adapters {variants} are not plain LoRA, and cannot share a pipeline call")
    columns = [(column, name, _unit_scaling(module, name)) for column, name in present]
    if isinstance(module, lora_layers.Linear) and _stackable(module, [name for _, name in present]):
        return _stacked_linear_forward(module, columns, weights)
    return _per_adapter_forward(module, columns, weights)


def _stackable(module, names: list[str]) -> bool:
    """Whether the adapters are two bias-free products with no dropout at work, so that they stack."""
    biased = any(module.lora_B[name].bias is not None for name in names)
    dropping = module.training and any(getattr(module.lora_dropout[name], "p", 0) for name in names)
    return not biased and not dropping


def _stacked_linear_forward(module, columns: list, weights):
    """A Linear layer's forward that runs every adapter at once: their down-projections stacked into one
    matrix, each image's scales applied to its rank block, then their up-projections stacked side by side.
    Two matrix products whatever the number of adapters: the cost of a batch of 8 LoRAs is about one's."""
    import torch

    plans: dict = {}  # (batch, ndim, device) -> (down, up, scales) or None, made once per call

    def plan_for(batch: int, ndim: int, device):
        key = (batch, ndim, device)
        if key not in plans:
            rows = _rows_for(weights, batch)
            taken = [(column, name, unit) for column, name, unit in columns if rows[:, column].any()]
            if not taken:  # no image of this call takes an adapter of this layer
                plans[key] = None
                return None
            down = torch.cat([module.lora_A[name].weight for _, name, _ in taken]).to(device)
            up = torch.cat([module.lora_B[name].weight for _, name, _ in taken], dim=1).to(device)
            block_scales = [
                (rows[:, column] * unit).unsqueeze(1).expand(batch, module.r[name]) for column, name, unit in taken
            ]
            shape = (batch,) + (1,) * (ndim - 2) + (down.shape[0],)
            scales = torch.cat(block_scales, dim=1).reshape(shape).to(device=device, dtype=down.dtype)
            plans[key] = (down, up, scales)
        return plans[key]

    def forward(x, *args, **kwargs):
        result = module.base_layer(x, *args, **kwargs)
        plan = plan_for(x.shape[0], x.dim(), x.device)
        if plan is None:
            return result
        down, up, scales = plan
        hidden = torch.nn.functional.linear(module._cast_input_dtype(x, down.dtype), down) * scales
        return (result + torch.nn.functional.linear(hidden, up)).to(result.dtype)

    return forward


def _per_adapter_forward(module, columns: list, weights):
    """A layer's forward that runs each adapter in turn, as peft does, each image's output scaled by its
    weight: for Conv2d layers, and adapters with a bias or a dropout at work."""
    scales_by_batch: dict = {}  # (batch, ndim, device, dtype) -> [(name, per-image scales)], made once per call

    def scales_for(batch: int, ndim: int, device, dtype) -> list:
        key = (batch, ndim, device, dtype)
        if key not in scales_by_batch:
            rows = _rows_for(weights, batch)
            shape = (batch,) + (1,) * (ndim - 1)
            scales_by_batch[key] = [
                (name, (rows[:, column] * unit).reshape(shape).to(device=device, dtype=dtype))
                for column, name, unit in columns
                if rows[:, column].any()  # an adapter no image of this call takes costs nothing
            ]
        return scales_by_batch[key]

    def forward(x, *args, **kwargs):
        result = module.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name, scales in scales_for(x.shape[0], result.dim(), result.device, result.dtype):
            lora_a = module.lora_A[name]
            adapted = module._cast_input_dtype(x, lora_a.weight.dtype)
            delta = module.lora_B[name](lora_a(module.lora_dropout[name](adapted)))
            result = result + delta * scales.to(delta.dtype)
        return result.to(result_dtype)

    return forward


def _unit_scaling(module, name: str) -> float:
    """The adapter's scaling at scale 1, as peft's ``set_scale`` computes it."""
    rank = module.r[name]
    divisor = rank**0.5 if module.use_rslora.get(name, False) else rank
    return module.lora_alpha[name] / divisor


def _rows_for(weights, batch: int):
    """The weights' rows for a UNet batch of ``batch``: the images', repeated per guidance half."""
    images = weights.shape[0]
    if batch % images:
        raise ValueError(f"a UNet batch of {batch} is no multiple of the call's {images} images")
    return weights.repeat(batch // images, 1)
