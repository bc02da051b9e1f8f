"""`txt2img catalog ...` as a user runs it: output, exit codes, and staying light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from catalog_entries import finetune_entry

from catalog.store import write_entry


def test_list_json_has_every_model_with_the_promised_fields(run_cli):
    result = run_cli("catalog", "list", "--json", check_rc=0)
    entries = json.loads(result.stdout)
    assert len(entries) == 96
    for entry in entries:
        assert {"id", "hf_repo", "fine_tunable", "tags"} <= entry.keys()
    assert entries[0]["id"] == "tiny-sd" and entries[0]["hf_repo"] is None


def test_list_filters(run_cli):
    fine_tunable = json.loads(run_cli("catalog", "list", "--fine-tunable", "--json", check_rc=0).stdout)
    assert [e["id"] for e in fine_tunable] == ["model-txt2img-stabilityai-stable-diffusion-v2-1-base"]
    chinese = json.loads(run_cli("catalog", "list", "--language", "zh", "--json", check_rc=0).stdout)
    assert chinese and all("zh" in e["languages"] for e in chinese)
    anime = json.loads(run_cli("catalog", "list", "--tag", "Anime", "--json", check_rc=0).stdout)
    assert anime and all("anime" in e["tags"] for e in anime)


def test_list_table_for_people(run_cli):
    result = run_cli("catalog", "list", "--tag", "demo", check_rc=0)
    assert "tiny-sd" in result.stdout and "1 model(s)" in result.stdout


@pytest.mark.parametrize("columns", ["80", "200"])
def test_list_table_keeps_every_id_whole(cli_env, columns):
    """The id is what a user copies into the next command: no terminal width may split it."""
    ids = [entry["id"] for entry in json.loads(_cli(cli_env, "catalog", "list", "--json").stdout)]
    table = _cli({**cli_env, "COLUMNS": columns}, "catalog", "list").stdout
    cells = {cell.strip() for line in table.splitlines() for cell in line.split("│")}
    assert [model_id for model_id in ids if model_id not in cells] == []
    assert max(len(line) for line in table.splitlines()) <= int(columns)


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "txt2img", *args], capture_output=True, text=True, env=env, timeout=120, check=True
    )


def test_show_prints_one_object_including_fine_tune_fields(run_cli):
    write_entry(finetune_entry())
    shown = json.loads(run_cli("catalog", "show", "my-dog", "--json", check_rc=0).stdout)
    assert shown["base"] == "tiny-sd" and shown["method"] == "lora" and shown["artifact"] == "/tmp/nowhere"
    table = run_cli("catalog", "show", "tiny-sd", check_rc=0).stdout
    assert "DEMO" in table and "models.yaml" in table


def test_unknown_id_exits_2_with_suggestions(run_cli):
    result = run_cli("catalog", "show", "model-txt2img-stabilityai-stable-diffusion-v2-1")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown model id" in lines[0] and "model-txt2img-stabilityai-stable-diffusion-v2-1-base" in lines[0]


def test_usage_errors_are_one_line_with_exit_2(run_cli):
    result = run_cli("catalog", "lst")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Did you mean 'list'" in result.stderr
    assert "Traceback" not in run_cli("catalog", "show").stderr


def test_search_ranks_and_prints_json(run_cli):
    results = json.loads(run_cli("catalog", "search", "ghibli", "--json", check_rc=0).stdout)
    assert results[0]["id"] == "huggingface-txt2img-nitrosocke-ghibli-diffusion"
    assert json.loads(run_cli("catalog", "search", "qqqqq", "--json", check_rc=0).stdout) == []


def test_validate_reports_problems_and_exit_code(run_cli, tmp_path):
    assert run_cli("catalog", "validate", check_rc=0).stdout == "ok: the merged catalog is valid\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"id": "x", "source": "finetune", "family": "tiny", "resolution": 0}))
    result = run_cli("catalog", "validate", str(bad))
    assert result.returncode == 1
    assert f"{bad}: entry 'x': field 'resolution': Input should be greater than 0" in result.stderr
    assert run_cli("catalog", "validate", str(tmp_path / "missing.yaml")).returncode == 2


def test_schema_export_for_editors(run_cli, tmp_path):
    target = tmp_path / "schema.json"
    run_cli("catalog", "schema", "-o", str(target), check_rc=0)
    schema = json.loads(target.read_text())
    assert "CatalogEntry" in json.dumps(schema) and schema["anyOf"]


def test_catalog_commands_do_not_import_heavy_libraries(cli_env):
    probe = (
        "import sys\n"
        "from txt2img.cli import main\n"
        "for args in (['catalog','search','anime'], ['catalog','list','--json'], ['catalog','show','tiny-sd']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exit:\n"
        "        assert not exit.code, exit.code\n"
        "heavy = sorted(m for m in ('torch','diffusers','bentoml','sagemaker','transformers','boto3')"
        " if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_remove_deletes_only_user_fine_tunes(run_cli):
    write_entry(finetune_entry())
    result = run_cli("catalog", "remove", "my-dog", "--yes", check_rc=0)
    assert "removed my-dog; its weights remain at /tmp/nowhere" in result.stdout
    assert run_cli("catalog", "show", "my-dog").returncode == 2
    refused = run_cli("catalog", "remove", "tiny-sd")
    assert refused.returncode == 2 and "only your fine-tunes can be removed" in refused.stderr
    assert run_cli("catalog", "remove", "my-do").returncode == 2
