"""Every command that talks to AWS stops with one readable line, exit code 2, when its setup is
incomplete: the aws extra not installed, no region, no credentials, an unknown AWS_PROFILE, or (where
SageMaker runs something as a role) no execution role."""

from __future__ import annotations

import importlib.util

import pytest
from aws_fixtures import FIXTURE_MODEL, ROLE

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")

BASE = "model-txt2img-stabilityai-stable-diffusion-v2-1-base"
REMOTE = ["--base", BASE, "--name", "remote-dog", "--remote", "--no-wait"]
AWS_COMMANDS = {
    "deploy": ["deploy", FIXTURE_MODEL, "--endpoint-name", "x"],
    "endpoints list": ["endpoints", "list"],
    "endpoints invoke": ["endpoints", "invoke", "x", "a prompt"],
    "endpoints delete": ["endpoints", "delete", "x"],
    "train --remote": ["train", "s3://my-txt2img/dogs/", *REMOTE],
    "tune --remote": ["tune", "s3://my-txt2img/dogs/", *REMOTE],
}
RUN_AS_ROLE = ("deploy", "train --remote", "tune --remote")


def _one_line_error(capsys, arguments: list[str]) -> str:
    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("txt2img: error: "), error
    return error.removeprefix("txt2img: error: ").rstrip("\n")


def _with_role(command: str) -> list[str]:
    return AWS_COMMANDS[command] + (["--role", ROLE] if command in RUN_AS_ROLE else [])


@pytest.mark.parametrize("command", AWS_COMMANDS)
def test_without_the_aws_extra(aws, monkeypatch, capsys, command):
    real_find_spec = importlib.util.find_spec

    def without_aws(name, *args, **kwargs):
        return None if name in ("boto3", "sagemaker") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_aws)
    assert (
        _one_line_error(capsys, _with_role(command))
        == "this command needs boto3, sagemaker: pip install 'txt2img[aws]'"
    )


@pytest.mark.parametrize("command", AWS_COMMANDS)
def test_without_a_region(aws, monkeypatch, capsys, command):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert _one_line_error(capsys, _with_role(command)).startswith("no AWS region: pass --region")


@pytest.mark.parametrize("command", AWS_COMMANDS)
def test_without_credentials(aws, monkeypatch, capsys, command):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert _one_line_error(capsys, _with_role(command)).startswith("no AWS credentials: set AWS_ACCESS_KEY_ID")


@pytest.mark.parametrize("command", RUN_AS_ROLE)
def test_without_an_execution_role(aws, capsys, command):
    assert _one_line_error(capsys, AWS_COMMANDS[command]).startswith("no SageMaker execution role: pass --role")


@pytest.mark.parametrize("command", AWS_COMMANDS)
def test_with_an_unknown_profile(aws, monkeypatch, capsys, command):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    assert _one_line_error(capsys, _with_role(command)).startswith(
        "The config profile (no-such-profile) could not be found: set AWS_PROFILE to a profile"
    )
