"""A txt2img home that is a file, and outputs asked for under a file: every command says so in one
line and exits 2, before any work; ``bentoml serve`` refuses to start with one log line."""

from __future__ import annotations

from pathlib import Path

import pytest
from bentoml_server import server_process

HOME_COMMANDS = [
    ["catalog", "list"],
    ["catalog", "validate"],
    ["catalog", "show", "tiny-sd"],
    ["catalog", "search", "tiny"],
    ["catalog", "remove", "my-dog"],
    ["generate", "tiny-sd", "a cat", "--steps", "1", "-o", "{tmp}/cat.png"],
    ["export", "tiny-sd", "{tmp}/exported"],
    ["bento-model", "save", "tiny-sd"],
    ["evaluate", "tiny-sd", "{tmp}/data"],
]


@pytest.fixture()
def home_file(tmp_path) -> Path:
    home = tmp_path / "home-file"
    home.write_text("a file, not a folder\n")
    return home


@pytest.mark.parametrize("args", HOME_COMMANDS, ids=lambda args: " ".join(args[:2]))
def test_a_home_that_is_a_file_is_one_line_from_every_command(run_cli, cli_env, home_file, tmp_path, args):
    cli_env["TXT2IMG_HOME"] = str(home_file)
    result = run_cli(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"txt2img: error: TXT2IMG_HOME {home_file} is a file, not a folder\n"
    assert not (tmp_path / "cat.png").exists() and not (tmp_path / "exported").exists()


def test_a_home_under_a_file_names_that_file(run_cli, cli_env, home_file):
    cli_env["TXT2IMG_HOME"] = str(home_file / "txt2img")
    result = run_cli("catalog", "validate")
    assert result.returncode == 2, result.stdout
    assert result.stderr == f"txt2img: error: TXT2IMG_HOME {home_file / 'txt2img'} is under {home_file}, a file\n"


def test_help_still_answers_with_a_home_that_is_a_file(run_cli, cli_env, home_file):
    cli_env["TXT2IMG_HOME"] = str(home_file)
    assert "Usage: txt2img train" in run_cli("train", "--help", check_rc=0).stdout


OUTPUT_COMMANDS = [
    (["generate", "tiny-sd", "a cat", "--steps", "1", "-o", "{file}/cat.png"], "{file}"),
    (["generate", "tiny-sd", "a cat", "--steps", "1", "-o", "{file}/sub/cat.png"], "{file}/sub"),
    (["export", "tiny-sd", "{file}/sub"], "{file}/sub"),
    (["catalog", "schema", "-o", "{file}/schema.json"], "{file}"),
    (["evaluate", "tiny-sd", "{tmp}/data", "--output", "{file}/report"], "{file}/report"),
    (["tune", "{tmp}/data", "--base", "tiny-sd", "--name", "tuned", "--study-dir", "{file}/study"], "{file}/study"),
    (["endpoints", "invoke", "my-endpoint", "a cat", "-o", "{file}/images"], "{file}/images"),
]


@pytest.mark.parametrize(("args", "folder"), OUTPUT_COMMANDS, ids=lambda value: " ".join(value[:2]))
def test_writing_under_a_file_is_one_line_naming_it(run_cli, tmp_path, args, folder):
    blocker = tmp_path / "somefile"
    blocker.write_text("in the way\n")
    result = run_cli(*[arg.format(file=blocker, tmp=tmp_path) for arg in args])
    assert result.returncode == 2, result.stderr
    folder = folder.format(file=blocker)
    expected = f"{folder} is a file, not a folder" if folder == str(blocker) else f"{folder} is under {blocker}, a file"
    assert result.stderr.startswith("txt2img: error: ") and result.stderr.endswith(f"{expected}\n"), result.stderr
    assert result.stderr.count("\n") == 1 and blocker.read_text() == "in the way\n"


def test_the_server_refuses_a_home_that_is_a_file_in_one_log_line(home_file, tmp_path):
    log_path = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="bentoml serve exited"):
        with server_process(home_file, bentoml_home=tmp_path / "bentoml", log_path=log_path, torch_threads="1"):
            pass
    log = log_path.read_text()
    assert log.count(f"TXT2IMG_HOME {home_file} is a file, not a folder") == 1, log
    assert "Traceback" not in log, log
