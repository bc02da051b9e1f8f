"""Every BentoML internal txt2img relies on, in one place.

BentoML's public API (``bentoml>=1.4,<2``) offers none of these. Each item says which internal it wraps
and why we need it; tests/test_bentoml_compat.py checks each against the installed BentoML, so an
upgrade that changes one fails there, by name, rather than somewhere in a running server.
bentoml is imported inside the functions: importing this module stays light (``txt2img catalog`` may).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# BentoML's HTTP apps (``_bentoml_impl/server/app.py``) hand an exception raised by an API to
# ``bentoml._internal.server.http_app.log_exception``, which logs it on that module's logger as ERROR
# with a traceback. serving/http_errors.py filters this logger so that a refused request logs one line.
REFUSAL_LOGGER_NAME = "bentoml._internal.server.http_app"

# Where BentoML's HTTP app serves its Swagger UI page (whose assets and document are links relative
# to it) and the service's OpenAPI document. serving/openapi.py answers the document's path itself, to
# serve valid OpenAPI 3.0; serving/playground.py moves the Swagger UI to /docs to put the playground at /.
SWAGGER_UI_PATH = "/"
OPENAPI_DOCUMENT_PATH = "/docs.json"

# The module ``bentoml serve`` runs each worker process as (``python -m ...``): what tells a worker
# apart from the server and its other children, for the tests and benchmarks that watch or kill one.
WORKER_MODULE = "_bentoml_impl.worker.service"


def bentoml_home() -> Path:
    """BentoML's home folder (``BENTOML_HOME`` or its default), as BentoML resolves it.

    Wraps ``BentoMLContainer.bentoml_home``: serving/metrics.py keeps each server's Prometheus folder there.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def set_prometheus_multiproc_dir(directory: Path) -> None:
    """Make ``bentoml serve`` give its workers this Prometheus folder (as ``PROMETHEUS_MULTIPROC_DIR``).

    Wraps ``BentoMLContainer.prometheus_multiproc_dir``, the setting ``bentoml.serving.ensure_prometheus_dir``
    reads after the service is imported: by default every server on a machine shares one folder, so two
    servers would count each other's requests (serving/metrics.py ``own_prometheus_dir``).
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.prometheus_multiproc_dir.set(str(directory))


def openapi_document(service: Any) -> dict:
    """The service's OpenAPI document as BentoML serves it at ``/docs.json``, as a dict.

    Wraps ``Service.openapi_spec.asdict()``: serving/openapi.py rewrites this document into valid OpenAPI 3.0.
    """
    return service.openapi_spec.asdict()


def api_routes(service: Any) -> list[str]:
    """The paths of the service's ``@bentoml.api`` methods.

    Wraps ``Service.apis`` and each API method's ``route``: serving/openapi.py declares the error answers
    of exactly these routes.
    """
    return [api.route for api in service.apis.values()]


def check_tag_name(name: str) -> None:
    """Raise ``ValueError`` when BentoML would refuse ``name`` as a model store tag name.

    Wraps ``bentoml._internal.tag.validate_tag_str``: the store names serving/model_store.py derives from
    catalog ids must all be valid tags, and BentoML's rule for them is only there.
    """
    from bentoml._internal.tag import validate_tag_str

    validate_tag_str(name)
