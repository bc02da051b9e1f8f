"""The mutation list of ``make mutate`` (tests/mutation_check.py) still fits the code.

``make mutate`` itself takes many minutes; this check takes none, so a change that moves code a
mutation points at fails here, in ``make test``, until the mutation's snippet is updated with it.
"""

from __future__ import annotations

from mutation_check import MUTATIONS, REPO_ROOT, check_snippets, pytest_arguments


def test_every_mutation_snippet_is_in_its_file_exactly_once_and_its_tests_exist():
    assert check_snippets(REPO_ROOT, MUTATIONS) == []


def test_mutation_names_are_unique_and_each_has_tests():
    names = [mutation.name for mutation in MUTATIONS]
    assert len(names) == len(set(names))
    assert all(mutation.tests and pytest_arguments(list(mutation.tests)) for mutation in MUTATIONS)
