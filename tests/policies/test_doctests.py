"""The docstring examples of the policies package run as tests."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import policies

MODULES = ["policies", *sorted(m.name for m in pkgutil.walk_packages(policies.__path__, "policies."))]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
