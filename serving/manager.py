"""The pipeline manager: catalog id in, ready pipeline out, with an LRU of loaded models bounded by count and bytes.

A LoRA fine-tune never loads a second copy of its base: its adapter is loaded onto the base pipeline
and each call switches on exactly its request's adapters at their scales (serving/adapters.py says which)
with ``set_adapters``. Loaded adapters are an LRU cache bounded by TXT2IMG_LORA_CACHE_MB: the least
recently used ones are unloaded with ``delete_adapters`` while their base stays, and an adapter of the
call being prepared is never unloaded. Jumpstart aliases that serve the same repo share one pipeline too.
Only catalog ids can be loaded, never paths.
A model in BentoML's model store (serving/model_store.py) is loaded from there, before any other
source, and a LoRA stored that way comes fused: a pipeline of its own.

Not thread-safe for pipeline use: one generation thread owns the pipelines (see serving/generation_queue.py).
``loaded_ids`` may be read from any thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from catalog.pipelines import ModelLoadError, apply_lora, load_base_pipeline
from catalog.schema import CatalogEntry
from catalog.store import Catalog, Problem, load_catalog_skipping_bad_files
from serving.adapters import AdapterSet, LoraLoadError, adapter_bytes, adapter_set, check_loras
from serving.device import (
    default_memory_budget,
    optimize_for_device,
    pick_device,
    pick_dtype,
    release_device_memory,
    weights_bytes,
)
from serving.lora_hotswap import LoraSlots, compiled_lora_slots, takes_lora_slots
from serving.mixed_loras import AdapterMix, adapts_unet_only
from serving.model_store import StoredModel, with_stored_entries
from serving.schema import LoraWeight
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    """A LoRA adapter loaded onto a base pipeline."""

    name: str  # the adapter's name in the pipeline's modules
    nbytes: int  # its parameters' bytes, counted against TXT2IMG_LORA_CACHE_MB
    last_used: int  # when a call last switched it on, in calls: the LRU's order


@dataclass
class LoadedBase:
    """A pipeline in memory with the LoRA adapters loaded onto it."""

    entry: CatalogEntry
    pipeline: object
    nbytes: int
    adapters: dict[str, LoadedAdapter] = field(default_factory=dict)  # by catalog id
    slots: LoraSlots | None = None  # a compiled UNet's fixed adapter slots, which take the place of ``adapters``


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
        self._calls = itertools.count()  # the adapters' clock: their LRU order
        self.lora_cache_budget = int(settings.lora_cache_mb * 2**20)

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

    def lora_base_id(self, entry: CatalogEntry) -> str:
        """The id of the weights ``entry``'s LoRAs must adapt: a LoRA's base, an alias's target, or itself
        (a LoRA stored fused still counts as its base's, whose LoRAs fit it)."""
        if entry.method == "lora":
            entry = self._catalog.get(entry.base)
        return entry.alias_of or entry.id

    def check_loras(self, entry: CatalogEntry, loras: Sequence[LoraWeight]) -> None:
        """Raise serving/adapters.py's LoraRefused for ``loras`` a request for ``entry`` cannot run with."""
        if not loras:
            return
        if any(lora.model not in self._catalog for lora in loras):
            self.refresh_catalog()  # ids registered since start
        catalog = self._catalog
        check_loras(
            entry,
            loras,
            lookup=lambda model_id: catalog.get(model_id) if model_id in catalog else None,
            known_ids=catalog.ids,
            weights_of=self.lora_base_id,
        )

    def loaded_ids(self) -> list[str]:
        """Catalog ids servable without loading weights, most recently used last."""
        with self._lock:
            return [model_id for base in self._bases.values() for model_id in (base.entry.id, *self._by_use(base))]

    @staticmethod
    def _by_use(base: LoadedBase) -> list[str]:
        return sorted(base.adapters, key=lambda lora_id: base.adapters[lora_id].last_used)

    def pipeline_for(self, entry: CatalogEntry, loras: Sequence[LoraWeight] = (), *, for_request: bool = False):
        """The loaded pipeline for ``entry`` with exactly the adapters of ``entry`` and ``loras`` switched on,
        at their scales (serving/adapters.py ``adapter_set``), or LoRA switched off when there are none.

        ``for_request``: a client asked for it, so it may only be downloaded if TXT2IMG_ALLOW_DOWNLOADS is on.
        """
        base = self._base(self.base_entry(entry), for_request)
        self._activate(base, adapter_set(entry, loras, base.entry))
        return base.pipeline

    def batch_group(self, entry: CatalogEntry, loras: Sequence[LoraWeight]) -> tuple:
        """What requests sharing a pipeline call must have in common, LoRA-wise: the weights they run on,
        and their adapter set too where it cannot mix with others (serving/mixed_loras.py says when)."""
        runs_on = self.base_entry(entry)
        adapters = adapter_set(entry, loras, runs_on)
        exclusive = takes_lora_slots(runs_on, self.settings, self.device) or not all(
            adapts_unet_only(self._catalog.get(lora_id)) for lora_id, _ in adapters
        )
        return (runs_on.id, adapters if exclusive else None)

    def pipeline_for_batch(
        self, images: Sequence[tuple[CatalogEntry, Sequence[LoraWeight]]], *, for_request: bool = False
    ) -> tuple[object, AdapterMix | None]:
        """The pipeline for a call of ``images`` (each image's model and loras, all of one ``batch_group``),
        and the AdapterMix to run it under (serving/mixed_loras.py), or None when they all share one set:
        then ``pipeline_for``'s adapters are switched on, as for one request."""
        base = self._base(self.base_entry(images[0][0]), for_request)
        sets = [adapter_set(entry, loras, base.entry) for entry, loras in images]
        if len(set(sets)) == 1:
            self._activate(base, sets[0])
            return base.pipeline, None
        union = tuple(sorted({(lora_id, 1.0) for adapters in sets for lora_id, _ in adapters}))
        self._activate(base, union)  # loads each, keeps them all through eviction; the mix sets the scales
        return base.pipeline, AdapterMix.of(sets, lambda lora_id: base.adapters[lora_id].name)

    def _activate(self, base: LoadedBase, adapters: AdapterSet) -> None:
        """Switch on exactly ``adapters`` on ``base``, loading the missing ones and making room for them."""
        if base.slots is not None:  # compiled: swapped into the slots in place, never loaded or deleted
            base.slots.activate([(self._catalog.get(lora_id), scale) for lora_id, scale in adapters])
            return
        pipeline = base.pipeline
        if not adapters:
            if base.adapters:
                pipeline.disable_lora()
            return
        wanted = {lora_id for lora_id, _ in adapters}
        for lora_id, _ in adapters:
            if lora_id not in base.adapters:
                self._load_adapter(base, lora_id, keep=wanted)
        for lora_id in wanted:
            base.adapters[lora_id].last_used = next(self._calls)
        self._evict_adapters(keep=wanted)  # the last call's own may have gone past the budget
        pipeline.enable_lora()
        pipeline.set_adapters(
            [base.adapters[lora_id].name for lora_id, _ in adapters], [scale for _, scale in adapters]
        )

    def _load_adapter(self, base: LoadedBase, lora_id: str, keep: set[str]) -> None:
        try:
            with warnings.catch_warnings():  # peft warns of a second adapter on a module: several are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                name = apply_lora(base.pipeline, self._catalog.get(lora_id))
        except (ModelLoadError, OSError, ValueError) as error:  # not the base's failure: it stays served
            raise LoraLoadError(lora_id, str(error)) from error
        nbytes = adapter_bytes(base.pipeline, name)
        with self._lock:
            base.adapters[lora_id] = LoadedAdapter(name, nbytes, next(self._calls))
        self._evict_adapters(keep | {lora_id})
        logger.info("loaded LoRA %s onto %s (%.1f MiB)", lora_id, base.entry.id, nbytes / 2**20)

    def _evict_adapters(self, keep: set[str]) -> None:
        """Unload least recently used adapters (never one in ``keep``) until the loaded ones fit the budget."""
        while self.adapter_bytes() > self.lora_cache_budget:
            candidates = [
                (adapter.last_used, lora_id, base)
                for base in self._bases.values()
                for lora_id, adapter in base.adapters.items()
                if lora_id not in keep
            ]
            if not candidates:
                return  # the call's own adapters exceed the budget: they stay for it, and go next time
            _, lora_id, base = min(candidates, key=lambda candidate: candidate[0])
            with self._lock:
                adapter = base.adapters.pop(lora_id)
            base.pipeline.delete_adapters(adapter.name)
            logger.info("unloaded LoRA %s from %s", lora_id, base.entry.id)

    def adapter_bytes(self) -> int:
        """Bytes of every loaded adapter, the budget TXT2IMG_LORA_CACHE_MB bounds."""
        return sum(adapter.nbytes for base in self._bases.values() for adapter in base.adapters.values())

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
        # Slots are made before compiling (a compiled UNet recompiles when adapters come and go), and counted.
        slots = compiled_lora_slots(pipeline, entry, self.settings, self.device)
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
        loaded = LoadedBase(entry=entry, pipeline=pipeline, nbytes=nbytes, slots=slots)
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
