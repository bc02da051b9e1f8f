"""The one Hyperparameters model: JumpStart's names and defaults, SageMaker's strings, our extensions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from training.hyperparameters import JUMPSTART_NAMES, Hyperparameters

JUMPSTART_DEFAULTS = {
    "with_prior_preservation": False,
    "num_class_images": 100,
    "epochs": 20,
    "max_steps": None,
    "batch_size": 1,
    "learning_rate": 2e-6,
    "prior_loss_weight": 1.0,
    "center_crop": False,
    "lr_scheduler": "constant",
    "adam_weight_decay": 1e-2,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "gradient_accumulation_steps": 1,
    "max_grad_norm": 1.0,
    "seed": 0,
    "compute_fid": False,
}


def test_jumpstart_defaults_exactly():
    values = Hyperparameters().model_dump()
    assert {name: values[name] for name in JUMPSTART_DEFAULTS} == JUMPSTART_DEFAULTS
    assert set(JUMPSTART_NAMES) == set(JUMPSTART_DEFAULTS)


def test_sagemaker_string_forms():
    hp = Hyperparameters.model_validate(
        {"with_prior_preservation": "True", "max_steps": "None", "epochs": "400", "learning_rate": "1e-06"}
    )
    assert hp.with_prior_preservation is True and hp.max_steps is None and hp.epochs == 400
    assert Hyperparameters.model_validate(hp.sagemaker_strings()) == Hyperparameters(
        with_prior_preservation=True, epochs=400, learning_rate=1e-6
    )


def test_cli_pairs_and_extensions():
    hp = Hyperparameters.from_pairs(
        ["method=lora", "lora_rank=8", "max_steps=400", "lr_scheduler=constant_with_warmup", "lr_warmup_steps=50"]
    )
    assert (hp.method, hp.lora_rank, hp.max_steps, hp.lr_warmup_steps) == ("lora", 8, 400, 50)
    assert Hyperparameters.from_pairs(["validation_prompts=a dog | a cat"]).validation_prompts == ["a dog", "a cat"]


@pytest.mark.parametrize("pair", ["lr_scheduler=exponential", "batch_size=0", "resolution=65", "method=dora"])
def test_bad_values_are_refused(pair):
    with pytest.raises(ValidationError):
        Hyperparameters.from_pairs([pair])


def test_unknown_name_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        Hyperparameters.from_pairs(["learning_rat=1e-6"])


def test_sharding_is_a_txt2img_choice_that_defaults_to_none():
    assert Hyperparameters().sharding == "none"
    # SageMaker's "None"/"none" mean unset where unset is a value; here "none" is the value itself.
    assert Hyperparameters.model_validate({"sharding": "none"}).sharding == "none"
    # The CLI's --method is assigned after parsing, which re-validates every field.
    hyperparameters = Hyperparameters()
    hyperparameters.method = "lora"
    assert hyperparameters.sharding == "none"
    assert Hyperparameters.from_pairs(["sharding=fsdp"]).sharding == "fsdp"
    assert "sharding" not in Hyperparameters(sharding="fsdp").sagemaker_strings()  # JumpStart's script has no such name
    with pytest.raises(ValidationError, match="'none' or 'fsdp'"):
        Hyperparameters(sharding="zero3")
