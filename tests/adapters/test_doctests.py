"""Docstring examples of the MQTT adapter's modules run as tests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "adapters.base",
    "adapters.spool",
    "adapters.mapping",
    "adapters.mqtt",
    "adapters.sparkplug.codec",
    "adapters.sparkplug.host",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
