"""``txt2img bento-model ...``: catalog models in BentoML's model store, so that a Bento carries them.

``save`` loads the model it stores (torch); ``list`` only reads the store. bentoml is imported
when a command runs, never when the CLI starts.
"""

from __future__ import annotations

from pathlib import Path

import click

from catalog.store import load_catalog
from serving.model_store import PACKED_MODELS_ENV, save_to_model_store, stored_models


@click.group("bento-model")
def app() -> None:
    """Put catalog models into BentoML's model store, for `bentoml build` to pack.

    \b
    txt2img bento-model save my-dog
    TXT2IMG_BENTO_MODELS=my-dog bentoml build
    """


@app.command("save")
@click.argument("model_id")
@click.option("--allow-download", is_flag=True, help="Fetch Hub weights that are not in the local HF cache yet.")
def save(model_id: str, allow_download: bool) -> None:
    """Save catalog model MODEL_ID into BentoML's model store (under BENTOML_HOME) as a diffusers folder.

    Any catalog model: tiny-sd, a JumpStart id (from the HF cache) or a fine-tune, a LoRA fused
    into its base. Each save adds a version; the service and `bentoml build` use the newest.
    """
    from rich.console import Console

    catalog = load_catalog()
    catalog.get(model_id)
    with Console(stderr=True).status(f"saving {model_id} into BentoML's model store ..."):
        stored = save_to_model_store(model_id, catalog, local_files_only=not allow_download)
    click.echo(f"saved {model_id} as BentoML model {stored.tag}")
    click.echo(f"pack it into a Bento with: {PACKED_MODELS_ENV}={model_id} bentoml build", err=True)


@app.command("list")
def list_models() -> None:
    """List the catalog models in BentoML's model store: catalog id, tag and folder (the newest version each)."""
    stored = stored_models()
    if not stored:
        click.echo("no catalog model in BentoML's model store; add one with `txt2img bento-model save ID`", err=True)
        return
    for model_id, model in sorted(stored.items()):
        click.echo(f"{model_id}\t{model.tag}\t{_folder_size(model.path) / 2**20:.1f} MiB\t{model.path}")


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
