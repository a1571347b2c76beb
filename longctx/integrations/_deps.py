"""Import a third-party framework for an adapter, checking that it is installed and supported.

Example::

    >>> from longctx.integrations._deps import parse_version, in_range
    >>> parse_version("0.16.1rc2"), in_range("0.16.1", ">=0.16,<0.18")
    ((0, 16, 1), True)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType

__all__ = ["SUPPORTED", "UnsupportedVersionError", "in_range", "parse_version", "require"]

# (import name, distribution name, pyproject extra, supported version range); keep the ranges in
# step with the extras in pyproject.toml.
SUPPORTED: dict[str, tuple[str, str, str]] = {
    "megatron.core": ("megatron-core", "megatron", ">=0.16,<0.18"),
    "transformers": ("transformers", "transformers", ">=5.0,<6"),
    "deepspeed": ("deepspeed", "deepspeed", ">=0.19,<0.20"),
}


class UnsupportedVersionError(ImportError):
    """The installed framework's version is outside the range the adapter supports."""


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"0.16.1rc2"`` -> ``(0, 16, 1)``."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip().lstrip("vV"))
    if match is None:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(p) for p in match.group(0).split("."))


def in_range(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies a comma-separated ``>=a,<b`` specifier (only ``>=``, ``<``)."""
    have = parse_version(version)
    for clause in spec.split(","):
        clause = clause.strip()
        if clause.startswith(">="):
            if have < parse_version(clause[2:]):
                return False
        elif clause.startswith("<"):
            if not have < parse_version(clause[1:]):
                return False
        else:
            raise ValueError(f"unsupported version clause {clause!r} in {spec!r}")
    return True


def require(module: str) -> ModuleType:
    """Import ``module`` (a key of :data:`SUPPORTED`) or raise an error that says what to install."""
    dist_name, extra, spec = SUPPORTED[module]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this longctx adapter needs {dist_name} ({spec}), which is not importable here "
            f"({exc}); install it with: pip install \"longctx[{extra}]\""
        ) from exc
    try:
        version = importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mod, "__version__", None)
    if version is None:
        raise UnsupportedVersionError(
            f"cannot tell which version of {dist_name} is installed; longctx supports {spec}: "
            f"pip install \"longctx[{extra}]\""
        )
    if not in_range(version, spec):
        raise UnsupportedVersionError(
            f"{dist_name} {version} is installed but longctx's adapter supports {dist_name}{spec}; "
            f"install a supported version: pip install \"longctx[{extra}]\""
        )
    return mod
