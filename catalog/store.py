"""Loading, merging, validating and atomically writing catalog YAML files.

The catalog is the built-in ``catalog/models.yaml`` merged with the user catalog directory,
which holds one YAML file per fine-tuned model. Light on purpose: no torch here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from catalog.index import UnknownModelError, suggest_ids
from catalog.paths import (
    BUILTIN_CATALOG,
    ENTRY_SUFFIX,
    atomic_write_text,
    catalog_files,
    exclusive_create_bytes,
    user_catalog_dir,
)
from catalog.schema import CatalogEntry
from txt2img.errors import InputError

try:  # libyaml's loader is several times faster; fall back where it is not compiled in.
    _YamlLoader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _YamlLoader = yaml.SafeLoader


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a catalog file, located down to the field."""

    file: Path
    entry_id: str | None
    field: str | None
    message: str

    def as_json(self) -> dict[str, str | None]:
        return {"file": str(self.file), "entry": self.entry_id, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        where = [str(self.file)]
        if self.entry_id:
            where.append(f"entry '{self.entry_id}'")
        if self.field:
            where.append(f"field '{self.field}'")
        return f"{': '.join(where)}: {self.message}"


class CatalogError(InputError):
    """The catalog files cannot be loaded; ``problems`` says exactly where and why."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


def _read_yaml(path: Path) -> tuple[Any, list[Problem]]:
    try:
        with path.open(encoding="utf-8") as stream:
            return yaml.load(stream, Loader=_YamlLoader), []
    except OSError as error:
        return None, [Problem(path, None, None, f"cannot read: {error.strerror or error}")]
    except yaml.YAMLError as error:
        return None, [Problem(path, None, None, f"invalid YAML: {error}")]


def _parse_entry(raw: Any, path: Path) -> tuple[CatalogEntry | None, list[Problem]]:
    entry_id = raw.get("id") if isinstance(raw, dict) else None
    entry_id = entry_id if isinstance(entry_id, str) else None
    try:
        return CatalogEntry.model_validate(raw), []
    except ValidationError as error:
        problems = []
        for detail in error.errors():
            field = ".".join(str(part) for part in detail["loc"]) or None
            problems.append(Problem(path, entry_id, field, detail["msg"]))
        return None, problems


def parse_catalog_file(path: Path) -> tuple[list[CatalogEntry], list[Problem]]:
    """Parse a YAML file holding either ``models: [...]`` or a single entry mapping."""
    data, problems = _read_yaml(path)
    if problems:
        return [], problems
    if isinstance(data, dict) and "models" in data:
        raw_entries = data["models"]
        if not isinstance(raw_entries, list):
            return [], [Problem(path, None, "models", "must be a list of entries")]
    elif isinstance(data, dict):
        raw_entries = [data]
    else:
        return [], [Problem(path, None, None, "must be a mapping: one entry, or `models:` with a list")]
    entries: list[CatalogEntry] = []
    for index, raw in enumerate(raw_entries):
        if not isinstance(raw, dict):
            problems.append(Problem(path, None, f"models.{index}", "must be a mapping"))
            continue
        entry, entry_problems = _parse_entry(raw, path)
        problems.extend(entry_problems)
        if entry is not None:
            entries.append(entry)
    return entries, problems


def merge_problems(pairs: list[tuple[CatalogEntry, Path]]) -> list[Problem]:
    """What stops these entries from forming one catalog: ids defined twice (the later file is
    blamed) and ``alias_of``/``base`` references to ids that are not among them."""
    origin: dict[str, Path] = {}
    firsts = []
    problems = []
    for entry, path in pairs:
        if entry.id in origin:
            problems.append(Problem(path, entry.id, "id", f"duplicate id: also defined in {origin[entry.id]}"))
        else:
            origin[entry.id] = path
            firsts.append((entry, path))
    for entry, path in firsts:
        for field in ("alias_of", "base"):
            target = getattr(entry, field)
            if target is not None and target not in origin:
                problems.append(Problem(path, entry.id, field, f"refers to unknown id '{target}'"))
    return problems


class Catalog:
    """All known models, keyed by id, each remembering the file it came from."""

    def __init__(self, entries: Iterable[tuple[CatalogEntry, Path]]):
        pairs = list(entries)
        problems = merge_problems(pairs)
        if problems:
            raise CatalogError(problems)
        self._entries: dict[str, CatalogEntry] = {entry.id: entry for entry, _ in pairs}
        self._origin: dict[str, Path] = {entry.id: path for entry, path in pairs}

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        return list(self._entries)

    def origin(self, model_id: str) -> Path:
        return self._origin[model_id]

    def get(self, model_id: str) -> CatalogEntry:
        """The entry for ``model_id``; raises UnknownModelError with close matches otherwise."""
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModelError(model_id, suggest_ids(model_id, self.ids())) from None


def load_catalog(user_dir: Path | None = None, builtin: Path = BUILTIN_CATALOG) -> Catalog:
    """The merged catalog; raises CatalogError listing every problem found."""
    pairs: list[tuple[CatalogEntry, Path]] = []
    problems: list[Problem] = []
    for path in catalog_files(user_dir, builtin):
        entries, file_problems = parse_catalog_file(path)
        problems.extend(file_problems)
        pairs.extend((entry, path) for entry in entries)
    if problems:
        raise CatalogError(problems)
    return Catalog(pairs)


def load_catalog_skipping_bad_files(
    user_dir: Path | None = None, builtin: Path = BUILTIN_CATALOG
) -> tuple[Catalog, list[Problem]]:
    """The merged catalog without the user files that have problems, and those problems.

    For a server: one bad entry file must not take every good model down with it. A file is
    skipped whole, and so is a file whose entry needs a skipped one (a LoRA whose base is gone).
    The built-in catalog ships with the code, so a problem in it still raises CatalogError.
    """
    pairs: list[tuple[CatalogEntry, Path]] = []
    problems: list[Problem] = []
    for path in catalog_files(user_dir, builtin):
        entries, file_problems = parse_catalog_file(path)
        problems.extend(file_problems)
        if not file_problems:
            pairs.extend((entry, path) for entry in entries)
    while True:
        if any(problem.file == builtin for problem in problems):
            raise CatalogError(problems)
        merge = merge_problems(pairs)
        if not merge:
            return Catalog(pairs), problems
        problems.extend(merge)
        bad_files = {problem.file for problem in merge}
        pairs = [(entry, path) for entry, path in pairs if path not in bad_files]


def validate_path(path: Path | None = None, user_dir: Path | None = None) -> list[Problem]:
    """Every problem in a catalog file, a directory of entry files, or (no path) the merged catalog."""
    if path is None:
        files = catalog_files(user_dir)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            return [Problem(path, None, None, "no .yaml files in this directory")]
    else:
        files = [path]
    pairs: list[tuple[CatalogEntry, Path]] = []
    problems: list[Problem] = []
    for file in files:
        entries, file_problems = parse_catalog_file(file)
        problems.extend(file_problems)
        pairs.extend((entry, file) for entry in entries)
    if path is None or path.resolve() == BUILTIN_CATALOG.resolve():
        # Only a complete catalog can check ids against each other and references.
        try:
            Catalog(pairs)
        except CatalogError as error:
            problems.extend(error.problems)
    else:
        seen: dict[str, Path] = {}
        for entry, file in pairs:
            if entry.id in seen:
                problems.append(Problem(file, entry.id, "id", f"duplicate id: also defined in {seen[entry.id]}"))
            seen.setdefault(entry.id, file)
    return problems


def entry_path(model_id: str, user_dir: Path | None = None) -> Path:
    return (user_catalog_dir() if user_dir is None else user_dir) / f"{model_id}{ENTRY_SUFFIX}"


def entry_yaml(entry: CatalogEntry) -> str:
    """The YAML text of a user entry file."""
    return yaml.safe_dump(entry.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)


def write_entry(entry: CatalogEntry, user_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Register (or, with ``overwrite``, replace) a user catalog entry, atomically.

    Refuses an id held by another file, and a ``base`` or ``alias_of`` the catalog lacks.
    """
    path = entry_path(entry.id, user_dir)
    catalog = load_catalog(user_dir)
    if entry.id in catalog and (not overwrite or catalog.origin(entry.id) != path):
        raise CatalogError([Problem(path, entry.id, "id", f"id already exists in {catalog.origin(entry.id)}")])
    others = [(other, catalog.origin(other.id)) for other in catalog if other.id != entry.id]
    Catalog([*others, (entry, path)])  # raises CatalogError on a dangling reference
    text = entry_yaml(entry)
    if overwrite:
        atomic_write_text(path, text)
        return path
    try:
        exclusive_create_bytes(path, text.encode("utf-8"))
    except FileExistsError:  # registered by another process since the catalog was read
        raise CatalogError([Problem(path, entry.id, "id", f"id already exists in {path}")]) from None
    return path


class NameInUse(InputError):
    """Another process holds the claim on a model name."""


def claim_file(model_id: str, user_dir: Path | None = None) -> Path:
    """The file whose lock is the claim on ``model_id`` (see claim_name)."""
    return (user_catalog_dir() if user_dir is None else user_dir) / f".{model_id}.claim"


@contextmanager
def claim_name(model_id: str, user_dir: Path | None = None, wait: bool = False) -> Iterator[None]:
    """Hold ``model_id`` for this process while it creates that model; a second claim fails at once
    (or, with ``wait``, waits until the holder is done).

    The claim is an exclusive ``flock`` on a file beside the entries, so the kernel drops it when
    the process ends, however it ends: a killed run never leaves a stale claim behind.
    """
    import fcntl

    path = claim_file(model_id, user_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        claim = open(path, "a+", encoding="utf-8")  # closed on each way out below
        try:
            fcntl.flock(claim, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claim.seek(0)
            holder = claim.read().strip() or "unknown"
            claim.close()
            raise NameInUse(
                f"model '{model_id}' is being created by another run (pid {holder}); "
                "wait for it to finish or pick another --name"
            ) from None
        if _is_still_at(claim, path):
            break
        claim.close()  # remove_model deleted the file while this process waited for its lock
    with claim:
        claim.seek(0)
        claim.truncate()
        claim.write(str(os.getpid()))
        claim.flush()
        yield


def _is_still_at(opened, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(opened.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def remove_entry(model_id: str, user_dir: Path | None = None) -> None:
    """Delete a user catalog entry (built-in entries cannot be removed)."""
    path = entry_path(model_id, user_dir)
    if not path.exists():
        raise UnknownModelError(model_id, suggest_ids(model_id, load_catalog(user_dir).ids()))
    path.unlink()


def remove_model(model_id: str, folders: Iterable[Path] = (), user_dir: Path | None = None) -> None:
    """Free the name ``model_id``: delete ``folders`` (its run's), its entry and its claim file.

    It holds the name's claim meanwhile, so a run creating this model now keeps it (NameInUse).
    """
    import shutil

    with claim_name(model_id, user_dir):
        for folder in folders:
            shutil.rmtree(folder)
        remove_entry(model_id, user_dir)
        claim_file(model_id, user_dir).unlink()
