"""Shared helpers of the integration tests: skip without a framework, run README examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def require_or_skip(module: str):
    """Import ``module`` through longctx's adapter check, or skip saying what to install."""
    from longctx.integrations import SUPPORTED, require

    try:
        return require(module)
    except ImportError as exc:
        dist_name, extra, spec = SUPPORTED[module]
        pytest.skip(
            f"{dist_name}{spec} is not installed ({exc}); pip install \"longctx[{extra}]\"",
            allow_module_level=True,
        )


def readme_example(marker: str) -> str:
    """The ```python block that follows ``<!-- example: {marker} -->`` in README.md."""
    text = README.read_text()
    match = re.search(
        rf"<!-- example: {re.escape(marker)} -->\s*```python\n(.*?)```", text, flags=re.DOTALL
    )
    assert match is not None, f"README.md has no python block after <!-- example: {marker} -->"
    return match.group(1)


def run_readme_example(marker: str, tmp_path: Path, nproc: int = 2, timeout: float = 300):
    """Run the README example under ``torchrun --nproc-per-node nproc`` (CPU, gloo)."""
    import os
    import subprocess
    import sys

    script = tmp_path / f"readme_{marker}.py"
    # The example runs as written; after its last line each rank reports that it got there and
    # leaves without the interpreter's teardown, where a gloo/DeepSpeed background thread
    # still running at exit now and then aborts the process (SIGABRT) after the work is done.
    done = "import os, sys; print('README-EXAMPLE-DONE', flush=True); sys.stderr.flush(); os._exit(0)"
    script.write_text(readme_example(marker) + "\n" + done + "\n")
    root = README.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", str(script)],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("README-EXAMPLE-DONE") == nproc, proc.stdout[-3000:]
    return proc
