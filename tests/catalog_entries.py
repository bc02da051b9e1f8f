"""Catalog entries for tests: a valid fine-tune entry whose fields a test overrides as it needs."""

from __future__ import annotations

from datetime import datetime, timezone

from catalog.schema import CatalogEntry


def finetune_entry(model_id: str = "my-dog", base: str = "tiny-sd", **overrides) -> CatalogEntry:
    data = {
        "id": model_id,
        "source": "finetune",
        "family": "tiny",
        "resolution": 64,
        "base": base,
        "method": "lora",
        "artifact": "/tmp/nowhere",
        "hyperparameters": {"learning_rate": 1e-4},
        "dataset_fingerprint": "sha256:abc",
        "metrics": {"final_loss": 0.1},
        "created": datetime(2026, 11, 25, tzinfo=timezone.utc),
    }
    data.update(overrides)
    return CatalogEntry.model_validate(data)
