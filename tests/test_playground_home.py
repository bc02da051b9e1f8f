"""The playground's routes on a troubled TXT2IMG_HOME: a user catalog file that does not validate, and
links and names the run files route must refuse. One ``bentoml serve`` serves every test here."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from bentoml_server import offline_server
from serving_finetunes import FULL_ID, LORA_ID, OTHER_FULL_ID, register_finetunes

from serving.playground import NotARunFile, fine_tune_runs, run_file

OUTSIDE_METRICS = {"clip_i": 0.99}
INSIDE_METRICS = {"clip_i": 0.5}


def write_report(folder: Path, metrics: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "metrics.json"
    report.write_text(json.dumps({"created": "2026-01-01T00:00:00Z", "metrics": metrics}))
    return report


def lay_out_troubled_home(home: Path, outside: Path) -> None:
    """Fine-tunes whose run folders hold links leading out of ``home``, and one bad catalog file."""
    (home / "catalog" / "broken.yaml").write_text("id: broken\nsource: builtin\nfamily: tiny\nresolution: -1\n")
    evaluations = home / "evaluations" / FULL_ID
    write_report(evaluations / "20260101T000000000000Z", INSIDE_METRICS)
    report_outside = write_report(outside / "report", OUTSIDE_METRICS)
    (evaluations / "20260102T000000000000Z").mkdir()
    (evaluations / "20260102T000000000000Z" / "metrics.json").symlink_to(report_outside)  # a file link out
    (evaluations / "20260103T000000000000Z").symlink_to(outside / "report")  # a folder link out
    (home / "evaluations" / LORA_ID).symlink_to(outside)  # a model's whole evaluations folder, out
    run = home / "models" / FULL_ID
    (run / "contact_sheet.png").symlink_to(outside / "report" / "metrics.json")  # out, and no image
    (run / "loss_curve.png").symlink_to(run / "model_index.json")  # inside, but no image
    (run / "validation").mkdir()
    (run / "validation" / "weights.png").symlink_to(run / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def troubled_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("troubled-home")
    register_finetunes(home)
    lay_out_troubled_home(home, tmp_path_factory.mktemp("outside"))
    return home


@pytest.fixture(scope="module")
def troubled_home_server(troubled_home) -> str:
    with offline_server(troubled_home) as url:
        yield url


def test_catalog_route_lists_the_bad_file_and_every_good_entry(troubled_home_server, troubled_home):
    response = httpx.get(f"{troubled_home_server}/ui/api/catalog", timeout=30)
    assert response.status_code == 200, response.text
    listing = response.json()
    assert {"tiny-sd", FULL_ID, LORA_ID, OTHER_FULL_ID} <= {model["id"] for model in listing["models"]}
    [problem] = listing["catalog_problems"]
    assert problem["file"] == str(troubled_home / "catalog" / "broken.yaml") and problem["field"] == "resolution"
    searched = httpx.get(f"{troubled_home_server}/ui/api/catalog", params={"q": LORA_ID}, timeout=30).json()
    assert searched["models"][0]["id"] == LORA_ID and searched["catalog_problems"] == listing["catalog_problems"]


def test_runs_route_lists_the_bad_file_and_every_fine_tune(troubled_home_server, troubled_home):
    response = httpx.get(f"{troubled_home_server}/ui/api/runs", timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert {run["model"]["id"] for run in answer["runs"]} == {FULL_ID, LORA_ID, OTHER_FULL_ID}
    assert [problem["file"] for problem in answer["catalog_problems"]] == [
        str(troubled_home / "catalog" / "broken.yaml")
    ]


def test_runs_read_no_report_through_a_link_leading_out_of_home(troubled_home):
    runs = {run["model"]["id"]: run for run in fine_tune_runs(troubled_home)["runs"]}
    assert [evaluation["metrics"] for evaluation in runs[FULL_ID]["evaluations"]] == [INSIDE_METRICS]
    assert runs[LORA_ID]["evaluations"] == []
    assert runs[FULL_ID]["contact_sheet"] is None and runs[FULL_ID]["loss_curve"] is None
    assert runs[FULL_ID]["validation"] == []


NO_RUN_FILES = {
    "5000 characters": "models/" + "a" * 5000 + ".png",
    "300-character name": f"models/{FULL_ID}/" + "b" * 300 + ".png",
    "png to json": f"models/{FULL_ID}/loss_curve.png",
    "png to weights": f"models/{FULL_ID}/validation/weights.png",
    "png to json outside": f"models/{FULL_ID}/contact_sheet.png",
    "file link out": f"evaluations/{FULL_ID}/20260102T000000000000Z/metrics.json",
    "folder link out": f"evaluations/{LORA_ID}/report/metrics.json",
}


@pytest.mark.parametrize("path", NO_RUN_FILES.values(), ids=NO_RUN_FILES.keys())
def test_run_file_refuses_what_is_no_run_file(troubled_home, path):
    with pytest.raises(NotARunFile):
        run_file(troubled_home, path)


@pytest.mark.parametrize("path", NO_RUN_FILES.values(), ids=NO_RUN_FILES.keys())
def test_files_route_answers_404_json_for_what_is_no_run_file(troubled_home_server, path):
    response = httpx.get(f"{troubled_home_server}/ui/files/{path}", timeout=30)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/json" and "error" in response.json()
