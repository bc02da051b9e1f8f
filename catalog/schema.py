"""The pydantic schema of a catalog entry: the one definition every part of txt2img reads.

A catalog entry is one of three kinds, told apart by ``source``:

* ``jumpstart``: a SageMaker JumpStart txt2img model id with the Hugging Face repo it serves;
* ``builtin``: the offline demo model ``tiny-sd``, built in code;
* ``finetune``: a model fine-tuned here (or on SageMaker), with its provenance;
* ``imported``: a model the user brought with ``txt2img catalog add``: a diffusers folder, a Hub
  repo, a single-file checkpoint or a LoRA file (``method: lora`` of a ``base``), with where it came from.

This module must stay cheap to import: the catalog CLI answers without torch.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catalog.families import FAMILIES, FAMILY_NAMES

# The family names, from the one table of families (catalog/families.py).
Family = Literal[FAMILY_NAMES]
Source = Literal["jumpstart", "builtin", "finetune", "imported"]
Method = Literal["full", "lora"]

# Families our local DreamBooth trainer can fine-tune. JumpStart's own remote
# fine-tuning (``fine_tunable``) is a different, narrower notion.
LOCALLY_TRAINABLE_FAMILIES = frozenset(name for name, family in FAMILIES.items() if family.locally_trainable)

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
IMPORT_FIELDS = ("imported_from", "sha256", "link", "config")


class JumpStartRef(BaseModel):
    """Where a model sits in SageMaker JumpStart."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    version: str = Field(description="Latest JumpStart model version seen for this id.")


class Endpoint(BaseModel):
    """A SageMaker endpoint this model was deployed to."""

    model_config = ConfigDict(extra="forbid")

    name: str
    region: str
    instance_type: str
    created: datetime


class CatalogEntry(BaseModel):
    """One model in the catalog."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The catalog id; for JumpStart models, the JumpStart model id.")
    source: Source
    family: Family = Field(description="The pipeline family, which fixes architecture and native size.")
    resolution: int = Field(gt=0, description="Native square resolution in pixels.")
    hf_repo: str | None = Field(default=None, description="Hugging Face repo id, for Hub models.")
    description: str = ""
    license: str | None = None
    languages: list[str] = Field(default_factory=lambda: ["en"], description="Prompt languages.")
    tags: list[str] = Field(default_factory=list)
    example_prompt: str | None = None
    fine_tunable: bool = Field(
        default=False,
        description=(
            "Whether SageMaker JumpStart can fine-tune this model remotely (JumpStart's "
            "training_supported). The local trainer's scope is `locally_trainable`."
        ),
    )
    jumpstart: JumpStartRef | None = None
    alias_of: str | None = Field(default=None, description="Id of the entry serving the same repo.")

    # Fine-tune provenance; present exactly when source == "finetune".
    base: str | None = Field(default=None, description="Catalog id of the base model.")
    method: Method | None = None
    artifact: str | None = Field(default=None, description="Local path or s3:// URI of the weights.")
    hyperparameters: dict[str, Any] | None = None
    dataset_fingerprint: str | None = None
    metrics: dict[str, float | None] | None = None
    created: datetime | None = None
    tuning: dict[str, Any] | None = Field(
        default=None, description="For a tuned fine-tune: its study and every trial's hyperparameters and metrics."
    )
    endpoints: list[Endpoint] = Field(default_factory=list)

    # Import provenance; present only when source == "imported" (imported_from always).
    imported_from: str | None = Field(
        default=None, description="What `txt2img catalog add` was given: a path (made absolute) or a Hub repo id."
    )
    sha256: str | None = Field(default=None, description="SHA-256 of an imported single-file checkpoint.")
    link: bool | None = Field(
        default=None,
        description="Whether `artifact` is the user's own file or folder (true) or a copy in TXT2IMG_HOME.",
    )
    config: str | None = Field(
        default=None,
        description="Where a single-file checkpoint's pipeline configuration comes from: a Hub repo or a folder.",
    )

    @field_validator("id")
    @classmethod
    def _id_is_slug(cls, value: str) -> str:
        if not ID_PATTERN.match(value):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("tags")
    @classmethod
    def _tags_are_lowercase(cls, value: list[str]) -> list[str]:
        bad = [tag for tag in value if tag != tag.lower() or not tag]
        if bad:
            raise ValueError(f"tags must be non-empty and lowercase: {bad}")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_is_hex(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_PATTERN.match(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _fields_match_source(self) -> CatalogEntry:
        finetune_fields = ("base", "method", "artifact")
        if self.source == "imported":
            self._check_import_fields()
        elif any(getattr(self, name) is not None for name in IMPORT_FIELDS):
            raise ValueError(f"only imported entries may set {', '.join(IMPORT_FIELDS)}")
        if self.source == "finetune":
            missing = [name for name in finetune_fields if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a finetune entry needs {', '.join(missing)}")
            if self.method == "lora" and self.base is None:
                raise ValueError("a LoRA fine-tune needs its base")
            if self.method == "lora" and not FAMILIES[self.family].lora:
                raise ValueError(f"LoRA adapters do not load onto a {self.family} pipeline")
        elif self.source != "imported":
            present = [name for name in finetune_fields if getattr(self, name) is not None]
            if present:
                raise ValueError(f"only finetune entries may set {', '.join(present)}")
        if self.source == "jumpstart" and (self.hf_repo is None or self.jumpstart is None):
            raise ValueError("a jumpstart entry needs hf_repo and jumpstart")
        if self.fine_tunable and self.source != "jumpstart":
            raise ValueError("fine_tunable is JumpStart's flag; only jumpstart entries may set it")
        return self

    def _check_import_fields(self) -> None:
        """An import is either a Hub repo (``hf_repo``) or local weights (``artifact``, copied or linked)."""
        if self.imported_from is None:
            raise ValueError("an imported entry needs imported_from")
        if (self.artifact is None) == (self.hf_repo is None):
            raise ValueError("an imported entry needs exactly one of artifact (local weights) and hf_repo")
        if self.method == "lora":  # a LoRA file, adapting ``base``
            if self.base is None or self.artifact is None or self.sha256 is None or self.config is not None:
                raise ValueError("an imported LoRA needs base, artifact and sha256, and no config")
            return
        if self.base is not None or self.method is not None:
            raise ValueError("an imported entry may not set base or method, unless it is a LoRA (method: lora)")
        if self.artifact is not None and self.link is None:
            raise ValueError("an imported entry with an artifact needs link (true: the user's own file; false: a copy)")
        if self.hf_repo is not None and (self.link is not None or self.sha256 is not None or self.config is not None):
            raise ValueError("an imported Hub repo may not set link, sha256 or config")
        if (self.config is None) != (self.sha256 is None):
            raise ValueError("a single-file checkpoint needs both sha256 and config; a folder neither")

    @property
    def locally_trainable(self) -> bool:
        """Whether txt2img's own DreamBooth trainer can fine-tune this model."""
        return self.family in LOCALLY_TRAINABLE_FAMILIES and self.method != "lora"

    def summary(self) -> dict[str, Any]:
        """The JSON object the CLI prints for this entry."""
        data = self.model_dump(mode="json", exclude_none=True)
        # These keys are always present, even when empty, so scripts can rely on them.
        data["hf_repo"] = self.hf_repo
        data["fine_tunable"] = self.fine_tunable
        data["locally_trainable"] = self.locally_trainable
        data["tags"] = self.tags
        return data


class CatalogFile(BaseModel):
    """The layout of a catalog YAML file holding many entries (``catalog/models.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    models: list[CatalogEntry]
