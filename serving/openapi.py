"""``GET /docs.json`` as valid OpenAPI 3.0.

BentoML labels its document OpenAPI 3.0.2 but fills it with pydantic's JSON Schema (draft 2020-12):
``anyOf`` with a ``{"type": "null"}`` branch, numeric ``exclusiveMinimum``/``exclusiveMaximum``,
``const``. OpenAPI 3.0 has ``nullable`` and boolean exclusive bounds instead, so 3.0 tools (Swagger
codegen, validators) reject the document. ``openapi_3_0`` rewrites the whole document in one pass:
our models, BentoML's own (``TaskStatusResponse``) and the mounted SageMaker app's alike.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

NULL = {"type": "null"}


def openapi_3_0(node: Any) -> Any:
    """A copy of an OpenAPI document (or any part of it) with JSON Schema 2020-12 turned into 3.0."""
    if isinstance(node, list):
        return [openapi_3_0(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: openapi_3_0(value) for key, value in node.items()}
    for union in ("anyOf", "oneOf"):
        if NULL in node.get(union, []):
            node["nullable"] = True
            branches = [branch for branch in node.pop(union) if branch != NULL]
            if len(branches) > 1:
                node[union] = branches
            elif branches and "$ref" in branches[0]:
                node["allOf"] = branches  # 3.0 ignores anything beside a $ref
            elif branches:
                node = {**branches[0], **node}
    if isinstance(node.get("type"), list):  # {"type": ["integer", "null"]}
        types = [name for name in node["type"] if name != "null"]
        node["nullable"] = node.get("nullable", False) or len(types) < len(node["type"])
        node["type"] = types[0]
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), (int, float)) and not isinstance(node[exclusive], bool):
            node[bound] = node[exclusive]
            node[exclusive] = True
    if "const" in node and not isinstance(node["const"], dict):  # a property called "const" is a dict
        node["enum"] = [node.pop("const")]
    if "default" in node and node["default"] is None:
        # BentoML inlines a request body without the null branch of an optional field, but keeps its default.
        node["nullable"] = True
    return node


class OpenAPI30Docs:
    """ASGI middleware answering ``GET /docs.json`` with the service's OpenAPI document made valid 3.0."""

    def __init__(self, app, service) -> None:
        self.app = app
        self.service = service
        self.document: dict | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json":
            await self.app(scope, receive, send)
            return
        if self.document is None:  # the routes never change once the service runs
            self.document = openapi_3_0(self.service.openapi_spec.asdict())
        await JSONResponse(self.document)(scope, receive, send)
