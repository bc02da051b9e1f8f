"""Which catalog model each endpoint serves: kept on user fine-tunes' entries and, for built-in
and JumpStart models (whose catalog is read-only), in ``<TXT2IMG_HOME>/endpoints.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from catalog.paths import atomic_write_text, txt2img_home
from catalog.schema import Endpoint
from catalog.store import load_catalog, write_entry


class EndpointRecord(BaseModel):
    """One endpoint and the catalog model deployed on it."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    endpoint: Endpoint


class EndpointRecordsFile(BaseModel):
    """The layout of ``endpoints.yaml``."""

    model_config = ConfigDict(extra="forbid")

    endpoints: list[EndpointRecord] = []


def records_file() -> Path:
    return txt2img_home() / "endpoints.yaml"


def _read_file() -> EndpointRecordsFile:
    path = records_file()
    if not path.exists():
        return EndpointRecordsFile()
    return EndpointRecordsFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def _write_file(records: EndpointRecordsFile) -> None:
    text = yaml.safe_dump(records.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(records_file(), text)


def record_endpoint(model_id: str, endpoint: Endpoint) -> None:
    """Remember that ``endpoint`` serves ``model_id``, replacing an older record of the same name."""

    catalog = load_catalog()
    entry = catalog.get(model_id)
    if entry.source == "finetune":
        kept = [old for old in entry.endpoints if old.name != endpoint.name]
        write_entry(entry.model_copy(update={"endpoints": [*kept, endpoint]}), overwrite=True)
        return
    records = _read_file()
    kept = [old for old in records.endpoints if old.endpoint.name != endpoint.name]
    _write_file(EndpointRecordsFile(endpoints=[*kept, EndpointRecord(model_id=model_id, endpoint=endpoint)]))


def recorded_endpoints() -> list[EndpointRecord]:
    """Every recorded endpoint: those on fine-tune entries, then those in endpoints.yaml."""

    found = [
        EndpointRecord(model_id=entry.id, endpoint=endpoint)
        for entry in load_catalog()
        if entry.source == "finetune"
        for endpoint in entry.endpoints
    ]
    return found + _read_file().endpoints


def forget_endpoint(name: str) -> list[str]:
    """Drop every record of the endpoint ``name``; returns the model ids it was recorded on."""

    models = []
    for entry in load_catalog():
        if entry.source == "finetune" and any(old.name == name for old in entry.endpoints):
            kept = [old for old in entry.endpoints if old.name != name]
            write_entry(entry.model_copy(update={"endpoints": kept}), overwrite=True)
            models.append(entry.id)
    records = _read_file()
    kept_records = [record for record in records.endpoints if record.endpoint.name != name]
    if len(kept_records) != len(records.endpoints):
        models.extend(record.model_id for record in records.endpoints if record.endpoint.name == name)
        _write_file(EndpointRecordsFile(endpoints=kept_records))
    return models


def recorded_region(name: str) -> str | None:
    """The region txt2img deployed endpoint ``name`` to, if it did."""
    return next((record.endpoint.region for record in recorded_endpoints() if record.endpoint.name == name), None)
