"""Per-request LoRAs: which adapters a request runs with, at which scales, and the checks they pass.

A request names its model and, in ``loras``, LoRA fine-tunes to apply on top at a scale each
(serving/schema.py ``LoraWeight``). The rules, held at the door (serving/engine.py) for every route:

* at most TXT2IMG_MAX_LORAS of them (serving/schema.py ``check_limits``);
* each a catalog id (404 otherwise, with close ids), of a LoRA (``method: lora``), listed once;
* each a LoRA of the weights the request runs on: its ``base`` is the request model, or, when the model
  is itself a LoRA fine-tune, that model's base (aliases of one repo count as one).

A LoRA fine-tune asked for as ``model`` runs on its base with its own adapter at scale 1, plus the listed
ones; listing it in ``loras`` as well sets its scale instead. The adapter set is kept sorted by id
(``AdapterSet``), so the order of the list does not change the image. A scale of 0 leaves its LoRA out
of the set: the image is the base's, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from catalog.index import suggest_ids
from catalog.schema import CatalogEntry
from serving.schema import LoraWeight
from txt2img.errors import InputError

# The LoRAs one request runs with, as (catalog id, scale) pairs sorted by id, none at scale 0.
AdapterSet = tuple[tuple[str, float], ...]


class LoraRefused(InputError, ValueError):
    """A request's ``loras`` names something that cannot be applied to its model; ``loras`` says which."""

    def __init__(self, message: str, loras: list[dict]):
        self.loras = loras
        super().__init__(message)

    def as_json(self) -> dict:
        return {"error": str(self), "field": "loras", "loras": self.loras}


class UnknownLora(LoraRefused):
    """A LoRA id that is not in the catalog: 404, as an unknown model is, with the closest known ids."""

    http_status = 404

    def __init__(self, lora_id: str, suggestions: list[str]):
        self.model_id = lora_id
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"loras: unknown LoRA id '{lora_id}'.{hint}", [{"model": lora_id}])

    def as_json(self) -> dict:
        return super().as_json() | {"model": self.model_id, "suggestions": self.suggestions}


class LoraLoadError(InputError):
    """A LoRA's adapter cannot be loaded onto its base (its file gone or unreadable). 503, as a model that
    cannot load: and, unlike a model's load failure, it leaves the base and other requests served."""

    http_status = 503

    def __init__(self, lora_id: str, reason: str):
        self.model_id = lora_id
        super().__init__(f"loras: cannot load LoRA '{lora_id}': {reason}")

    def as_json(self) -> dict:
        return {"error": str(self), "field": "loras", "model": self.model_id}


def adapter_set(entry: CatalogEntry, loras: Sequence[LoraWeight], runs_on: CatalogEntry) -> AdapterSet:
    """The adapters a request for ``entry`` with ``loras`` runs with on the pipeline of ``runs_on``:
    ``entry``'s own at scale 1 when it is a LoRA served on its base, the listed ones at their scales."""
    own = {entry.id: 1.0} if entry.method == "lora" and runs_on.id != entry.id else {}
    return _sorted_set(own | {lora.model: lora.scale for lora in loras})


def _sorted_set(scales: dict[str, float]) -> AdapterSet:
    return tuple(sorted((lora_id, scale) for lora_id, scale in scales.items() if scale != 0))


def check_loras(
    entry: CatalogEntry,
    loras: Sequence[LoraWeight],
    lookup: Callable[[str], CatalogEntry | None],
    known_ids: Callable[[], list[str]],
    weights_of: Callable[[CatalogEntry], str],
) -> None:
    """Raise LoraRefused for ``loras`` that cannot run with model ``entry``.

    ``lookup`` gives a catalog entry or None, ``known_ids`` every id (for suggestions), and ``weights_of``
    the id of the weights an entry runs on (a LoRA's base, an alias's target)."""
    seen: set[str] = set()
    for lora in loras:
        if lora.model in seen:
            raise LoraRefused(f"loras: '{lora.model}' is listed twice; list each LoRA once", [{"model": lora.model}])
        seen.add(lora.model)
    listed = []
    for lora in loras:
        found = lookup(lora.model)
        if found is None:
            raise UnknownLora(lora.model, suggest_ids(lora.model, known_ids()))
        listed.append(found)
    not_loras = [found for found in listed if found.method != "lora"]
    if not_loras:
        names = ", ".join(f"'{found.id}'" for found in not_loras)
        raise LoraRefused(
            f"loras: {names} {'is' if len(not_loras) == 1 else 'are'} not a LoRA fine-tune; "
            "loras takes LoRAs only (a full model goes in model)",
            [{"model": found.id} for found in not_loras],
        )
    _check_bases(entry, listed, weights_of)


def _check_bases(entry: CatalogEntry, listed: list[CatalogEntry], weights_of: Callable[[CatalogEntry], str]) -> None:
    """Every listed LoRA must adapt the weights ``entry`` runs on."""
    model_base = weights_of(entry)
    wrong = [found for found in listed if weights_of(found) != model_base]
    if wrong:
        needs = "; ".join(f"'{found.id}' needs base '{found.base}'" for found in wrong)
        raise LoraRefused(
            f"loras: model '{entry.id}' runs on base '{model_base}', and each LoRA must share it: {needs}",
            [{"model": found.id, "base": found.base} for found in wrong],
        )


def adapter_bytes(pipeline, adapter_name: str) -> int:
    """Bytes of the parameters adapter ``adapter_name`` added to the pipeline's modules (peft names them
    ``<layer>.lora_A.<adapter>.weight``)."""
    marker = f".{adapter_name}."
    total = 0
    for component in pipeline.components.values():
        named_parameters = getattr(component, "named_parameters", None)
        if named_parameters is None:
            continue
        for name, parameter in named_parameters():
            if marker in name:
                total += parameter.numel() * parameter.element_size()
    return total
