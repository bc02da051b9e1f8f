"""The catalog schema, loading, merging, duplicate detection and atomic writes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml
from catalog_entries import finetune_entry

from catalog.index import UnknownModelError, load_index
from catalog.paths import BUILTIN_CATALOG, WriteFailed, atomic_write_text, user_catalog_dir
from catalog.store import CatalogError, load_catalog, remove_entry, validate_path, write_entry

# The research table the catalog was built from.
JUMPSTART_TSV = Path(__file__).resolve().parent / "fixtures" / "jumpstart_txt2img_models.tsv"


def test_builtin_catalog_holds_every_jumpstart_id_and_the_demo():
    catalog = load_catalog()
    ids = catalog.ids()
    jumpstart = [i for i in ids if i.startswith(("huggingface-txt2img-", "model-txt2img-stabilityai-"))]
    assert len(jumpstart) == 95
    assert len([i for i in jumpstart if i.startswith("huggingface-txt2img-")]) == 90
    assert "tiny-sd" in catalog and catalog.get("tiny-sd").source == "builtin"
    assert [e.id for e in catalog if e.fine_tunable] == ["model-txt2img-stabilityai-stable-diffusion-v2-1-base"]
    with JUMPSTART_TSV.open(encoding="utf-8") as stream:
        rows = {row["jumpstart_model_id"]: row["hf_repo_id"] for row in csv.DictReader(stream, delimiter="\t")}
    assert {i: catalog.get(i).hf_repo for i in jumpstart} == rows


def test_catalog_families_aliases_and_trainability():
    catalog = load_catalog()
    assert catalog.get("model-txt2img-stabilityai-stable-diffusion-v2").resolution == 768
    flux = catalog.get("huggingface-txt2img-black-forest-labs-flux-1-schnell")
    assert flux.family == "flux" and not flux.locally_trainable
    alias = catalog.get("model-txt2img-stabilityai-stable-diffusion-v2-fp16")
    assert alias.alias_of == "model-txt2img-stabilityai-stable-diffusion-v2"
    assert catalog.get(alias.alias_of).hf_repo == alias.hf_repo
    assert catalog.get("tiny-sd").locally_trainable and not catalog.get("tiny-sd").fine_tunable


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_validation_names_file_entry_and_field(tmp_path):
    bad = write_yaml(
        tmp_path / "bad.yaml",
        {
            "models": [
                {"id": "ok-model", "source": "builtin", "family": "tiny", "resolution": 64},
                {"id": "neg-res", "source": "builtin", "family": "tiny", "resolution": -1},
                {"id": "Bad Id", "source": "builtin", "family": "tiny", "resolution": 64},
                {"id": "typo", "source": "builtin", "family": "tiny", "resolution": 64, "tagz": ["x"]},
                {"id": "odd-family", "source": "builtin", "family": "sd3", "resolution": 64},
            ]
        },
    )
    lines = [str(problem) for problem in validate_path(bad)]
    assert f"{bad}: entry 'neg-res': field 'resolution': Input should be greater than 0" in lines
    assert any(line.startswith(f"{bad}: entry 'Bad Id': field 'id':") and "lowercase" in line for line in lines)
    assert f"{bad}: entry 'typo': field 'tagz': Extra inputs are not permitted" in lines
    assert any("entry 'odd-family': field 'family'" in line and "'sd1'" in line for line in lines)
    assert len(lines) == 4


def test_validation_of_fine_tune_fields_and_broken_yaml(tmp_path):
    missing = write_yaml(
        tmp_path / "ft.yaml", {"id": "ft", "source": "finetune", "family": "tiny", "resolution": 64, "base": "tiny-sd"}
    )
    (problem,) = validate_path(missing)
    assert problem.entry_id == "ft" and "a finetune entry needs method, artifact" in problem.message

    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n", encoding="utf-8")
    (problem,) = validate_path(broken)
    assert str(problem).startswith(f"{broken}: invalid YAML")


def test_the_shipped_catalog_validates():
    assert validate_path(BUILTIN_CATALOG) == []
    assert validate_path() == []


def test_user_entries_merge_with_the_builtin_catalog():
    path = write_entry(finetune_entry())
    assert path.parent == user_catalog_dir()
    catalog = load_catalog()
    assert catalog.get("my-dog").base == "tiny-sd"
    assert catalog.origin("my-dog") == path
    assert len(catalog) == 97
    index = load_index()
    assert index.get("my-dog")["method"] == "lora"
    assert index.get("my-dog")["artifact"] == "/tmp/nowhere"


def test_duplicate_id_is_an_error_naming_both_files():
    user_dir = user_catalog_dir()
    user_dir.mkdir(parents=True)
    clash = write_yaml(
        user_dir / "clash.yaml", {"id": "tiny-sd", "source": "builtin", "family": "tiny", "resolution": 64}
    )
    with pytest.raises(CatalogError) as raised:
        load_catalog()
    message = str(raised.value)
    assert str(clash) in message and str(BUILTIN_CATALOG) in message and "duplicate id" in message


def test_write_entry_refuses_existing_ids_and_dangling_bases():
    write_entry(finetune_entry())
    with pytest.raises(CatalogError, match="already exists"):
        write_entry(finetune_entry())
    with pytest.raises(CatalogError, match="already exists"):
        write_entry(finetune_entry("tiny-sd"))
    with pytest.raises(CatalogError, match="refers to unknown id 'no-such-base'"):
        write_entry(finetune_entry("orphan", base="no-such-base"))
    updated = write_entry(finetune_entry(metrics={"final_loss": 0.05}), overwrite=True)
    assert yaml.safe_load(updated.read_text())["metrics"] == {"final_loss": 0.05}


def test_a_crash_between_write_and_rename_keeps_the_old_entry(monkeypatch):
    path = write_entry(finetune_entry())
    before = path.read_text()

    def crash(source, destination):
        raise OSError("power cut")

    with monkeypatch.context() as patch, pytest.raises(WriteFailed, match=r"cannot write .*my-dog.yaml: power cut"):
        patch.setattr(os, "replace", crash)
        write_entry(finetune_entry(metrics={"final_loss": 0.01}), overwrite=True)
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert load_catalog().get("my-dog").metrics == {"final_loss": 0.1}


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "deep" / "file.yaml"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"


def test_remove_entry_and_unknown_ids_suggest_close_matches():
    write_entry(finetune_entry())
    remove_entry("my-dog")
    assert "my-dog" not in load_catalog()
    with pytest.raises(UnknownModelError) as raised:
        load_catalog().get("tiny-s")
    assert raised.value.suggestions[0] == "tiny-sd"
    assert "Did you mean: tiny-sd" in str(raised.value)


def test_index_cache_follows_file_changes():
    assert "my-dog" not in [e["id"] for e in load_index().entries]
    path = write_entry(finetune_entry())
    assert load_index().get("my-dog")["base"] == "tiny-sd"
    path.unlink()
    with pytest.raises(UnknownModelError):
        load_index().get("my-dog")


def test_search_ranks_tag_and_id_matches_first():
    results = [e["id"] for e in load_index().search("anime")]
    assert len(results) >= 10
    assert all("anime" in load_index().get(i)["tags"] for i in results[:10])
    assert load_index().search("stable-diffusion-v2-1-base")[0]["id"] == (
        "model-txt2img-stabilityai-stable-diffusion-v2-1-base"
    )
    assert load_index().search("zzzz-nothing") == []
