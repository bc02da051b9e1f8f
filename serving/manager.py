"""The pipeline manager: catalog id in, ready pipeline out, with an LRU of loaded models bounded by count and bytes.

A LoRA fine-tune never loads a second copy of its base: its adapter is loaded once onto the base
pipeline and switched on with ``set_adapters`` when a request asks for it. Jumpstart aliases that
serve the same repo share one pipeline too. Only catalog ids can be loaded, never paths.
A model in BentoML's model store (serving/model_store.py) is loaded from there, before any other
source, and a LoRA stored that way comes fused: a pipeline of its own.

Not thread-safe for pipeline use: one generation thread owns the pipelines (see serving/generation_queue.py).
``loaded_ids`` may be read from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from catalog.pipelines import ModelLoadError, apply_lora, load_base_pipeline
from catalog.schema import CatalogEntry
from catalog.store import Catalog, Problem, load_catalog_skipping_bad_files
from serving.device import (
    default_memory_budget,
    optimize_for_device,
    pick_device,
    pick_dtype,
    release_device_memory,
    weights_bytes,
)
from serving.model_store import StoredModel, with_stored_entries
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)


@dataclass
class LoadedBase:
    """A pipeline in memory with the LoRA adapters loaded onto it."""

    entry: CatalogEntry
    pipeline: object
    nbytes: int
    adapters: dict[str, str] = field(default_factory=dict)  # catalog id -> adapter name


class DownloadsForbidden(ModelLoadError):
    """A request asks for a Hub model missing from the HF cache, and TXT2IMG_ALLOW_DOWNLOADS is off.

    403 and no Retry-After: unlike a failed load, asking again will not help."""

    http_status = 403
    retry_after_s = None

    def __init__(self, entry: CatalogEntry):
        self.model_id = entry.id
        super().__init__(
            f"model '{entry.id}' ({entry.hf_repo}) is not in this server's Hugging Face cache, and "
            "TXT2IMG_ALLOW_DOWNLOADS is off, so a request cannot download it; ask the operator to fetch it"
        )

    def as_json(self) -> dict:
        return {"error": str(self), "model": self.model_id}


def in_hf_cache(repo: str) -> bool:
    """Whether the HF cache holds a snapshot of ``repo`` (its model_index.json), without asking the Hub."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "model_index.json"), str)


class PipelineManager:
    """Loads catalog models on demand and keeps the most recently used ones in memory."""

    def __init__(
        self,
        settings: ServingSettings,
        catalog: Catalog | None = None,
        worker_index: int | None = None,
        stored: dict[str, StoredModel] | None = None,
    ):
        """``worker_index``: BentoML's worker number, which picks this worker's GPU; ``stored``: the models
        BentoML's model store holds, by catalog id (``model_store.stored_models()``)."""
        self.settings = settings
        self.stored = stored or {}
        self.device = pick_device(settings, worker_index)
        self.dtype = pick_dtype(settings, self.device)
        gigabytes = settings.memory_budget_gb
        self.memory_budget = int(gigabytes * 2**30) if gigabytes else default_memory_budget(self.device)
        self._logged_problems: set[Problem] = set()
        self.catalog_problems: list[Problem] = []
        if catalog is None:
            self.refresh_catalog()
        else:
            self._catalog, self.catalog_problems = with_stored_entries(catalog, self.stored.values())
        self._bases: OrderedDict[str, LoadedBase] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def load_dtype(self):
        """The dtype to load weights in; None keeps checkpoints' own fp32 without a cast."""
        import torch

        return None if self.dtype == torch.float32 else self.dtype

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def refresh_catalog(self) -> None:
        """Re-read the catalog files. A bad user file is skipped, kept in ``catalog_problems`` and logged once.

        Stored models the files lack join the catalog (in a container, a Bento's fine-tunes have no files).
        """
        files_catalog, self.catalog_problems = load_catalog_skipping_bad_files()
        self._catalog, stored_problems = with_stored_entries(files_catalog, self.stored.values())
        self.catalog_problems += stored_problems
        for problem in self.catalog_problems:
            if problem not in self._logged_problems:
                self._logged_problems.add(problem)
                logger.warning("catalog file skipped: %s", problem)

    def entry(self, model_id: str) -> CatalogEntry:
        """The catalog entry for ``model_id``, re-reading the catalog once for ids registered since start."""
        if model_id not in self._catalog:
            self.refresh_catalog()
        return self._catalog.get(model_id)

    def base_entry(self, entry: CatalogEntry) -> CatalogEntry:
        """The entry whose weights a request for ``entry`` runs on: itself when stored (see the module's
        docstring), else a LoRA's base, an alias's target, or itself."""
        if entry.id in self.stored:
            return entry
        if entry.method == "lora":
            entry = self._catalog.get(entry.base)
        return self._catalog.get(entry.alias_of) if entry.alias_of else entry

    def loaded_ids(self) -> list[str]:
        """Catalog ids servable without loading weights, most recently used last."""
        with self._lock:
            return [model_id for base in self._bases.values() for model_id in (base.entry.id, *base.adapters)]

    def pipeline_for(self, entry: CatalogEntry, *, for_request: bool = False):
        """The loaded pipeline for ``entry``, with the right LoRA adapter switched on (or all of them off).

        ``for_request``: a client asked for it, so it may only be downloaded if TXT2IMG_ALLOW_DOWNLOADS is on.
        """
        base = self._base(self.base_entry(entry), for_request)
        pipeline = base.pipeline
        if entry.method == "lora" and base.entry.id != entry.id:
            if entry.id not in base.adapters:
                base.adapters[entry.id] = apply_lora(pipeline, entry)
            pipeline.enable_lora()
            pipeline.set_adapters([base.adapters[entry.id]])
        elif base.adapters:
            pipeline.disable_lora()
        return pipeline

    def _base(self, entry: CatalogEntry, for_request: bool) -> LoadedBase:
        with self._lock:
            loaded = self._bases.get(entry.id)
            if loaded is not None:
                self._bases.move_to_end(entry.id)
                return loaded
        local_files_only = self.settings.local_files_only
        if for_request and not self.settings.allow_downloads and entry.hf_repo:
            if not in_hf_cache(entry.hf_repo):
                raise DownloadsForbidden(entry)
            local_files_only = True  # what is cached is loaded as it is: nothing is fetched to complete it
        if for_request and not self.settings.allow_downloads and entry.config:
            local_files_only = True  # a single file's configuration is read from the cache, never fetched
        # Load on the CPU first: its size is then known, and room is made before it reaches the GPU.
        # Without the repo's own safety checker: TXT2IMG_SAFETY_CHECKER decides (serving/safety.py).
        stored = self.stored.get(entry.id)
        pipeline = load_base_pipeline(
            entry,
            weights=stored.path if stored else None,
            torch_dtype=self.load_dtype,
            local_files_only=local_files_only,
            safety_checker=None,
        )
        nbytes = weights_bytes(pipeline)
        self._make_room(nbytes)
        attention = optimize_for_device(pipeline, self.device, self.settings)
        logger.info(
            "loaded %s%s on %s (%s, attention %s, %.1f MiB)",
            entry.id,
            f" from BentoML model {stored.tag}" if stored else "",
            self.device,
            self.dtype,
            attention,
            nbytes / 2**20,
        )
        loaded = LoadedBase(entry=entry, pipeline=pipeline, nbytes=nbytes)
        with self._lock:
            self._bases[entry.id] = loaded
        return loaded

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used pipelines until ``incoming`` bytes fit the count and byte budgets."""
        evicted = False
        with self._lock:
            while self._bases and (
                len(self._bases) >= self.settings.max_loaded_models
                or (self.memory_budget is not None and self.resident_bytes() + incoming > self.memory_budget)
            ):
                model_id, _ = self._bases.popitem(last=False)
                logger.info("evicted %s", model_id)
                evicted = True
        if evicted:
            release_device_memory(self.device)

    def resident_bytes(self) -> int:
        return sum(base.nbytes for base in self._bases.values())
