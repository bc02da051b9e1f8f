"""Prompts to text embeddings: AUTOMATIC1111's prompt syntax, and an LRU of encoded prompts.

``plain`` text goes through the pipeline's own ``encode_prompt``, so that an image is the one the
pipeline would draw from the prompt string. ``a1111`` text is parsed here into weighted fragments
(AUTOMATIC1111's grammar: ``(word:1.2)``, ``(word)`` = x1.1, ``[word]`` = /1.1, ``\\(`` for a
literal bracket) and encoded by compel, which applies the weights and encodes a prompt past the text
encoder's window in 75-token chunks, concatenated. A text without weights that fits the window
encodes to the same tensor either way.

Each text (a prompt or a negative prompt) is encoded on its own, so its embeddings never depend on
the other prompts of its batch, and are cached under (text encoder, its LoRA adapter state, syntax,
text): a prompt seen recently skips the text encoder, and any change to the adapters misses.
"""

from __future__ import annotations

import itertools
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

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


def encode_sd_plain(pipeline, text: str):
    """Stable Diffusion's own encoding of ``text``: [1, 77, dim]."""
    embeds, _ = pipeline.encode_prompt(text, execution_device(pipeline), 1, False)
    return embeds


def encode_sd_a1111(pipeline, text: str):
    """``text`` in AUTOMATIC1111's syntax, weighted and chunked by compel: [1, 77 * chunks, dim]."""
    from compel import Compel
    from compel.embeddings_provider import SplitLongTextMode

    dtype = pipeline.text_encoder.dtype
    compel = Compel(
        tokenizer=pipeline.tokenizer,
        text_encoder=pipeline.text_encoder,
        dtype_for_device_getter=lambda device: dtype,
        truncate_long_prompts=False,
        # Chunks end at the last comma or full stop before 75 tokens, as AUTOMATIC1111's do where it can.
        split_long_text_mode=SplitLongTextMode.PHRASES,
        device=execution_device(pipeline),
    )
    fragments = parse_a1111(text)
    embeds = compel.conditioning_provider.get_embeddings_for_weighted_prompt_fragments(
        text_batch=[[fragment for fragment, _ in fragments]],
        fragment_weights_batch=[[weight for _, weight in fragments]],
        device=execution_device(pipeline),
    )
    return embeds.to(dtype)


# The text encoders of each pipeline class, by syntax; a class not listed takes prompt strings, plain only.
# Each encoder returns one text's embeddings as [1, tokens, dim], tokens a multiple of the encoder's window.
TEXT_ENCODERS: dict[str, dict[str, Callable]] = {
    "StableDiffusionPipeline": {"plain": encode_sd_plain, "a1111": encode_sd_a1111},
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


def tensor_bytes(tensor) -> int:
    return tensor.nelement() * tensor.element_size()


class PromptEmbeddingCache:
    """An LRU of encoded texts, bounded in bytes (``max_bytes`` 0 keeps nothing); safe from any thread.

    Keyed by the text encoder's identity, its adapter state, the syntax and the text: a model
    evicted from memory never matches again (its entries age out), and switching a LoRA adapter on,
    off or to another scale misses. ``on_lookup(hit)`` is told of every lookup (for /metrics).
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
        """The part of a key that names the text encoder as it is now: its number here and its adapters."""
        encoder = pipeline.text_encoder
        with self._lock:
            number = self._encoder_numbers.setdefault(encoder, next(self._numbers))
        return number, adapter_state(encoder)

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
        size = tensor_bytes(embeds)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = embeds
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= tensor_bytes(dropped)

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
        key = (*model_key, syntax, text) if cache is not None else None
        embeds = cache.get(key) if cache is not None else None
        if embeds is None:
            with torch.inference_mode():
                embeds = encoders[syntax](pipeline, text)
            if cache is not None:
                cache.put(key, embeds)
        encoded[syntax, text] = embeds
    return encoded


def pad_to_tokens(embeds, tokens: int, empty):
    """``embeds`` ([1, n, dim]) lengthened to ``tokens`` with chunks of the empty prompt's embeddings,
    as compel and AUTOMATIC1111 pad the shorter of a prompt and its negative."""
    import torch

    chunks = (tokens - embeds.shape[1]) // empty.shape[1]
    return torch.cat([embeds, *[empty] * chunks], dim=1) if chunks else embeds


def prompt_inputs(
    pipeline, texts: list[tuple[str, str | None, str]], guided: bool, cache: PromptEmbeddingCache | None
) -> list[tuple[list[int], dict]]:
    """The pipeline's text arguments for each (prompt, negative prompt, syntax) of a batch, as pipeline
    calls: (the items' indices, the arguments). Items whose embeddings differ in length go to separate
    calls, so that no image depends on the length of another's prompt. ``guided``: classifier-free
    guidance is on, so negative prompts (the empty one when absent) are encoded too."""
    encoders = text_encoders_for(pipeline, {syntax for _, _, syntax in texts})
    if encoders is None:  # the pipeline encodes its prompt strings itself
        negatives = [negative or "" for _, negative, _ in texts]
        strings = {
            "prompt": [prompt for prompt, _, _ in texts],
            "negative_prompt": negatives if any(negatives) else None,
        }
        return [(list(range(len(texts))), strings)]
    wanted = [(syntax, prompt) for prompt, _, syntax in texts]
    if guided:
        wanted += [(syntax, negative or "") for _, negative, syntax in texts]
    encoded = encode_texts(pipeline, wanted, encoders, cache)
    pairs = [
        (encoded[syntax, prompt], encoded[syntax, negative or ""] if guided else None)
        for prompt, negative, syntax in texts
    ]
    calls: dict[int, list[int]] = {}
    for index, pair in enumerate(pairs):
        calls.setdefault(max(embeds.shape[1] for embeds in pair if embeds is not None), []).append(index)
    return [
        (indices, call_embeds(pipeline, pairs, indices, tokens, encoders, cache)) for tokens, indices in calls.items()
    ]


def call_embeds(pipeline, pairs: list, indices: list[int], tokens: int, encoders, cache) -> dict:
    """``prompt_embeds`` (and ``negative_prompt_embeds``) for the items at ``indices``, each ``tokens`` long."""
    import torch

    chosen = [pairs[index] for index in indices]
    if any(embeds.shape[1] != tokens for pair in chosen for embeds in pair if embeds is not None):
        empty = encode_texts(pipeline, [("plain", "")], encoders, cache)["plain", ""]
        chosen = [
            tuple(pad_to_tokens(embeds, tokens, empty) if embeds is not None else None for embeds in pair)
            for pair in chosen
        ]
    inputs = {"prompt_embeds": torch.cat([positive for positive, _ in chosen])}
    if chosen[0][1] is not None:
        inputs["negative_prompt_embeds"] = torch.cat([negative for _, negative in chosen])
    return inputs
