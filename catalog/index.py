"""A fast, read-only view of the merged catalog for lookups: list, filter, search, show.

The catalog's YAML files are validated by the pydantic schema once, and the result is cached
as plain JSON keyed by the files' sizes and modification times. Lookups read that cache, so
``txt2img catalog ...`` answers without importing pydantic, let alone torch.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from catalog.paths import atomic_write_text, catalog_files, user_catalog_dir
from txt2img.errors import InputError

CATALOG_DIR = Path(__file__).parent
# Any change to these invalidates the cache, as do changes to the catalog files themselves.
_CODE_FILES = (CATALOG_DIR / "schema.py", CATALOG_DIR / "index.py")


class UnknownModelError(InputError, KeyError):
    """A model id that is not in the catalog; carries the closest known ids."""

    http_status = 404

    def __init__(self, model_id: str, suggestions: list[str]):
        self.model_id = model_id
        self.suggestions = suggestions
        super().__init__(model_id)

    def __str__(self) -> str:
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        return f"unknown model id '{self.model_id}'.{hint} See `txt2img catalog list`."

    def as_json(self) -> dict:
        return {"error": str(self), "model": self.model_id, "suggestions": self.suggestions}


def suggest_ids(text: str, ids: list[str], limit: int = 3) -> list[str]:
    """The ids closest to ``text``, for 'did you mean' hints: completions first, then look-alikes."""
    lowered = text.lower()
    completions = sorted((i for i in ids if lowered and i.startswith(lowered)), key=len)
    look_alikes = difflib.get_close_matches(lowered, ids, n=limit, cutoff=0.5)
    containing = [i for i in ids if lowered and lowered in i]
    suggestions: list[str] = []
    for candidate in [*completions, *look_alikes, *containing]:
        if candidate not in suggestions:
            suggestions.append(candidate)
    return suggestions[:limit]


def _term_score(term: str, entry: dict[str, Any]) -> int:
    score = 0
    if term in entry["tags"]:
        score += 6
    if term == entry["id"]:
        score += 10
    elif term in entry["id"]:
        score += 4
    if entry["hf_repo"] and term in entry["hf_repo"].lower():
        score += 3
    if term in entry.get("base", ""):
        score += 2
    if term in (entry.get("example_prompt") or "").lower():
        score += 2
    if term in entry.get("description", "").lower():
        score += 1
    return score


class CatalogIndex:
    """The merged catalog as JSON-ready entry objects (``CatalogEntry.summary()``), in catalog order."""

    def __init__(self, entries: list[dict[str, Any]], origins: dict[str, str]):
        self.entries = entries
        self.origins = origins
        self._by_id = {entry["id"]: entry for entry in entries}

    def get(self, model_id: str) -> dict[str, Any]:
        try:
            return self._by_id[model_id]
        except KeyError:
            raise UnknownModelError(model_id, suggest_ids(model_id, list(self._by_id))) from None

    def filter(
        self, tag: str | None = None, language: str | None = None, fine_tunable: bool = False
    ) -> list[dict[str, Any]]:
        """Entries matching every given filter, in catalog order."""
        tag = tag.lower() if tag else None
        return [
            entry
            for entry in self.entries
            if (tag is None or tag in entry["tags"])
            and (language is None or language in entry["languages"])
            and (not fine_tunable or entry["fine_tunable"])
        ]

    def search(self, query: str) -> list[dict[str, Any]]:
        """Entries ranked by how well they match ``query``; canonical ids above their aliases."""
        terms = query.lower().split()
        scored = []
        for position, entry in enumerate(self.entries):
            score = sum(_term_score(term, entry) for term in terms)
            if score > 0:
                scored.append((-score, "alias_of" in entry, position, entry))
        return [item[-1] for item in sorted(scored, key=lambda item: item[:3])]


def _fingerprint(files: list[Path]) -> list[list[Any]]:
    stamps = []
    for path in [*_CODE_FILES, *files]:
        status = path.stat()
        stamps.append([str(path), status.st_mtime_ns, status.st_size])
    return stamps


def _cache_path(user_dir: Path) -> Path:
    return user_dir.parent / "cache" / "catalog-index.json"


def load_index(user_dir: Path | None = None) -> CatalogIndex:
    """The merged catalog's index, rebuilt (and re-validated) only when a source file changed.

    Raises ``catalog.store.CatalogError`` when the files are invalid.
    """
    user_dir = user_catalog_dir() if user_dir is None else user_dir
    files = catalog_files(user_dir)
    fingerprint = _fingerprint(files)
    cache = _cache_path(user_dir)
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached["fingerprint"] == fingerprint:
            return CatalogIndex(cached["entries"], cached["origins"])
    except (OSError, ValueError, KeyError):
        pass  # a missing, stale or damaged cache is simply rebuilt

    from catalog.store import load_catalog  # lazy: catalog.store imports this module at its top

    index = _index_of(load_catalog(user_dir))
    try:
        payload = {"fingerprint": fingerprint, "entries": index.entries, "origins": index.origins}
        atomic_write_text(cache, json.dumps(payload, ensure_ascii=False))
    except OSError:
        pass  # a read-only home still gets correct, just slower, answers
    return index


def load_index_skipping_bad_files(user_dir: Path | None = None) -> tuple[CatalogIndex, list]:
    """The index of every entry that loads, and the ``catalog.store.Problem`` of each user file left out.

    For the server's views, which list what is good and name what is not, as ``GET /models`` does
    (``catalog.store.load_catalog_skipping_bad_files``); a catalog with problems is not cached.
    """
    from catalog.store import CatalogError, load_catalog_skipping_bad_files

    try:
        return load_index(user_dir), []
    except CatalogError:
        catalog, problems = load_catalog_skipping_bad_files(user_dir)
        return _index_of(catalog), problems


def _index_of(catalog) -> CatalogIndex:
    """The index of a loaded ``catalog.store.Catalog``."""
    entries = [entry.summary() for entry in catalog]
    return CatalogIndex(entries, {entry.id: str(catalog.origin(entry.id)) for entry in catalog})
