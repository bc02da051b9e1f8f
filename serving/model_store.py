"""Catalog models kept in BentoML's model store, so that a Bento carries its weights.

``txt2img bento-model save ID`` exports a catalog model (a LoRA fused into its base) into a
store model named ``bento_model_name(ID)`` and labelled with the catalog id. The service finds
such models before the catalog's own sources (the HF cache, a fine-tune's folder, tiny-sd's code),
and a store-only fine-tune joins its catalog. ``bentoml build`` packs the models that env
``TXT2IMG_BENTO_MODELS`` names (catalog ids, comma-separated) when it imports the service.

Which store is searched is BentoML's choice: a served Bento's own models (in a container), else
the one under ``BENTOML_HOME``. Importing this module does not import bentoml.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from catalog.pipelines import export_model, exported_entry
from catalog.schema import CatalogEntry
from catalog.store import Catalog, Problem, merge_problems
from txt2img.errors import InputError

NAME_PREFIX = "txt2img-"
CATALOG_ID_LABEL = "catalog-id"
PACKED_MODELS_ENV = "TXT2IMG_BENTO_MODELS"
# A BentoML tag name: at most 63 characters, lowercase, starting and ending with a letter or digit.
_TAG_NAME_MAX = 63
_TAG_NAME = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class StoredModel:
    """A catalog model in BentoML's model store: its catalog entry, store tag and diffusers folder."""

    entry: CatalogEntry
    tag: str
    path: Path


class NotInModelStore(InputError):
    """A catalog id that should be in BentoML's model store is not there."""


def bento_model_name(catalog_id: str) -> str:
    """The store name of a catalog model: ``txt2img-<id>``, shortened with a hash where the id is too long."""
    name = NAME_PREFIX + catalog_id
    if len(name) <= _TAG_NAME_MAX and _TAG_NAME.match(name):
        return name
    digest = hashlib.sha256(catalog_id.encode()).hexdigest()[:8]
    head = name[: _TAG_NAME_MAX - len(digest) - 1].rstrip("-._")
    return f"{head}-{digest}"


def save_to_model_store(model_id: str, catalog: Catalog, local_files_only: bool = True) -> StoredModel:
    """Export catalog model ``model_id`` into a new version of its BentoML store model."""
    import bentoml

    entry = catalog.get(model_id)
    labels = {"project": "txt2img", CATALOG_ID_LABEL: entry.id}
    metadata = {"source": entry.source, "family": entry.family, "resolution": entry.resolution}
    if entry.base:
        metadata |= {"base": entry.base, "method": entry.method}
    with bentoml.models.create(bento_model_name(entry.id), labels=labels, metadata=metadata) as model:
        # BentoML's model folder is new and empty; the export manifest inside names the entry.
        export_model(entry.id, Path(model.path), catalog, local_files_only=local_files_only)
    saved = bentoml.models.get(model.tag)  # leaving the block copied the folder into the store
    return StoredModel(entry=entry, tag=str(saved.tag), path=Path(saved.path))


def stored_models() -> dict[str, StoredModel]:
    """The newest version of every catalog model in the active BentoML model store, by catalog id."""
    import bentoml

    newest: dict[str, StoredModel] = {}
    times: dict[str, datetime] = {}
    for model in bentoml.models.list():
        catalog_id = model.info.labels.get(CATALOG_ID_LABEL)
        if catalog_id is None or model.tag.name != bento_model_name(catalog_id):
            continue  # not one of ours
        if catalog_id in newest and times[catalog_id] >= model.creation_time:
            continue
        path = Path(model.path)
        newest[catalog_id] = StoredModel(entry=exported_entry(path), tag=str(model.tag), path=path)
        times[catalog_id] = model.creation_time
    return newest


def with_stored_entries(catalog: Catalog, stored: Iterable[StoredModel]) -> tuple[Catalog, list[Problem]]:
    """``catalog`` plus the stored models it lacks (a Bento's fine-tunes have no catalog files in a container).

    A stored entry whose ``base`` or ``alias_of`` is unknown here is left out, and said why.
    """
    pairs = [(entry, catalog.origin(entry.id)) for entry in catalog]
    extra = [(model.entry, model.path) for model in stored if model.entry.id not in catalog]
    problems: list[Problem] = []
    while True:
        merge = merge_problems(pairs + extra)
        if not merge:
            return Catalog(pairs + extra), problems
        problems.extend(merge)
        refused = {problem.entry_id for problem in merge}
        extra = [(entry, path) for entry, path in extra if entry.id not in refused]


def packed_model_ids() -> list[str]:
    """The catalog ids env ``TXT2IMG_BENTO_MODELS`` names, for ``bentoml build`` to pack."""
    return [part.strip() for part in os.environ.get(PACKED_MODELS_ENV, "").split(",") if part.strip()]


def bento_models_to_pack() -> list:
    """A ``bentoml.models.BentoModel`` for each id in ``TXT2IMG_BENTO_MODELS``: the newest stored version.

    Raises NotInModelStore for an id not saved yet, rather than BentoML's search of BentoCloud.
    """
    model_ids = packed_model_ids()
    if not model_ids:
        return []
    import bentoml

    stored = stored_models()
    missing = [model_id for model_id in model_ids if model_id not in stored]
    if missing:
        raise NotInModelStore(
            f"{PACKED_MODELS_ENV} names {', '.join(missing)}, not in BentoML's model store; "
            f"save with `txt2img bento-model save {missing[0]}` first"
        )
    return [bentoml.models.BentoModel(stored[model_id].tag) for model_id in model_ids]
