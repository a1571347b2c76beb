"""The runnable examples in every module's docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import longctx

# Every module of the package, private ones included (their examples document internals);
# ``__main__`` modules run the CLI when imported.
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(longctx.__path__, prefix="longctx.")
    if not info.name.endswith(".__main__")
)

# Modules whose examples run GPU kernels: they run where CUDA is present.
GPU_EXAMPLES = {
    "longctx.kernels.block_sparse_triton",
    "longctx.kernels.fa4",
    "longctx.kernels.linear.triton",
    "longctx.kernels.triton_flash",
    "longctx.kernels.vendor",
}

# The public faces a newcomer reads first: each must carry at least one runnable example.
MUST_HAVE_EXAMPLES = {
    "longctx",
    "longctx.kernels.mask",
    "longctx.kernels.merge",
    "longctx.kernels.reference",
    "longctx.kernels.dispatch",
    "longctx.parallel.api",
    "longctx.parallel.layout",
    "longctx.parallel.plan",
    "longctx.parallel.strategies",
    "longctx.models.context",
}


def test_every_module_is_listed():
    assert MUST_HAVE_EXAMPLES <= set(MODULES) | {"longctx"}
    assert len(MODULES) > 30


@pytest.mark.parametrize("name", ["longctx", *MODULES])
def test_docstring_examples(name):
    if name in GPU_EXAMPLES and not torch.cuda.is_available():
        pytest.skip(f"{name}'s examples run GPU kernels")
    module = importlib.import_module(name)  # importing never needs an optional framework
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    if name in MUST_HAVE_EXAMPLES:
        assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
