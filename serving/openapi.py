"""``GET /docs.json`` as valid OpenAPI 3.0.

BentoML labels its document OpenAPI 3.0.2 but fills it with pydantic's JSON Schema (draft 2020-12):
``anyOf`` with a ``{"type": "null"}`` branch and numeric ``exclusiveMinimum``/``exclusiveMaximum``.
OpenAPI 3.0 has ``nullable`` and boolean exclusive bounds instead, so 3.0 tools (Swagger codegen,
validators) reject the document. ``openapi_3_0`` rewrites the whole document in one pass:
our models, BentoML's own (``TaskStatusResponse``) and the mounted SageMaker app's alike.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

from serving.bentoml_compat import OPENAPI_DOCUMENT_PATH, api_routes, openapi_document
from serving.guard import OPEN_PATHS
from serving.http_errors import GENERATION_ERRORS, ErrorBody
from serving.settings import ServingSettings

NULL = {"type": "null"}


def openapi_3_0(node: Any) -> Any:
    """A copy of an OpenAPI document (or any part of it) with JSON Schema 2020-12 turned into 3.0."""
    if isinstance(node, list):
        return [openapi_3_0(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: openapi_3_0(value) for key, value in node.items()}
    if NULL in node.get("anyOf", []):  # pydantic's Optional[X]
        node["nullable"] = True
        branches = [branch for branch in node.pop("anyOf") if branch != NULL]
        if len(branches) > 1:
            node["anyOf"] = branches
        elif "$ref" in branches[0]:
            node["allOf"] = branches  # 3.0 ignores anything beside a $ref
        else:
            node = {**branches[0], **node}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), (int, float)) and not isinstance(node[exclusive], bool):
            node[bound] = node[exclusive]
            node[exclusive] = True
    if "default" in node and node["default"] is None:
        # BentoML inlines a request body without the null branch of an optional field, but keeps its default.
        node["nullable"] = True
    return node


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that reads a JSON ``model`` itself (to answer errors in its
    protocol's shape): the model's schema with its nested models written in place, as a request body stated
    by hand has no ``$defs`` for them."""
    schema = model.model_json_schema()
    return {"required": True, "content": {"application/json": {"schema": inlined(schema, schema.get("$defs", {}))}}}


def inlined(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with each ``$ref`` to ``definitions`` replaced by the definition (for models that never nest
    themselves)."""
    if isinstance(schema, list):
        return [inlined(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        return inlined(definitions[schema["$ref"].rsplit("/", 1)[1]], definitions)
    return {key: inlined(value, definitions) for key, value in schema.items() if key != "$defs"}


def declare_error_answers(document: dict, routes: list[str]) -> dict:
    """The document with each route's error answers as the service gives them.

    BentoML declares 400, 404 and 500 for every API with bodies whose ``detail`` is a string; ours
    (and BentoML's own validation answer) carry a list there, and a route can also answer 429, 503, 504.
    """
    document["components"]["schemas"]["ErrorBody"] = ErrorBody.model_json_schema()
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for route in routes:
        responses = document["paths"][route]["post"]["responses"]
        for status, description in GENERATION_ERRORS.items():
            responses.pop(status, None)  # BentoML's own, keyed by number: both keys would be "400" in JSON
            responses[str(status)] = {"description": description, "content": error_body}
    return document


def declare_bearer_auth(document: dict) -> dict:
    """The document with TXT2IMG_API_TOKEN's bearer auth, and its 401, on every operation but the health checks."""
    document["components"].setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's TXT2IMG_API_TOKEN.",
    }
    unauthorized = {
        "description": "No Authorization: Bearer header with the server's token.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for path, item in document["paths"].items():
        if path in OPEN_PATHS:
            continue
        for operation in item.values():
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = unauthorized
    return document


class OpenAPI30Docs:
    """ASGI middleware answering ``GET /docs.json`` with the service's OpenAPI document, its error
    answers (and bearer auth, when TXT2IMG_API_TOKEN is set) declared as they are and the whole made valid 3.0."""

    def __init__(self, app, service) -> None:
        self.app = app
        self.service = service
        self.bearer_auth = ServingSettings().api_token is not None
        self.document: dict | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != OPENAPI_DOCUMENT_PATH:
            await self.app(scope, receive, send)
            return
        if self.document is None:  # the routes never change once the service runs
            document = declare_error_answers(openapi_document(self.service), api_routes(self.service))
            if self.bearer_auth:
                document = declare_bearer_auth(document)
            self.document = openapi_3_0(document)
        await JSONResponse(self.document)(scope, receive, send)
