"""The package layout's one rule: imports between the top-level packages only point downwards.

catalog is the bottom; serving and training build on it, and serving on training too (a training job
runs training's own code: serving/train_*.py); jumpstart (everything that talks to AWS)
builds on all three; the txt2img CLI gathers them. ``txt2img.errors``, ``txt2img.extras`` and
``txt2img.processes`` are leaves every package may use.
"""

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"txt2img.errors", "txt2img.extras", "txt2img.processes"}
ALLOWED = {
    "catalog": set(),
    "serving": {"catalog", "training"},
    "training": {"catalog"},
    "jumpstart": {"catalog", "serving", "training"},
    "txt2img": set(),
    "txt2img.cli": {"catalog", "serving", "training", "jumpstart", "txt2img"},
}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def owner(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).parts
    return "txt2img.cli" if parts[:2] == ("txt2img", "cli") else parts[0]


def test_imports_between_packages_point_downwards():
    wrong = []
    for package in ("catalog", "serving", "training", "jumpstart", "txt2img"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            source = owner(path)
            for module in imported_modules(path):
                target = module.split(".")[0]
                if target not in ALLOWED or target == source.split(".")[0]:
                    continue
                if any(module == leaf or module.startswith(leaf + ".") for leaf in LEAVES):
                    continue
                if target not in ALLOWED[source]:
                    wrong.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_library_code_is_free_of_click():
    with_click = [
        str(path.relative_to(REPO_ROOT))
        for package in ("catalog", "serving", "training", "jumpstart")
        for path in (REPO_ROOT / package).rglob("*.py")
        if any(module.split(".")[0] == "click" for module in imported_modules(path))
    ]
    assert not with_click, f"click belongs in txt2img/cli only: {with_click}"


# The project's own modules are imported at the top of each file, so the module graph shows in the
# imports; only heavy libraries (torch, diffusers, bentoml, sagemaker) wait inside functions. These
# folders are held to it.
TOP_LEVEL_OWN_IMPORTS = ("catalog", "serving", "training", "jumpstart", "txt2img", "bench")
OWN_PACKAGES = {"catalog", "serving", "training", "jumpstart", "txt2img"}
# (file, function, module) imported inside that function on purpose, and why.
LAZY_OWN_IMPORTS = {
    ("catalog/index.py", "load_index", "catalog.store"): "catalog.store imports catalog.index at its top",
    ("catalog/index.py", "load_index_skipping_bad_files", "catalog.store"): "the same cycle as load_index's",
}
# Files of those folders not converted yet.
NOT_YET_CONVERTED: set[str] = set()


def own_imports_inside_functions(path: Path) -> set[tuple[str, str, str]]:
    """(file, function, module) for each import of the project's own packages inside a function."""
    found = set()
    name = path.relative_to(REPO_ROOT).as_posix()
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            found.update((name, function.name, module) for module in modules if module.split(".")[0] in OWN_PACKAGES)
    return found


def test_own_modules_are_imported_at_the_top_of_each_file():
    found = set()
    for folder in TOP_LEVEL_OWN_IMPORTS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path.relative_to(REPO_ROOT).as_posix() not in NOT_YET_CONVERTED:
                found |= own_imports_inside_functions(path)
    inside = sorted(
        f"{file}: {function}() imports {module}" for file, function, module in found - LAZY_OWN_IMPORTS.keys()
    )
    assert not inside, "import these at the top of the file (or allow one in LAZY_OWN_IMPORTS, saying why):\n" + (
        "\n".join(inside)
    )
    assert set(LAZY_OWN_IMPORTS) <= found, f"allowed but gone, drop them: {set(LAZY_OWN_IMPORTS) - found}"


def test_product_functions_stay_short():
    """One job per function: past about 60 lines a function is split into named steps (the guide's rule)."""
    longest = 60
    too_long = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for package in ("catalog", "serving", "training", "jumpstart", "txt2img", "bench")
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > longest
    ]
    assert not too_long, f"functions over {longest} lines:\n" + "\n".join(too_long)
