"""``txt2img catalog ...`` and ``txt2img export``: find, inspect, validate and export models.

Everything here answers without importing torch, diffusers, bentoml or sagemaker,
except ``export``, which loads the model it writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from catalog.families import FAMILIES
from catalog.imports import ImportRequest, import_model
from catalog.index import load_index
from catalog.paths import require_folder
from catalog.pipelines import export_a1111, export_model
from catalog.schema import CatalogEntry, CatalogFile
from catalog.store import CatalogError, load_catalog, remove_model, validate_path
from training.dreambooth import default_output_dir
from training.tuning import JOURNAL_FILE_NAME, default_study_dir
from txt2img.errors import InputError


@click.group("catalog")
def app() -> None:
    """Find models: the 95 SageMaker JumpStart txt2img ids, the built-in demo and your fine-tunes."""


def _index():
    try:
        return load_index()
    except CatalogError as error:
        raise InputError(
            f"the catalog is invalid ({len(error.problems)} problem(s)); first: {error.problems[0]}. "
            "Run `txt2img catalog validate` for all of them"
        ) from None


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


# The widest the table's other six columns and the borders need beside the id column.
OTHER_COLUMNS_WIDTH = 100


def _origin(entry) -> str:
    if "imported_from" in entry:
        return f"imported from {entry['imported_from']}" + (" (linked)" if entry.get("link") else "")
    origin = entry["hf_repo"] or (f"{entry['method']} of {entry['base']}" if "base" in entry else entry["source"])
    if "alias_of" in entry:
        origin += f" (alias of {entry['alias_of']})"
    return origin


def _print_table(entries, title: str) -> None:
    """A table where the terminal is wide enough for whole ids beside the rest, else one block per model.

    Ids are never broken: they are what the user copies into the next command.
    """
    from rich.console import Console

    console = Console()
    id_width = max((len(entry["id"]) for entry in entries), default=2)
    if console.width >= id_width + OTHER_COLUMNS_WIDTH:
        console.print(_wide_table(entries, title))
    else:
        _print_blocks(console, entries, title)


def _wide_table(entries, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("id", style="bold cyan", no_wrap=True)
    table.add_column("family")
    table.add_column("px", justify="right")
    table.add_column("tags", overflow="fold")
    table.add_column("JumpStart\nfine-tune", justify="center")
    table.add_column("local\ntrain", justify="center")
    table.add_column("source / base", overflow="fold")
    for entry in entries:
        table.add_row(
            entry["id"],
            entry["family"],
            str(entry["resolution"]),
            ", ".join(entry["tags"]),
            "yes" if entry["fine_tunable"] else "",
            "yes" if entry["locally_trainable"] else "",
            _origin(entry),
        )
    return table


def _print_blocks(console, entries, title: str) -> None:
    """For a narrow terminal: each id whole on its own line, its details indented below."""
    from rich.markup import escape
    from rich.padding import Padding
    from rich.text import Text

    console.print(title, highlight=False)
    for entry in entries:
        # soft_wrap: an id wider than the terminal is left to the terminal to wrap, never split by rich.
        console.print(f"[bold cyan]{escape(entry['id'])}[/]", soft_wrap=True)
        details = [entry["family"], f"{entry['resolution']} px"]
        details += [f"tags: {', '.join(entry['tags'])}"] if entry["tags"] else []
        details += ["JumpStart fine-tune"] if entry["fine_tunable"] else []
        details += ["local train"] if entry["locally_trainable"] else []
        details.append(_origin(entry))
        console.print(Padding(Text(" · ".join(details)), (0, 0, 0, 2), expand=False))


@app.command("list")
@click.option("--tag", help="Only models with this tag, e.g. anime.")
@click.option("--language", help="Only models prompted in this language (en, zh, ko, ja).")
@click.option("--fine-tunable", is_flag=True, help="Only models SageMaker JumpStart can fine-tune remotely.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of entry objects.")
def list_models(tag: str | None, language: str | None, fine_tunable: bool, as_json: bool) -> None:
    """List catalog models."""
    entries = _index().filter(tag=tag, language=language, fine_tunable=fine_tunable)
    if as_json:
        _print_json(entries)
    else:
        _print_table(entries, f"{len(entries)} model(s)")


@app.command("show")
@click.argument("model_id")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as one JSON object.")
def show_model(model_id: str, as_json: bool) -> None:
    """Show everything the catalog knows about one model."""
    index = _index()
    summary = index.get(model_id)
    if as_json:
        _print_json(summary)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=model_id, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in summary.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        table.add_row(key, str(value))
    table.add_row("defined in", index.origins[model_id])
    Console().print(table)


@app.command("search")
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of entry objects, best first.")
def search_models(query: str, as_json: bool) -> None:
    """Search ids, repos, tags and example prompts for QUERY; best matches first."""
    entries = _index().search(query)
    if as_json:
        _print_json(entries)
    elif entries:
        _print_table(entries, f"{len(entries)} match(es) for '{query}'")
    else:
        click.echo(f"no model matches '{query}'", err=True)


@app.command("validate")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def validate(path: Path | None) -> None:
    """Check catalog files against the schema; report every problem with file, entry and field.

    PATH is a catalog YAML file or a directory of entry files; without it, the whole merged catalog.
    """
    if path is not None and not path.exists():
        raise InputError(f"{path} does not exist")
    problems = validate_path(path)
    if problems:
        for problem in problems:
            click.echo(str(problem), err=True)
        click.echo(f"{len(problems)} problem(s) found", err=True)
        raise SystemExit(1)
    click.echo(f"ok: {path or 'the merged catalog'} is valid")


@app.command("add")
@click.argument("source")
@click.option("--name", required=True, help="The catalog id to register it under.")
@click.option(
    "--link",
    is_flag=True,
    help="Record the file or folder where it is instead of copying it into $TXT2IMG_HOME/models/NAME.",
)
@click.option(
    "--family",
    type=click.Choice(sorted(FAMILIES)),
    help="Where the files cannot tell: an SD 2 checkpoint is taken for sd2 (768 px, v-prediction) unless this "
    "says sd2-base; an uncached Hub repo offline needs it.",
)
@click.option(
    "--config",
    help="For a single-file checkpoint: the Hub repo or diffusers folder its configuration comes from. "
    "[default: its family's base repo]",
)
@click.option(
    "--base",
    help="For a LoRA file (kohya/AUTOMATIC1111 or diffusers keys): the catalog id of the model it adapts; "
    "every layer must fit it.",
)
def add_command(source: str, name: str, link: bool, family: str | None, config: str | None, base: str | None) -> None:
    """Register your own model SOURCE as NAME: a diffusers folder, a Hub repo id (owner/name, downloaded on
    first use), a single-file .safetensors checkpoint (AUTOMATIC1111/Civitai layout) or a LoRA file with
    --base. Pickled files (.ckpt, .pt) are refused. The family is detected from the files."""
    request = ImportRequest(
        source=source,
        name=name,
        destination=default_output_dir(name),
        link=link,
        family=family,
        config=config,
        base=base,
    )
    from rich.console import Console

    with Console(stderr=True).status(
        f"adding {name} from {source} (hashing and copying a large file takes a while) ..."
    ):
        entry = import_model(request)
    where = entry.hf_repo or entry.artifact
    kind = f"LoRA of {entry.base}, " if entry.method == "lora" else ""
    click.echo(f"added {entry.id} ({kind}{entry.family}, {entry.resolution} px) from {where}")


@app.command("remove")
@click.argument("model_id")
@click.option("--yes", is_flag=True, help="Remove without asking.")
def remove_command(model_id: str, yes: bool) -> None:
    """Remove fine-tune or added model MODEL_ID and free its name: its entry, its folder in
    $TXT2IMG_HOME/models and, for a tuned model, its study folder. Weights registered from elsewhere
    (and files added with --link) stay on disk."""
    index = _index()
    if model_id in index.origins and index.get(model_id)["source"] not in ("finetune", "imported"):
        raise InputError(
            f"'{model_id}' is a built-in catalog model; only your fine-tunes can be removed "
            "(and the models you added with `txt2img catalog add`)"
        )
    entry = index.get(model_id)
    folders = _folders_of(model_id, entry)
    _confirm_removal(model_id, folders, yes)
    remove_model(model_id, folders)
    artifact = entry.get("artifact")
    deleted = f" and deleted {', '.join(map(str, folders))}" if folders else ""
    kept = artifact and not any(Path(artifact).is_relative_to(folder) for folder in folders)
    click.echo(f"removed {model_id}{deleted}" + (f"; its weights remain at {artifact}" if kept else ""))


def _folders_of(model_id: str, entry: dict) -> list[Path]:
    """The folders that hold ``model_id``'s name: its run (``train``, or ``tune``'s best) and its
    study in the default place; a new run or study of that name would be refused while they exist."""
    folders = [default_output_dir(model_id)]
    study = default_study_dir(model_id)
    if (entry.get("tuning") or {}).get("storage") == str(study / JOURNAL_FILE_NAME):
        folders.append(study)
    return [folder for folder in folders if folder.is_dir()]


def _confirm_removal(model_id: str, folders: list[Path], yes: bool) -> None:
    """Ask before deleting; without a terminal to ask on, only --yes confirms."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise InputError(f"catalog remove deletes {model_id} and its folders; pass --yes to confirm without a terminal")
    deleting = f" and delete {', '.join(map(str, folders))}" if folders else ""
    click.confirm(f"Remove {model_id} from the catalog{deleting}?", abort=True)


@app.command("schema")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
def json_schema(output: Path | None) -> None:
    """Print the JSON Schema of a catalog YAML file, for editors' completion and checks."""
    if output:
        require_folder(output.parent, "output folder")

    schema = CatalogFile.model_json_schema()
    # A user entry file holds one entry at top level; accept both shapes.
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "txt2img catalog file",
        "anyOf": [schema, CatalogEntry.model_json_schema()],
    }
    text = json.dumps(schema, indent=2)
    if output:
        output.write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {output}")
    else:
        click.echo(text)


@click.command("export")
@click.argument("model_id")
@click.argument("destination", required=False, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["diffusers", "a1111"]),
    default="diffusers",
    show_default=True,
    help="diffusers: a self-contained folder. a1111: a LoRA's adapter as one .safetensors in kohya's key "
    "layout, which AUTOMATIC1111 and ComfyUI load [default DESTINATION: ./MODEL_ID.safetensors].",
)
@click.option("--allow-download", is_flag=True, help="Fetch Hub weights that are not in the local HF cache yet.")
def export(model_id: str, destination: Path | None, file_format: str, allow_download: bool) -> None:
    """Write MODEL_ID to DESTINATION: a self-contained diffusers folder (safetensors), or with
    --format a1111 a LoRA adapter file.

    The folder works for any catalog model: tiny-sd, Hub repos (from the HF cache) and fine-tunes,
    with a LoRA fused into its base. DESTINATION must be new or empty.
    """
    catalog = load_catalog()
    entry = catalog.get(model_id)
    if file_format == "a1111":
        written = export_a1111(entry, destination or Path(f"{model_id}.safetensors"))
        click.echo(f"wrote {written}")
        return
    if destination is None:
        raise InputError("export needs DESTINATION, the folder to write (or --format a1111 for a LoRA file)")
    require_folder(destination, "export folder")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise InputError(f"{destination} exists and is not an empty directory")
    from rich.console import Console

    with Console(stderr=True).status(f"exporting {model_id} ..."):
        written = export_model(model_id, destination, catalog, local_files_only=not allow_download)
    click.echo(f"wrote {written}")
