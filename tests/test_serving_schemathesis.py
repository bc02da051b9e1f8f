"""Property-based tests (schemathesis) of both OpenAPI documents the server serves: BentoML's ``/docs.json``
(every route) and the SageMaker app's ``/sagemaker/openapi.json``.

For every operation, a bounded number of requests built from its schema, valid and not: none may get
a 5xx, every 4xx must carry a JSON body with an ``error``, and each answer's status and content type
must be among those the document declares. Requests the schema allows but the server's configured
limits refuse (TXT2IMG_MAX_STEPS and friends, which the document does not state) get a 400, so
schemathesis's "valid data is accepted" check is not among them. The low limits keep every
generation at a few tiny-sd steps, so the run stays well within a minute. It runs in ``make test``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from bentoml_server import offline_server
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

EXAMPLES_PER_OPERATION = 25
# The server runs locked down, as a shared one would; every request carries the token.
AUTH = {"Authorization": "Bearer schemathesis-token"}


@pytest.fixture(scope="module")
def locked_down_server(tmp_path_factory):
    home: Path = tmp_path_factory.mktemp("schemathesis-home")
    limits = {"max_steps": "3", "max_images": "2", "max_pixels": str(64 * 64), "max_prompt_length": "200"}
    token = AUTH["Authorization"].removeprefix("Bearer ")
    with offline_server(home, api_token=token, **limits) as url:
        yield url


def client_error_has_a_json_body(ctx, response, case) -> None:
    if 400 <= response.status_code < 500:
        body = response.json()  # raises on a body that is not JSON
        assert isinstance(body, dict) and body.get("error"), f"a {response.status_code} without an error: {body}"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, client_error_has_a_json_body]
BOUNDED = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # every run starts afresh; nothing is written into the checkout
    # The same bounded cases on every run of the same code: a failure found in CI reproduces here.
    derandomize=True,
)


def failures_of(document_url: str, mode: schemathesis.GenerationMode) -> list[str]:
    """Every operation of the document, tried with BOUNDED requests of ``mode``: what went wrong, per operation."""
    failures = []
    for result in schemathesis.openapi.from_url(document_url, headers=AUTH).get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @BOUNDED
        def run(case):
            case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)

        try:
            run()
        except Unsatisfiable:  # no request breaks a schema without parameters or body, such as GET /ping's
            continue
        except Exception as failure:  # hypothesis has shrunk it to the simplest request that fails
            failures.append(f"{operation.label}: {failure}")
    return failures


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
@pytest.mark.parametrize("document", ["/docs.json", "/sagemaker/openapi.json"])
def test_every_operation_of_the_document_answers_as_it_declares(locked_down_server, document, mode):
    failures = failures_of(locked_down_server + document, mode)
    assert not failures, "\n\n".join(failures)


def test_the_documents_cover_every_documented_protocol(locked_down_server):
    """Ours, OpenAI's and AUTOMATIC1111's routes in /docs.json, SageMaker's in its own: the runs above miss none."""
    main = httpx.get(f"{locked_down_server}/docs.json", headers=AUTH, timeout=30).json()["paths"]
    sagemaker = httpx.get(f"{locked_down_server}/sagemaker/openapi.json", headers=AUTH, timeout=30).json()["paths"]
    assert {"/txt2img", "/images", "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/options"} <= set(main)
    assert {"/ping", "/invocations", "/models"} <= set(sagemaker)
