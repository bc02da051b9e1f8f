"""Families as data (catalog/families.py) and a tiny stand-in for each: every family's pipeline generates
with its own defaults, and the requests its family cannot honour are refused naming what it can."""

from __future__ import annotations

import typing

import pytest

from catalog.families import FAMILIES, FAMILY_NAMES
from catalog.schema import Family
from catalog.tiny_families import TINY_PIPELINES, TINY_RESOLUTION
from serving.generation import BatchItem, generate_images


@pytest.fixture(scope="module")
def stand_ins():
    """One built tiny pipeline per family, shared by the module's tests (building Flux's takes a second)."""
    return {name: build() for name, build in TINY_PIPELINES.items()}


def test_the_schema_names_exactly_the_families_of_the_table():
    assert typing.get_args(Family) == FAMILY_NAMES


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_has_a_tiny_stand_in_of_its_pipeline_class_that_generates(name, stand_ins, one_torch_thread):
    family = FAMILIES[name]
    pipeline = stand_ins[name]
    assert type(pipeline).__name__ == family.pipeline_class
    [image] = generate_images(
        pipeline,
        [BatchItem("a red photo of a cat", None, 7)],
        width=TINY_RESOLUTION,
        height=TINY_RESOLUTION,
        num_inference_steps=2,
        guidance_scale=family.default_guidance,
    )
    assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION)
