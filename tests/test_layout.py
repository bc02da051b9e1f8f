"""The package layout's one rule: imports between the top-level packages only point downwards.

catalog is the bottom; serving and training build on it; jumpstart (everything that talks to AWS)
builds on all three; the txt2img CLI gathers them. ``txt2img.errors`` and ``txt2img.extras`` are
leaves every package may use.
"""

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"txt2img.errors", "txt2img.extras"}
ALLOWED = {
    "catalog": set(),
    "serving": {"catalog"},
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
