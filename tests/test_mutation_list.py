"""The mutation list of ``make mutate`` (tests/mutation_check.py) still fits the code.

``make mutate`` itself takes many minutes; these checks take seconds, so a change that moves code a
mutation points at, or renames a test a mutation selects, fails here, in ``make test``, until the
mutation is updated with it.
"""

from __future__ import annotations

from mutation_check import MUTATIONS, REPO_ROOT, check_snippets, pytest_arguments


def test_every_mutation_snippet_is_in_its_file_exactly_once_and_its_tests_exist():
    assert check_snippets(REPO_ROOT, MUTATIONS) == []


def test_mutation_names_are_unique_and_each_has_tests():
    names = [mutation.name for mutation in MUTATIONS]
    assert len(names) == len(set(names))
    assert all(mutation.tests and pytest_arguments(list(mutation.tests)) for mutation in MUTATIONS)


def test_every_mutation_selects_at_least_one_test():
    """Each selection's ``-k`` expression, matched as pytest matches it (a case-insensitive substring of
    the test's node id: file, name and parameters), against the tests one collection finds."""
    import re
    import subprocess
    import sys

    files = sorted({select.file for mutation in MUTATIONS for select in mutation.tests})
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    node_ids = [line.lower() for line in collected.splitlines() if "::" in line]

    def matches(expression: str, node_id: str) -> bool:
        # pytest's -k words: and, or, not, parentheses, and names of word characters and :+-.[]\/
        python = re.sub(
            r"[\w:+\-.\[\]\\/]+",
            lambda word: word[0] if word[0] in ("and", "or", "not") else repr(word[0].lower() in node_id),
            expression,
        )
        return eval(python)  # only True, False, and, or, not and parentheses remain

    unmatched = [
        f"{mutation.name}: {select.expression()}"
        for mutation in MUTATIONS
        for select in mutation.tests
        if not any(select.file in node_id and matches(select.expression(), node_id) for node_id in node_ids)
    ]
    assert unmatched == []
