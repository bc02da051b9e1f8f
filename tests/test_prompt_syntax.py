"""AUTOMATIC1111's prompt syntax and the prompt-embedding cache (serving/prompts.py): in the pipeline call
on tiny-sd and on the SDXL and Flux stand-ins (catalog/tiny_families.py), and through a real ``bentoml serve``
on every route, with the ``webuiapi`` client on /sdapi/v1."""

from __future__ import annotations

import base64
import io
import json
from typing import get_args

import httpx
import numpy as np
import pytest
import webuiapi
from bentoml_server import offline_server
from PIL import Image

from catalog.tiny_families import build_tiny_sdxl_pipeline
from catalog.tiny_sd import build_tiny_sd_pipeline
from jumpstart import inference_script
from serving.generation import BatchItem, generate_images
from serving.invocations import REQUEST_SCHEMA, InvocationError
from serving.prompts import (
    TEXT_ENCODERS,
    PromptEmbeddingCache,
    PromptSyntaxUnsupported,
    encode_sd_a1111,
    parse_a1111,
    text_encoders_for,
)
from serving.schema import PromptSyntax

# Words the tiny tokenizer reads as one token each, so that N words are N tokens.
SENTENCE = "a red ball on the table with a blue cup near the green tree ,"
LONG_PROMPT = " ".join([SENTENCE] * 8)  # 120 tokens: past the text encoder's 77
FIRST_75_TOKENS = " ".join(LONG_PROMPT.split()[:75])
CALL = {"width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 7.5}


@pytest.fixture(scope="module")
def tiny_pipeline():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_sd_pipeline()
    torch.set_num_threads(threads)


def pixels(pipeline, *items: BatchItem, cache: PromptEmbeddingCache | None = None) -> list[bytes]:
    return [image.tobytes() for image in generate_images(pipeline, list(items), **CALL, prompt_cache=cache)]


def one(pipeline, prompt: str, syntax: str = "plain", negative: str | None = None, cache=None) -> bytes:
    [image] = pixels(pipeline, BatchItem(prompt, negative, 3, syntax), cache=cache)
    return image


# The grammar


def test_a1111_grammar_weights_nests_escapes_and_closes_what_is_left_open():
    assert parse_a1111("a (red:1.5) ball") == [("a ", 1.0), ("red", 1.5), (" ball", 1.0)]
    assert parse_a1111("(red) [blue]") == [("red", 1.1), (" ", 1.0), ("blue", 1 / 1.1)]
    assert parse_a1111("((red))") == [("red", pytest.approx(1.21))]
    assert parse_a1111("(a [b] c:2)") == [("a ", 2.0), ("b", pytest.approx(2 / 1.1)), (" c", 2.0)]
    assert parse_a1111(r"\(literal\) x:y 1:2)") == [("(literal) x:y 1:2)", 1.0)]
    assert parse_a1111("(open") == [("open", pytest.approx(1.1))]
    assert parse_a1111("") == [("", 1.0)]


def test_every_route_and_the_container_contract_know_the_same_syntaxes():
    assert REQUEST_SCHEMA["properties"]["prompt_syntax"]["enum"] == list(get_args(PromptSyntax))


def test_the_packed_container_refuses_a1111_prompts_before_generating():
    body = json.dumps({"prompt": "a (red:1.5) ball", "prompt_syntax": "a1111"})
    with pytest.raises(InvocationError, match="this endpoint reads prompts as written"):
        inference_script.transform_fn(None, body, "application/json", "application/json")


# In the pipeline call


def test_weights_change_the_image(tiny_pipeline):
    plain = one(tiny_pipeline, "a red ball", "a1111")
    assert one(tiny_pipeline, "a (red:1.5) ball", "a1111") != plain
    assert one(tiny_pipeline, "a [red] ball", "a1111") != plain
    assert one(tiny_pipeline, "a (red) ball", "a1111") != one(tiny_pipeline, "a (red:1.3) ball", "a1111")
    assert one(tiny_pipeline, "a (red) ball", "plain") != one(tiny_pipeline, "a (red) ball", "a1111")


def test_a_plain_prompt_gives_the_same_image_in_either_syntax(tiny_pipeline):
    for prompt, negative in [("a red ball on the table", None), ("a red ball", "blue, green"), ("cube: 1", "")]:
        assert one(tiny_pipeline, prompt, "a1111", negative) == one(tiny_pipeline, prompt, "plain", negative)


def test_a_long_a1111_prompt_is_encoded_whole_where_plain_keeps_its_first_77_tokens(tiny_pipeline):
    import torch

    with torch.inference_mode():
        assert encode_sd_a1111(tiny_pipeline, LONG_PROMPT)["prompt_embeds"].shape[1] == 2 * 77
    truncated = one(tiny_pipeline, FIRST_75_TOKENS, "plain")
    assert one(tiny_pipeline, LONG_PROMPT, "plain") == truncated
    assert one(tiny_pipeline, LONG_PROMPT, "a1111") != truncated
    # A long prompt's short negative is padded to its length, and the other way round.
    assert one(tiny_pipeline, "a red ball", "a1111", negative=LONG_PROMPT) != one(tiny_pipeline, "a red ball", "a1111")


def test_a_long_prompt_never_changes_the_image_of_a_short_one_in_its_batch(tiny_pipeline):
    short = BatchItem("a red ball", None, 3, "a1111")
    long = BatchItem(LONG_PROMPT, None, 4, "a1111")
    mixed = pixels(tiny_pipeline, short, long, short)
    pair = pixels(tiny_pipeline, short, short)  # the short ones share a call, the long one has its own
    assert mixed == [pair[0], *pixels(tiny_pipeline, long), pair[1]]


def test_a_pipeline_without_an_encoder_takes_plain_prompts_and_refuses_a1111():
    class OtherPipeline:
        pass

    assert text_encoders_for(OtherPipeline(), {"plain"}) is None
    with pytest.raises(PromptSyntaxUnsupported, match="prompt_syntax 'a1111' is not available for OtherPipeline"):
        text_encoders_for(OtherPipeline(), {"plain", "a1111"})


# The cache


def test_cached_prompts_give_byte_identical_images_and_skip_the_encoder(tiny_pipeline):
    cache = PromptEmbeddingCache(2**24)
    items = [BatchItem("a red ball", "blue", 1, "plain"), BatchItem("a (red:1.4) cup", None, 2, "a1111")]
    uncached = pixels(tiny_pipeline, *items)
    assert pixels(tiny_pipeline, *items, cache=cache) == uncached
    assert (cache.hits, cache.misses) == (0, 4)  # two prompts, two negatives ("" for none)
    assert pixels(tiny_pipeline, *items, cache=cache) == uncached
    assert (cache.hits, cache.misses) == (4, 4)


def test_the_cache_tells_the_syntaxes_apart(tiny_pipeline):
    cache = PromptEmbeddingCache(2**24)
    prompt = "a (red:1.5) ball"
    assert one(tiny_pipeline, prompt, "plain", cache=cache) == one(tiny_pipeline, prompt, "plain")
    assert one(tiny_pipeline, prompt, "a1111", cache=cache) == one(tiny_pipeline, prompt, "a1111")


def test_the_cache_keeps_to_its_byte_budget_dropping_the_least_recently_used(tiny_pipeline):
    import torch

    with torch.inference_mode():
        entry_bytes = tiny_pipeline.encode_prompt("a", "cpu", 1, False)[0].nbytes
    cache = PromptEmbeddingCache(3 * entry_bytes)
    for prompt in ["a red ball", "a blue ball", "a red ball", "a green ball"]:
        one(tiny_pipeline, prompt, cache=cache)  # each with the empty negative
    assert len(cache) == 3 and cache.bytes_held == 3 * entry_bytes
    misses = cache.misses
    one(tiny_pipeline, "a red ball", cache=cache)  # kept: used after "a blue ball", which was dropped
    one(tiny_pipeline, "a blue ball", cache=cache)
    assert cache.misses == misses + 1
    nothing_kept = PromptEmbeddingCache(0)
    one(tiny_pipeline, "a red ball", cache=nothing_kept)
    assert len(nothing_kept) == 0 and nothing_kept.misses == 2


def with_random_text_encoder_adapter(encoder) -> None:
    """A LoRA adapter "style" on ``encoder`` whose up-projections are random, so that it changes the output."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(config, encoder, adapter_name="style")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def test_switching_a_text_encoder_adapter_misses_the_cache():
    pipeline = build_tiny_sd_pipeline()
    with_random_text_encoder_adapter(pipeline.text_encoder)
    cache = PromptEmbeddingCache(2**24)

    def with_and_without_cache() -> bytes:
        uncached = one(pipeline, "a red ball")
        assert one(pipeline, "a red ball", cache=cache) == uncached
        return uncached

    adapted = with_and_without_cache()
    pipeline.disable_lora()
    assert with_and_without_cache() != adapted
    pipeline.enable_lora()
    assert with_and_without_cache() == adapted
    pipeline.set_adapters(["style"], adapter_weights=[0.5])
    assert with_and_without_cache() != adapted


# SDXL and Flux: their pooled embeddings, SDXL's zeroed negative, Flux's true CFG

FAMILY_CALLS = {
    "sdxl": {"guidance_scale": 5.0},
    "flux": {"guidance_scale": 0.0, "true_cfg_scale": 4.0},  # the negative prompt applies through true CFG
}


def family_pixels(pipeline, family: str, *items: BatchItem, cache=None) -> list[bytes]:
    call = {**CALL, **FAMILY_CALLS[family]}
    return [image.tobytes() for image in generate_images(pipeline, list(items), **call, prompt_cache=cache)]


def family_one(pipeline, family: str, prompt: str, syntax: str, negative: str | None = None, cache=None) -> bytes:
    [image] = family_pixels(pipeline, family, BatchItem(prompt, negative, 3, syntax), cache=cache)
    return image


@pytest.mark.parametrize("family", FAMILY_CALLS)
def test_weights_change_the_image_on_sdxl_and_flux(family, stand_in_pipelines, one_torch_thread):
    pipeline = stand_in_pipelines[family]
    plain = family_one(pipeline, family, "a red ball", "a1111")
    assert family_one(pipeline, family, "a (red:1.5) ball", "a1111") != plain
    assert family_one(pipeline, family, "a [red] ball", "a1111") != plain
    assert family_one(pipeline, family, "a (red) ball", "plain") != family_one(
        pipeline, family, "a (red) ball", "a1111"
    )


@pytest.mark.parametrize("family", FAMILY_CALLS)
def test_a_plain_prompt_on_sdxl_and_flux_gives_the_pipelines_own_image_in_either_syntax(
    family, stand_in_pipelines, one_torch_thread, monkeypatch
):
    pipeline = stand_in_pipelines[family]
    cases = [("a red ball on the table", None), ("a red ball", "blue, green"), ("cube: 1", "")]
    encoded = {case: family_one(pipeline, family, *case[:1], "plain", case[1]) for case in cases}
    for prompt, negative in cases:
        assert family_one(pipeline, family, prompt, "a1111", negative) == encoded[prompt, negative]
    # Without an encoder the pipeline reads the strings itself: the image it draws from them.
    monkeypatch.delitem(TEXT_ENCODERS, type(pipeline).__name__)
    for prompt, negative in cases:
        assert family_one(pipeline, family, prompt, "plain", negative) == encoded[prompt, negative]


@pytest.mark.parametrize("family", FAMILY_CALLS)
def test_a_negative_prompt_never_changes_the_image_of_another_item_in_its_batch(
    family, stand_in_pipelines, one_torch_thread
):
    # SDXL zeroes an absent negative, Flux runs true CFG only with one: each item as if it came alone.
    pipeline = stand_in_pipelines[family]
    with_negative = BatchItem("a red ball", "blurry", 3, "a1111")
    without = BatchItem("a blue cup", None, 4, "a1111")
    alone = [*family_pixels(pipeline, family, with_negative), *family_pixels(pipeline, family, without)]
    assert family_pixels(pipeline, family, with_negative, without) == alone


@pytest.mark.parametrize("family", FAMILY_CALLS)
def test_cached_prompts_give_byte_identical_images_on_sdxl_and_flux(family, stand_in_pipelines, one_torch_thread):
    pipeline = stand_in_pipelines[family]
    cache = PromptEmbeddingCache(2**24)
    items = [
        BatchItem("a red ball", "blue", 1, "plain"),
        BatchItem(f"a (red:1.4) cup, {LONG_PROMPT}", None, 2, "a1111"),
    ]
    uncached = family_pixels(pipeline, family, *items)
    assert family_pixels(pipeline, family, *items, cache=cache) == uncached
    misses = cache.misses
    assert family_pixels(pipeline, family, *items, cache=cache) == uncached
    assert cache.misses == misses and cache.hits == misses  # the second time, every text from the cache


def test_an_adapter_on_the_second_text_encoder_misses_the_cache(one_torch_thread):
    pipeline = build_tiny_sdxl_pipeline()
    with_random_text_encoder_adapter(pipeline.text_encoder_2)
    cache = PromptEmbeddingCache(2**24)

    def with_and_without_cache() -> bytes:
        uncached = family_one(pipeline, "sdxl", "a red ball", "plain")
        assert family_one(pipeline, "sdxl", "a red ball", "plain", cache=cache) == uncached
        return uncached

    adapted = with_and_without_cache()
    pipeline.disable_lora()  # the only adapter is on text_encoder_2
    assert with_and_without_cache() != adapted
    pipeline.enable_lora()
    assert with_and_without_cache() == adapted


# Through bentoml serve, on every route


@pytest.fixture(scope="module")
def prompt_server(tmp_path_factory):
    with offline_server(tmp_path_factory.mktemp("prompt-syntax-home")) as url:
        yield url


@pytest.fixture(scope="module")
def prompt_http(prompt_server):
    with httpx.Client(base_url=prompt_server, timeout=120) as client:
        yield client


REQUEST = {"model": "tiny-sd", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}


def decoded(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def images_pixels(http: httpx.Client, **fields) -> bytes:
    response = http.post("/images", json={**REQUEST, **fields})
    assert response.status_code == 200, response.text
    return decoded(base64.b64decode(response.json()["images"][0]["image"]))


def txt2img_pixels(http: httpx.Client, **fields) -> bytes:
    response = http.post("/txt2img", json={**REQUEST, **fields})
    assert response.status_code == 200, response.text
    return decoded(response.content)


def invocations_pixels(http: httpx.Client, **fields) -> bytes:
    body = {name: value for name, value in {**REQUEST, **fields}.items() if name != "model"}
    response = http.post("/invocations", json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["generated_images"][0], dtype=np.uint8).tobytes()


def openai_pixels(http: httpx.Client, **fields) -> bytes:
    body = {"model": "tiny-sd", "size": "64x64", "num_inference_steps": 2, "seed": 5, **fields}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return decoded(base64.b64decode(response.json()["data"][0]["b64_json"]))


ROUTES = [images_pixels, txt2img_pixels, invocations_pixels, openai_pixels]


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.__name__)
def test_prompt_syntax_is_opt_in_on_every_route(prompt_http, route):
    plain = route(prompt_http, prompt="a red ball")
    assert route(prompt_http, prompt="a red ball", prompt_syntax="a1111") == plain
    assert route(prompt_http, prompt="a red ball", prompt_syntax="plain") == plain
    weighted = route(prompt_http, prompt="a (red:1.5) ball", prompt_syntax="a1111")
    assert weighted != plain
    assert route(prompt_http, prompt="a (red:1.5) ball") != weighted  # plain: the brackets are text


@pytest.mark.parametrize(
    "path, extra",
    [
        ("/images", REQUEST),
        ("/txt2img", REQUEST),
        ("/invocations", {}),
        ("/v1/images/generations", {"model": "tiny-sd"}),
    ],
)
def test_an_unknown_prompt_syntax_is_refused_naming_the_allowed_ones(prompt_http, path, extra):
    response = prompt_http.post(path, json={**extra, "prompt": "a red ball", "prompt_syntax": "compel"})
    assert response.status_code == 400, response.text
    assert "prompt_syntax" in response.text and "'plain' or 'a1111'" in response.text


def test_repeated_prompts_are_counted_as_cache_hits_in_metrics(prompt_http):
    def lookups(result: str) -> float:
        lines = prompt_http.get("/metrics").text.splitlines()
        name = f'txt2img_prompt_cache_lookups_total{{result="{result}"}}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))

    images_pixels(prompt_http, prompt="a green tree in the rain")
    hits, misses = lookups("hit"), lookups("miss")
    images_pixels(prompt_http, prompt="a green tree in the rain")
    assert lookups("hit") == hits + 2 and lookups("miss") == misses  # the prompt and the empty negative


def test_webuiapi_reads_weights_and_long_prompts(prompt_server, prompt_http):
    port = int(prompt_server.rsplit(":", 1)[1])
    webui = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=2)

    def webui_pixels(prompt: str) -> bytes:
        return webui.txt2img(prompt=prompt, width=64, height=64, steps=2, seed=9).image.convert("RGB").tobytes()

    plain = webui_pixels("a red ball")
    assert webui_pixels("a (red:1.5) ball") != plain
    assert webui_pixels("a [red] ball") != plain
    assert webui_pixels(LONG_PROMPT) != webui_pixels(FIRST_75_TOKENS)
    # The same image as /images reading the same prompt in the same syntax.
    same = {"seed": 9, "scheduler": "euler-a", "guidance_scale": 7.0}
    assert webui_pixels(LONG_PROMPT) == images_pixels(prompt_http, prompt=LONG_PROMPT, prompt_syntax="a1111", **same)
