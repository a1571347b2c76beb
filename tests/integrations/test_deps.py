"""Adapters import their frameworks lazily and check the installed versions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longctx.integrations import SUPPORTED, UnsupportedVersionError, require
from longctx.integrations._deps import in_range, parse_version


def test_importing_longctx_imports_no_framework():
    code = (
        "import sys, longctx, longctx.integrations\n"
        "loaded = [m for m in ('megatron', 'transformers', 'deepspeed') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_version_ranges():
    assert parse_version("0.16.1rc1") == (0, 16, 1)
    assert in_range("0.16.1", ">=0.16,<0.18") and not in_range("0.18.0", ">=0.16,<0.18")
    assert not in_range("0.15.9", ">=0.16,<0.18") and in_range("5.25.0", ">=5.0,<6")
    with pytest.raises(ValueError, match="unsupported version clause"):
        in_range("1.0", "~=1.0")


def test_unsupported_version_and_missing_framework_errors(monkeypatch):
    import importlib
    import importlib.metadata

    real_import = importlib.import_module
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0")
    monkeypatch.setattr(importlib, "import_module", lambda name: sys)  # any module object
    for module, (_, extra, _) in SUPPORTED.items():
        with pytest.raises(UnsupportedVersionError, match=rf"longctx\[{extra}\]"):
            require(module)

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r'pip install "longctx\[megatron\]"'):
        require("megatron.core")
    monkeypatch.setattr(importlib, "import_module", real_import)


@pytest.mark.parametrize(
    "name,framework",
    [
        ("longctx.integrations._deps", None),
        ("longctx.integrations.transformers", "transformers"),
        ("longctx.integrations.deepspeed", "deepspeed"),
    ],
)
def test_docstring_examples(name, framework):
    import doctest
    import importlib

    from integration_support import require_or_skip

    if framework is not None:
        require_or_skip(framework)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
