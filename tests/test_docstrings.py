"""The runnable examples in the public modules' docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "longctx",
    "longctx.kernels.mask",
    "longctx.kernels.merge",
    "longctx.kernels.reference",
    "longctx.parallel.api",
    "longctx.parallel.layout",
    "longctx.parallel.plan",
    "longctx.models.context",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
