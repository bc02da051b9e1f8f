"""LoRA adapter files in and out (issue 23, items 6 and 7).

In: a ``.safetensors`` LoRA is judged from its header alone (catalog/checkpoint_files.read_header):
its format (diffusers/peft keys ``unet.<module>.lora_A.weight``, ``.lora.down.weight``, or kohya /
AUTOMATIC1111 keys ``lora_unet_<module_with_underscores>.lora_down.weight`` with ``.alpha``), the
family it was trained for (the text width its UNet cross-attention layers take) and whether every
layer names a module of the base with a shape that fits. The base's modules come from its
configuration, built on the meta device: no weight is read. A partial load is never silent: one key
that fits nothing refuses the file. diffusers' ``load_lora_weights`` reads both formats itself, so
the file is stored as it came.

Out: a LoRA fine-tune's adapter written in kohya's key layout, alphas included, which AUTOMATIC1111
and ComfyUI load; the conversion is diffusers' own (``convert_state_dict_to_kohya``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.checkpoint_files import CLIP_LAYOUT_FAMILIES, OPEN_CLIP_WIDTH, ImportRefused, TensorInfo
from catalog.schema import CatalogEntry
from catalog.tiny_sd import build_tiny_sd_components

# kohya's prefix of each pipeline component; SD 1/2 files from AUTOMATIC1111 say lora_te_, SDXL's lora_te1_/2_.
KOHYA_COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
KOHYA_COMPONENTS |= {"lora_te2_": "text_encoder_2"}
DIFFUSERS_COMPONENTS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
DOWN_SUFFIXES = (".lora_down.weight", ".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight")
UP_SUFFIXES = (".lora_up.weight", ".lora.up.weight", ".lora_B.weight", ".lora_linear_layer.up.weight")
ALPHA_SUFFIX = ".alpha"
TEXT_WIDTH_FAMILIES = CLIP_LAYOUT_FAMILIES | {OPEN_CLIP_WIDTH: "sd2", 2048: "sdxl"}
SHOWN_EXAMPLES = 3
TEXT_MODEL = "text_model_"  # CLIP's modules in kohya's keys: lora_te_text_model_encoder_layers_0_...
CROSS_ATTENTION_KEYS = ("attn2.to_k", "attn2_to_k")  # a module name in diffusers' and kohya's spelling


@dataclass(frozen=True)
class LoraTensor:
    key: str  # as the file names it
    component: str  # unet, text_encoder, text_encoder_2
    module: str  # the module's name, dots replaced by underscores in kohya's layout
    direction: str  # down, up or alpha
    info: TensorInfo


@dataclass(frozen=True)
class LoraFile:
    layout: str  # "kohya" or "diffusers"
    tensors: list[LoraTensor]
    unknown: list[str]  # keys of no LoRA layout at all


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """(layout, component, module, direction) of a LoRA key, or None for a key of no known layout."""
    for prefixes, layout in ((KOHYA_COMPONENTS, "kohya"), (DIFFUSERS_COMPONENTS, "diffusers")):
        prefix = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
        if prefix is None:
            continue
        rest = key[len(prefix) :]
        for suffixes, direction in ((DOWN_SUFFIXES, "down"), (UP_SUFFIXES, "up"), ((ALPHA_SUFFIX,), "alpha")):
            suffix = next((suffix for suffix in suffixes if rest.endswith(suffix)), None)
            if suffix is not None:
                return layout, prefixes[prefix], rest[: -len(suffix)], direction
    return None


def read_lora(tensors: dict[str, TensorInfo], path: Path) -> LoraFile:
    """The LoRA layers of a header; refuses a file mixing kohya and diffusers keys."""
    parsed, unknown, layouts = [], [], set()
    for key, info in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        layout, component, module, direction = split
        layouts.add(layout)
        parsed.append(LoraTensor(key, component, module, direction, info))
    if len(layouts) != 1:
        found = "both kohya and diffusers keys" if layouts else "no LoRA layer"
        raise ImportRefused(f"{path} has {found}; a LoRA file holds one layout")
    return LoraFile(layouts.pop(), parsed, unknown)


def lora_family(lora: LoraFile, path: Path) -> str | None:
    """The family whose text width the UNet's cross-attention keys take (``attn2.to_k``'s input),
    None where the file adapts no such layer."""
    widths = {
        tensor.info.shape[1]
        for tensor in lora.tensors
        if tensor.component == "unet" and tensor.direction == "down" and tensor.module[-10:] in CROSS_ATTENTION_KEYS
    }
    if not widths:
        return None
    if len(widths) == 1 and (width := widths.pop()) in TEXT_WIDTH_FAMILIES:
        return TEXT_WIDTH_FAMILIES[width]
    raise ImportRefused(f"{path}: its cross-attention layers take text of width {sorted(widths)}, which no family has")


def base_module_shapes(base: CatalogEntry, folder: Path | None) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each component's module names with their weight shapes, built on the meta device (no weight is read
    or allocated) from the base's configuration: ``folder``, a diffusers folder, or tiny-sd's code."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        components = _empty_components(base, folder)
    shapes = {}
    for name, component in components.items():
        shapes[name] = {
            module_name: tuple(module.weight.shape)
            for module_name, module in component.named_modules()
            if module_name and getattr(module, "weight", None) is not None
        }
        if name != "unet":  # files name CLIP's modules under text_model, a level transformers 5 dropped
            shapes[name] |= {f"text_model.{module}": shape for module, shape in shapes[name].items()}
    return shapes


def _empty_components(base: CatalogEntry, folder: Path | None) -> dict[str, Any]:
    if folder is None:
        components = build_tiny_sd_components()
        return {"unet": components["unet"], "text_encoder": components["text_encoder"]}
    if not (folder / "unet" / "config.json").is_file():
        raise ImportRefused(f"the base '{base.id}' has no UNet; LoRA files import onto Stable Diffusion models")
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, AutoModel

    components = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))}
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name / "config.json").is_file():
            components[name] = AutoModel.from_config(AutoConfig.from_pretrained(folder / name))
    return components


def check_against_base(lora: LoraFile, base: CatalogEntry, folder: Path | None, path: Path) -> None:
    """Refuse keys no module of the base has, or a shape that does not fit its module: diffusers would
    skip or fail on them, and a partial adapter is never silent. ``folder`` configures the base."""
    shapes = base_module_shapes(base, folder)
    if lora.layout == "kohya":  # kohya writes module names with underscores for dots
        shapes = {
            name: {module.replace(".", "_"): shape for module, shape in of.items()} for name, of in shapes.items()
        }
    unmatched = lora.unknown + [t.key for t in lora.tensors if t.module not in shapes.get(t.component, {})]
    if unmatched:
        examples = ", ".join(unmatched[:SHOWN_EXAMPLES])
        raise ImportRefused(
            f"{path.name}: {len(unmatched)} of its {len(lora.tensors) + len(lora.unknown)} keys match no module of "
            f"the base '{base.id}' (e.g. {examples}); is it a LoRA for another model?"
        )
    for tensor in lora.tensors:
        _check_shape(tensor, shapes[tensor.component][tensor.module], base)


def _check_shape(tensor: LoraTensor, weight: tuple[int, ...], base: CatalogEntry) -> None:
    """A down projection takes the module's input width, an up projection gives its output width."""
    shape = tensor.info.shape
    fits = {
        "down": len(shape) >= 2 and len(weight) >= 2 and shape[1] == weight[1],
        "up": len(shape) >= 2 and shape[0] == weight[0],
        "alpha": len(shape) <= 1,
    }[tensor.direction]
    if not fits:
        raise ImportRefused(
            f"layer {tensor.key} has shape {list(shape)}, which does not fit {tensor.component} module "
            f"{tensor.module} of the base '{base.id}' (weight {list(weight)})"
        )


def kohya_tensors(weights: Path) -> dict[str, Any]:
    """The adapter in ``weights`` with kohya's keys, by diffusers' conversions."""
    from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    state = load_file(str(weights))
    if any(key.startswith("lora_") for key in state):
        return state  # kohya's already
    unet = {key: value for key, value in state.items() if key.startswith("unet.")}
    text = {key: value for key, value in state.items() if not key.startswith("unet.")}
    peft = convert_unet_state_dict_to_peft(unet) | (convert_state_dict_to_peft(text) if text else {})
    converted = convert_state_dict_to_kohya(peft)
    single_text_encoder = not any(key.startswith("lora_te2_") for key in converted)
    return {
        _a1111_text_key(key, single_text_encoder): value.float() if key.endswith(ALPHA_SUFFIX) else value
        for key, value in converted.items()
    }


def _a1111_text_key(key: str, single_text_encoder: bool) -> str:
    """``lora_te_`` for the single text encoder of SD 1/2, the prefix AUTOMATIC1111 reads for those
    (``lora_te1_`` is SDXL's), and CLIP's modules under ``text_model``, where AUTOMATIC1111 and ComfyUI
    look for them (transformers 5's CLIPTextModel names them without it)."""
    if single_text_encoder:
        key = key.replace("lora_te1_", "lora_te_", 1)
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if key.startswith(prefix) and not key.startswith(prefix + TEXT_MODEL):
            return prefix + TEXT_MODEL + key[len(prefix) :]
    return key
