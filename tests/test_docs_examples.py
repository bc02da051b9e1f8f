"""The examples of README.md and docs/*.md run as written (the convention is in CONTRIBUTING.md).

Every fenced ``bash`` or ``python`` block is marked ``offline`` (run here, in page order, against one
real ``bentoml serve`` on tiny-sd) or with the reason it cannot run here; an unmarked one fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = "offline"
REASONS = {"gpu", "download", "aws", "container", "postgres", "long-running", "placeholder"}
EXECUTED_LANGUAGES = ("bash", "python")
# Other names for a shell or Python block: refused, so that no example hides from the test under one.
ALIASES = {"sh", "shell", "console", "zsh", "py", "python3", "pycon"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
EXAMPLE_TIMEOUT_S = 600
README_MAX_LINES = 150


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    language: str
    marker: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def doc_pages() -> list[Path]:
    """README.md, CONTRIBUTING.md, then every page of docs/ by name: the order the test runs them in."""
    return [REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def fenced_blocks(page: Path) -> list[Example]:
    blocks, opened, body = [], None, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if opened is None and match:
            opened, body = (number, match["indent"], match["fence"], match["info"].split()), []
        elif opened is not None and match and match["fence"].startswith(opened[2]) and not match["info"].strip():
            start, indent, _, words = opened
            language, marker = (words + ["", ""])[:2]
            code = "\n".join(text[len(indent) :] if text.startswith(indent) else text.lstrip() for text in body)
            blocks.append(Example(page, start, language, marker, code + "\n"))
            opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{page}:{opened[0]}: a fence that never closes"
    return blocks


def marking_problem(example: Example) -> str | None:
    if not example.language:
        return "names no language (```text for plain text)"
    if example.language in ALIASES:
        return f"is ```{example.language}; write ```bash or ```python so the docs test sees it"
    if example.language in EXECUTED_LANGUAGES and example.marker not in REASONS | {RUNNABLE}:
        return f"is marked {example.marker or 'nothing'}; mark it {RUNNABLE} or one of {', '.join(sorted(REASONS))}"
    return None


def offline_examples() -> list[Example]:
    return [
        example
        for page in doc_pages()
        for example in fenced_blocks(page)
        if example.language in EXECUTED_LANGUAGES and example.marker == RUNNABLE
    ]


def aimed_at(code: str, url: str) -> str:
    """The example with the docs' server address replaced by the test server's."""
    host_port = url.removeprefix("http://")
    code = code.replace("localhost:3000", host_port).replace("127.0.0.1:3000", host_port)
    return code.replace("port=3000", f"port={host_port.rsplit(':', 1)[1]}")


def example_env(home: Path) -> dict[str, str]:
    """A newcomer's shell after ``source .venv/bin/activate``, with this checkout first and no network.

    curl reads ``$CURL_HOME/.curlrc``: there it fails on an HTTP error status, as a reader would
    notice one, instead of writing the error into the example's output file and exiting 0.
    """
    curl_home = home / "curl"
    curl_home.mkdir(exist_ok=True)
    (curl_home / ".curlrc").write_text("fail-with-body\nshow-error\nsilent\n", encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith("TXT2IMG_")}
    return {
        "CURL_HOME": str(curl_home),
        **env,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONPATH": str(REPO_ROOT),
        "TXT2IMG_HOME": str(home),
        "TXT2IMG_TORCH_THREADS": "1",
        "BENTOML_HOME": str(home / "bentoml"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "80",
    }


def run_example(example: Example, url: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    code = aimed_at(example.code, url)
    command = ["bash", "-euo", "pipefail", "-c", code] if example.language == "bash" else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)


def test_every_shell_and_python_block_is_marked():
    problems = [
        f"{example.where}: ```{example.language} {example.marker}: {problem}"
        for page in doc_pages()
        for example in fenced_blocks(page)
        if (problem := marking_problem(example))
    ]
    assert problems == []


def test_contributing_states_the_convention_this_test_holds():
    contributing = (REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    assert [marker for marker in [RUNNABLE, *sorted(REASONS)] if f"`{marker}`" not in contributing] == []


def test_the_marker_check_refuses_what_would_hide_an_example(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nls\n```\n\n  ```python gpu\n  import torch\n  ```\n\n```sh offline\nls\n```\n```\nx\n```\n"
    )
    problems = [marking_problem(example) for example in fenced_blocks(page)]
    assert problems[0].startswith("is marked nothing") and problems[1] is None
    assert "write ```bash" in problems[2] and "names no language" in problems[3]


def test_the_readme_stays_a_page_a_newcomer_reads_in_five_minutes():
    lines = len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move internals to docs/ or CONTRIBUTING.md"


def test_the_docs_keep_their_runnable_examples():
    assert len(offline_examples()) >= 10, "the docs have lost their runnable examples"


# One test per page, in reading order: each page has the test timeout to itself, and a page may use
# what an earlier one made (the README's toy-photos/ and red-toy).
@pytest.mark.parametrize(
    "page", sorted({example.page for example in offline_examples()}, key=doc_pages().index), ids=lambda page: page.name
)
def test_offline_examples_run_as_written(docs_server, page):
    url, home, workdir = docs_server
    env = example_env(home)
    for example in offline_examples():
        if example.page != page:
            continue
        result = run_example(example, url, env, workdir)
        assert result.returncode == 0, (
            f"{example.where} failed ({result.returncode}):\n{example.code}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
        )


def test_an_example_that_drifted_from_the_server_fails(docs_server):
    """The run is strict enough to fail: a curl whose answer is an HTTP error fails, though curl alone exits 0."""
    url, home, workdir = docs_server
    code = (
        "curl -X POST localhost:3000/txt2img -H 'Content-Type: application/json' "
        """-d '{"prompt": "a cube", "model": "tiny-sdd"}' -o drifted.json\n"""
    )
    result = run_example(Example(REPO_ROOT / "README.md", 0, "bash", RUNNABLE, code), url, example_env(home), workdir)
    assert result.returncode != 0 and "404" in result.stderr
    assert "Did you mean: tiny-sd" in (workdir / "drifted.json").read_text(encoding="utf-8")


def test_tune_help_says_trials_is_required(run_cli):
    help_text = " ".join(run_cli("tune", "--help", check_rc=0).stdout.split())
    assert "--trials INTEGER RANGE Required:" in help_text
