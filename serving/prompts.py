"""Prompts to text embeddings: AUTOMATIC1111's prompt syntax, and an LRU of encoded prompts.

``plain`` text goes through the pipeline's own ``encode_prompt``, so that an image is the one the
pipeline would draw from the prompt string. ``a1111`` text is parsed here into weighted fragments
(AUTOMATIC1111's grammar: ``(word:1.2)``, ``(word)`` = x1.1, ``[word]`` = /1.1, ``\\(`` for a
literal bracket) and encoded by compel (its CompelForSD, CompelForSDXL and CompelForFlux set up each
class's text encoders), which applies the weights and encodes a prompt past a CLIP encoder's window
in 75-token chunks, concatenated; Flux's T5 truncates at its own length, as the pipeline does. A
text without weights that fits the window encodes to the same tensors either way. SDXL and Flux
take pooled embeddings besides (``pooled_prompt_embeds``), which compel reads unweighted.

Each text (a prompt or a negative prompt) is encoded on its own, so its embeddings never depend on
the other prompts of its batch, and are cached under (every text encoder and its LoRA adapter state,
syntax, text): a prompt seen recently skips the text encoders, and any change to the adapters misses.
An absent negative prompt is what the pipeline makes of none: the empty prompt's embeddings (Stable
Diffusion), zeros (SDXL), or no negative at all (Flux, whose true CFG runs only with one).
"""

from __future__ import annotations

import itertools
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

from catalog.families import family_of_pipeline
from txt2img.errors import InputError

# AUTOMATIC1111's tokens (modules/prompt_parser.py): escapes, brackets, a ":weight)" closing, and text.
A1111_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal
    | \(                    # opens an emphasis
    | \[                    # opens a de-emphasis
    | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)   # closes an emphasis with its weight
    | \)
    | \]
    | [^\\()\[\]:]+         # plain text
    | [\\:]                 # a lone backslash or colon: literal
    """,
    re.VERBOSE,
)
ROUND_BRACKET_WEIGHT = 1.1
SQUARE_BRACKET_WEIGHT = 1 / 1.1


def parse_a1111(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` as (text, weight) fragments, as AUTOMATIC1111 reads it; unclosed brackets weigh to the end."""
    fragments: list[list] = []
    round_opened: list[int] = []
    square_opened: list[int] = []

    def weigh_from(start: int, weight: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= weight

    for match in A1111_TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            fragments.append([token[1], 1.0])
        elif token == "(":
            round_opened.append(len(fragments))
        elif token == "[":
            square_opened.append(len(fragments))
        elif weight is not None and round_opened:
            weigh_from(round_opened.pop(), float(weight))
        elif token == ")" and round_opened:
            weigh_from(round_opened.pop(), ROUND_BRACKET_WEIGHT)
        elif token == "]" and square_opened:
            weigh_from(square_opened.pop(), SQUARE_BRACKET_WEIGHT)
        else:
            fragments.append([token, 1.0])
    for start in round_opened:
        weigh_from(start, ROUND_BRACKET_WEIGHT)
    for start in square_opened:
        weigh_from(start, SQUARE_BRACKET_WEIGHT)
    return merge_equal_weights(fragments)


def merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    """Neighbouring fragments of one weight as one; an empty prompt is one empty fragment."""
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


class PromptSyntaxUnsupported(InputError):
    """A request asks for a prompt syntax its model's pipeline has no encoder for."""

    def __init__(self, pipeline_class: str, syntax: str):
        self.pipeline_class = pipeline_class
        super().__init__(
            f"prompt_syntax '{syntax}' is not available for {pipeline_class} models yet; send prompt_syntax 'plain'"
        )

    def as_json(self) -> dict:
        return {"error": str(self), "field": "prompt_syntax"}


def execution_device(pipeline):
    return pipeline._execution_device


def weighted_embeddings(compel, text: str, pipeline, dtype):
    """``text`` in AUTOMATIC1111's syntax through one of compel's text encoders: weighted, and chunked by 75
    tokens where the encoder is not truncating; chunks end at the last comma or full stop, as
    AUTOMATIC1111's do where they can."""
    from compel.embeddings_provider import SplitLongTextMode

    provider = compel.conditioning_provider
    provider.split_long_text_mode = SplitLongTextMode.PHRASES
    provider.get_dtype_for_device = lambda device: dtype
    fragments = parse_a1111(text)
    embeds = provider.get_embeddings_for_weighted_prompt_fragments(
        text_batch=[[fragment for fragment, _ in fragments]],
        fragment_weights_batch=[[weight for _, weight in fragments]],
        device=execution_device(pipeline),
    )
    return embeds.to(dtype)


def pooled_embeddings(compel, text: str, pipeline, dtype):
    """The pooled embedding of ``text`` (brackets and weights read, as compel does: the weights do not apply)."""
    words = "".join(fragment for fragment, _ in parse_a1111(text))
    return compel.conditioning_provider.get_pooled_embeddings([words], device=execution_device(pipeline)).to(dtype)


def encode_sd_plain(pipeline, text: str) -> dict:
    """Stable Diffusion's own encoding of ``text``: [1, 77, dim]."""
    embeds, _ = pipeline.encode_prompt(text, execution_device(pipeline), 1, False)
    return {"prompt_embeds": embeds}


def encode_sd_a1111(pipeline, text: str) -> dict:
    """``text`` in AUTOMATIC1111's syntax, weighted and chunked by compel: [1, 77 * chunks, dim]."""
    from compel import CompelForSD

    compel = CompelForSD(pipeline, device=execution_device(pipeline)).compel
    return {"prompt_embeds": weighted_embeddings(compel, text, pipeline, pipeline.text_encoder.dtype)}


def encode_sdxl_plain(pipeline, text: str) -> dict:
    """SDXL's own encoding of ``text``: both encoders' hidden states side by side, and the second's pooled."""
    embeds, _, pooled, _ = pipeline.encode_prompt(
        text, device=execution_device(pipeline), do_classifier_free_guidance=False
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def encode_sdxl_a1111(pipeline, text: str) -> dict:
    """``text`` in AUTOMATIC1111's syntax through both of SDXL's encoders, weighted and chunked by compel."""
    import torch
    from compel import CompelForSDXL

    compel = CompelForSDXL(pipeline, device=execution_device(pipeline))
    dtype = pipeline.text_encoder_2.dtype
    first = weighted_embeddings(compel.compel_1, text, pipeline, dtype)
    second = weighted_embeddings(compel.compel_2, text, pipeline, dtype)
    return {
        "prompt_embeds": torch.cat([first, second], dim=-1),
        "pooled_prompt_embeds": pooled_embeddings(compel.compel_2, text, pipeline, dtype),
    }


def encode_flux_plain(pipeline, text: str) -> dict:
    """Flux's own encoding of ``text``: T5's hidden states (to max_sequence_length) and CLIP's pooled."""
    embeds, pooled, _ = pipeline.encode_prompt(text, device=execution_device(pipeline))
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def encode_flux_a1111(pipeline, text: str) -> dict:
    """``text`` in AUTOMATIC1111's syntax: weighted by compel through T5 (truncated as Flux truncates), and
    CLIP's pooled embedding."""
    from compel import CompelForFlux

    compel = CompelForFlux(pipeline, device=execution_device(pipeline))
    dtype = pipeline.text_encoder_2.dtype
    return {
        "prompt_embeds": weighted_embeddings(compel.compel_2, text, pipeline, dtype),
        "pooled_prompt_embeds": pooled_embeddings(compel.compel_1, text, pipeline, pipeline.text_encoder.dtype),
    }


# The text encoders of each pipeline class, by syntax; a class not listed takes prompt strings, plain only.
# Each encoder returns one text's pipeline arguments: ``prompt_embeds`` as [1, tokens, dim], tokens a
# multiple of the encoder's window, and the pooled embeddings ([1, dim]) a class takes besides.
TEXT_ENCODERS: dict[str, dict[str, Callable]] = {
    "StableDiffusionPipeline": {"plain": encode_sd_plain, "a1111": encode_sd_a1111},
    "StableDiffusionXLPipeline": {"plain": encode_sdxl_plain, "a1111": encode_sdxl_a1111},
    "FluxPipeline": {"plain": encode_flux_plain, "a1111": encode_flux_a1111},
}


def text_encoders_for(pipeline, syntaxes: set[str]) -> dict[str, Callable] | None:
    """The encoders of ``pipeline``'s class, or None when it has none and every syntax asked is plain."""
    pipeline_class = type(pipeline).__name__
    encoders = TEXT_ENCODERS.get(pipeline_class)
    unsupported = sorted(syntaxes - {"plain"})
    if encoders is None and unsupported:
        raise PromptSyntaxUnsupported(pipeline_class, unsupported[0])
    return encoders


def adapter_state(module) -> tuple:
    """What a module's LoRA adapters contribute to its output: each LoRA layer's active adapters, whether
    they are switched off, and their scales. Empty without adapters."""
    state = []
    for name, layer in module.named_modules():
        scaling = getattr(layer, "scaling", None)
        if isinstance(scaling, dict) and hasattr(layer, "active_adapters"):
            active = tuple(layer.active_adapters)
            state.append((name, active, bool(layer.disable_adapters), tuple(sorted(scaling.items()))))
    return tuple(state)


def embeddings_bytes(embeds: dict) -> int:
    return sum(tensor.nelement() * tensor.element_size() for tensor in embeds.values())


def text_encoders_of(pipeline) -> list:
    """The pipeline's text encoder modules (``text_encoder``, ``text_encoder_2``, ...), in name order."""
    components = pipeline.components
    names = sorted(name for name in components if name.startswith("text_encoder"))
    return [components[name] for name in names if components[name] is not None]


class PromptEmbeddingCache:
    """An LRU of encoded texts, bounded in bytes (``max_bytes`` 0 keeps nothing); safe from any thread.

    Keyed by every text encoder's identity and adapter state, the syntax and the text: a model
    evicted from memory never matches again (its entries age out), and switching a LoRA adapter on,
    off or to another scale, on any of a pipeline's text encoders, misses. ``on_lookup(hit)`` is told
    of every lookup (for /metrics).
    """

    def __init__(self, max_bytes: int, on_lookup: Callable[[bool], None] = lambda hit: None):
        self.max_bytes = max_bytes
        self.on_lookup = on_lookup
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._encoder_numbers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._numbers = itertools.count()

    def model_key(self, pipeline) -> tuple:
        """The part of a key that names the text encoders as they are now: each one's number here and its adapters."""
        encoders = text_encoders_of(pipeline)
        with self._lock:
            numbers = [self._encoder_numbers.setdefault(encoder, next(self._numbers)) for encoder in encoders]
        return tuple((number, adapter_state(encoder)) for number, encoder in zip(numbers, encoders))

    def get(self, key: tuple):
        """The cached embeddings for ``key`` (now the most recent), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        self.on_lookup(found is not None)
        return found

    def put(self, key: tuple, embeds) -> None:
        """Keep ``embeds`` under ``key``, dropping the least recently used entries beyond the budget."""
        size = embeddings_bytes(embeds)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = embeds
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= embeddings_bytes(dropped)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


def encode_texts(
    pipeline, texts: list[tuple[str, str]], encoders: dict[str, Callable], cache: PromptEmbeddingCache | None
) -> dict[tuple[str, str], object]:
    """Each distinct (syntax, text) of ``texts`` encoded once, from ``cache`` where it holds it."""
    import torch

    model_key = cache.model_key(pipeline) if cache is not None else None
    encoded = {}
    for syntax, text in dict.fromkeys(texts):
        key = (model_key, syntax, text) if cache is not None else None
        embeds = cache.get(key) if cache is not None else None
        if embeds is None:
            with torch.inference_mode():
                embeds = encoders[syntax](pipeline, text)
            if cache is not None:
                cache.put(key, embeds)
        encoded[syntax, text] = embeds
    return encoded


def pad_to_tokens(embeds: dict, tokens: int, empty: dict) -> dict:
    """``embeds``' ``prompt_embeds`` ([1, n, dim]) lengthened to ``tokens`` with chunks of the empty prompt's,
    as compel and AUTOMATIC1111 pad the shorter of a prompt and its negative; pooled embeddings stay."""
    import torch

    sequence, empty_sequence = embeds["prompt_embeds"], empty["prompt_embeds"]
    chunks = (tokens - sequence.shape[1]) // empty_sequence.shape[1]
    if not chunks:
        return embeds
    return {**embeds, "prompt_embeds": torch.cat([sequence, *[empty_sequence] * chunks], dim=1)}


def absent_negative(pipeline) -> str:
    """What a guided item without a negative prompt gets, as the pipeline itself does with none: Flux's true
    CFG runs only with one ("none"), SDXL zeroes it where its config says so ("zeros"), Stable Diffusion
    encodes the empty prompt ("empty")."""
    family = family_of_pipeline(type(pipeline).__name__)
    if family is not None and family.true_cfg:
        return "none"
    if pipeline.config.get("force_zeros_for_empty_prompt", False):
        return "zeros"
    return "empty"


def zeros_like_embeds(embeds: dict) -> dict:
    """SDXL's zeroed negative: zeros shaped like the prompt's embeddings."""
    import torch

    return {name: torch.zeros_like(tensor) for name, tensor in embeds.items()}


def prompt_inputs(
    pipeline, texts: list[tuple[str, str | None, str]], guided: bool, cache: PromptEmbeddingCache | None
) -> list[tuple[list[int], dict]]:
    """The pipeline's text arguments for each (prompt, negative prompt, syntax) of a batch, as pipeline
    calls: (the items' indices, the arguments). Items whose embeddings differ in length, or of which one
    has a negative and another none, go to separate calls, so that no image depends on another's prompt.
    ``guided``: the negative prompt applies (classifier-free guidance, or Flux's true CFG); an absent
    one is what ``absent_negative`` says."""
    encoders = text_encoders_for(pipeline, {syntax for _, _, syntax in texts})
    if encoders is None:  # the pipeline encodes its prompt strings itself
        negatives = [negative or "" for _, negative, _ in texts]
        strings = {
            "prompt": [prompt for prompt, _, _ in texts],
            "negative_prompt": negatives if any(negatives) else None,
        }
        return [(list(range(len(texts))), strings)]
    absent = absent_negative(pipeline) if guided else "none"
    wanted = [(syntax, prompt) for prompt, _, syntax in texts]
    wanted += [(syntax, negative or "") for _, negative, syntax in texts if negative or absent == "empty"]
    encoded = encode_texts(pipeline, wanted, encoders, cache)
    pairs = []
    for prompt, negative, syntax in texts:
        positive = encoded[syntax, prompt]
        if guided and (negative or absent == "empty"):
            pairs.append((positive, encoded[syntax, negative or ""]))
        else:
            pairs.append((positive, zeros_like_embeds(positive) if absent == "zeros" else None))
    calls: dict[tuple[int, bool], list[int]] = {}
    for index, pair in enumerate(pairs):
        tokens = max(embeds["prompt_embeds"].shape[1] for embeds in pair if embeds is not None)
        calls.setdefault((tokens, pair[1] is not None), []).append(index)
    return [
        (indices, call_embeds(pipeline, pairs, indices, tokens, encoders, cache))
        for (tokens, _), indices in calls.items()
    ]


def call_embeds(pipeline, pairs: list, indices: list[int], tokens: int, encoders, cache) -> dict:
    """The embeddings arguments (``prompt_embeds``, pooled ones, and their ``negative_`` counterparts) for the
    items at ``indices``, each ``tokens`` long."""
    import torch

    chosen = [pairs[index] for index in indices]
    if any(embeds["prompt_embeds"].shape[1] != tokens for pair in chosen for embeds in pair if embeds is not None):
        empty = encode_texts(pipeline, [("plain", "")], encoders, cache)["plain", ""]
        chosen = [
            tuple(pad_to_tokens(embeds, tokens, empty) if embeds is not None else None for embeds in pair)
            for pair in chosen
        ]
    inputs = {name: torch.cat([positive[name] for positive, _ in chosen]) for name in chosen[0][0]}
    if chosen[0][1] is not None:
        inputs |= {f"negative_{name}": torch.cat([negative[name] for _, negative in chosen]) for name in chosen[0][1]}
    return inputs
