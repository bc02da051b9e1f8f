"""Each BentoML internal serving/bentoml_compat.py wraps still exists and behaves as txt2img uses it.

One test per internal: a BentoML upgrade that renames or changes one fails here, naming it.
The HTTP app is BentoML's own, built for a one-route service and driven in process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml
import pytest
from starlette.testclient import TestClient

from serving import bentoml_compat


@bentoml.service
class Probe:
    @bentoml.api
    def echo(self, text: str) -> str:
        if text == "refuse":
            raise ValueError("refused")
        return text


@pytest.fixture(scope="module")
def probe_http_app():
    """BentoML's HTTP app for the probe service, as ``bentoml serve`` builds it for the main service."""
    from _bentoml_impl.server.app import ServiceAppFactory

    Probe.inject_config()
    with TestClient(ServiceAppFactory(Probe, is_main=True)(), raise_server_exceptions=False) as client:
        yield client


def test_a_refused_request_is_logged_on_the_refusal_logger(probe_http_app, caplog):
    import bentoml._internal.server.http_app as http_app

    assert http_app.logger.name == bentoml_compat.REFUSAL_LOGGER_NAME
    with caplog.at_level(logging.INFO, logger=bentoml_compat.REFUSAL_LOGGER_NAME):
        answer = probe_http_app.post("/echo", json={"text": "refuse"})
    assert answer.status_code == 500
    refusals = [record for record in caplog.records if record.name == bentoml_compat.REFUSAL_LOGGER_NAME]
    assert refusals and refusals[0].exc_info and isinstance(refusals[0].exc_info[1], ValueError)


def test_the_swagger_ui_and_the_openapi_document_are_where_we_expect(probe_http_app):
    page = probe_http_app.get(bentoml_compat.SWAGGER_UI_PATH)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "./static_content/swagger-ui-bundle.js" in page.text  # relative: it moves with the page
    document = probe_http_app.get(bentoml_compat.OPENAPI_DOCUMENT_PATH).json()
    assert "/echo" in document["paths"]


def test_openapi_document_is_the_served_one():
    document = bentoml_compat.openapi_document(Probe)
    assert document["openapi"].startswith("3.") and "/echo" in document["paths"]


def test_api_routes_are_the_services_api_paths():
    assert bentoml_compat.api_routes(Probe) == ["/echo"]


def test_bentoml_home_follows_bentoml_home_variable():
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert bentoml_compat.bentoml_home() == Path(BentoMLContainer.bentoml_home.get())
    assert bentoml_compat.bentoml_home().is_absolute()


def test_the_prometheus_folder_set_is_the_one_bentoml_serve_prepares(tmp_path):
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml.serving import ensure_prometheus_dir

    directory = tmp_path / "prometheus"
    bentoml_compat.set_prometheus_multiproc_dir(directory)
    try:
        assert ensure_prometheus_dir() == str(directory.absolute()) and directory.is_dir()
    finally:
        BentoMLContainer.prometheus_multiproc_dir.reset()


@pytest.mark.parametrize("name", ["txt2img-tiny-sd", "a" * 63])
def test_check_tag_name_accepts_what_bentoml_accepts(name):
    bentoml_compat.check_tag_name(name)


@pytest.mark.parametrize("name", ["a" * 64, "-starts-with-a-dash", "has space", ""])
def test_check_tag_name_refuses_what_bentoml_refuses(name):
    with pytest.raises(ValueError):
        bentoml_compat.check_tag_name(name)


def test_the_worker_module_is_the_one_bentoml_serve_starts_workers_with():
    import importlib.util

    from _bentoml_impl.server.serving import _SERVICE_WORKER_SCRIPT

    assert _SERVICE_WORKER_SCRIPT == bentoml_compat.WORKER_MODULE
    assert importlib.util.find_spec(bentoml_compat.WORKER_MODULE) is not None
