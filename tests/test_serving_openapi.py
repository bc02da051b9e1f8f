"""The OpenAPI 3.0 rewrite and the one-line log of a refused request, without a server."""

from __future__ import annotations

import logging
import sys

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from pydantic import BaseModel, Field, ValidationError

from serving.bentoml_compat import REFUSAL_LOGGER_NAME
from serving.http_errors import ClientErrorsAsOneLine
from serving.openapi import openapi_3_0


class Part(BaseModel):
    name: str


class Sample(BaseModel):
    size: int | None = Field(None, gt=0, lt=100)
    part: Part | None = None
    words: str | list[str] | None = None


def document(schemas: dict) -> dict:
    return {"openapi": "3.0.2", "info": {"title": "t", "version": "1"}, "paths": {}, "components": {"schemas": schemas}}


def test_pydantic_json_schema_becomes_valid_openapi_3_0():
    schemas = Sample.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = {"Sample": schemas, **schemas.pop("$defs")}
    with pytest.raises(OpenAPIValidationError):
        validate(document(schemas))
    converted = openapi_3_0(document(schemas))
    validate(converted)
    properties = converted["components"]["schemas"]["Sample"]["properties"]
    assert properties["size"] == {
        "type": "integer",
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 100,
        "exclusiveMaximum": True,
        "default": None,
        "title": "Size",
        "nullable": True,
    }
    assert properties["part"]["allOf"] == [{"$ref": "#/components/schemas/Part"}] and properties["part"]["nullable"]
    assert properties["words"]["anyOf"] == [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]


def refusal_record(error: Exception) -> logging.LogRecord:
    try:
        raise error
    except type(error):
        exc_info = sys.exc_info()
    return logging.LogRecord(
        REFUSAL_LOGGER_NAME,
        logging.ERROR,
        __file__,
        1,
        "Exception on %s [%s]",
        ("/txt2img", "POST"),
        exc_info,
    )


def test_a_validation_error_is_logged_as_one_info_line():
    try:
        Sample(size=0)
    except ValidationError as error:
        record = refusal_record(error)
    assert ClientErrorsAsOneLine().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == "Refused /txt2img [POST]: invalid request: size: Input should be greater than 0"


def test_a_server_error_keeps_its_traceback():
    record = refusal_record(RuntimeError("boom"))
    assert ClientErrorsAsOneLine().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
