"""Running one Triton source compiled (CUDA tensors) or in Triton's interpreter (CPU tensors).

Triton picks one mode for the whole process when it is imported (from ``TRITON_INTERPRET``).
:func:`jit` keeps both forms of a kernel, and :func:`launch` chooses per launch from the
variable's value at that moment, so tests can interpret kernels whatever was imported first.
Shared by the dense and the linear Triton kernels.
"""

from __future__ import annotations

import contextlib
import os

try:  # Triton is importable on CPU-only Linux machines; keep the module importable without it.
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None  # type: ignore[assignment]
    TRITON_IMPORT_ERROR = exc

__all__ = [
    "TRITON_IMPORT_ERROR", "interpreting", "jit", "launch", "tl", "triton", "unavailable_reason",
]


def interpreting() -> bool:
    """Whether launches run in Triton's interpreter now (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(q) -> str | None:
    """Why no Triton kernel can run on ``q``'s device now (None when one can): triton missing, or
    a CPU tensor outside the interpreter."""
    if TRITON_IMPORT_ERROR is not None:
        return f"triton is not importable ({TRITON_IMPORT_ERROR}); install triton>=3.6"
    if q.device.type != "cuda" and not interpreting():
        return (
            f"q is on {q.device}; the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
            "to run CPU tensors in Triton's interpreter (slow; for tests). On CPU use "
            "kernel='reference'"
        )
    return None


if triton is not None:

    class _Kernel(JITFunction):
        """A ``triton.jit`` function that can also run in Triton's interpreter.

        ``fn[grid](...)`` compiles for the GPU; ``fn.interpreted[grid](...)`` runs the same source
        on the host (inside :func:`_interpreter_calls`).
        """

        def __init__(self, fn):
            super().__init__(fn)
            self.interpreted = InterpretedFunction(fn)

    jit = _Kernel
    _INTERPRETED: dict = {}
    _SHARED_HELPERS = __name__.rpartition(".")[0] + "._triton_common"  # jit helpers of 2+ kernels

    @contextlib.contextmanager
    def _interpreter_calls(module: str):
        """Let an interpreted kernel of ``module`` call compiled-mode jit functions (its helpers
        and Triton's own ``tl.cdiv``, ``tl.max``, ... built in compiled mode when TRITON_INTERPRET
        was unset at Triton's import).  Outside a kernel such calls only raise, so nothing else
        changes while the patch is in place."""

        def call_interpreted(self, *args, **kwargs):
            fn = _INTERPRETED.get(self.fn)
            if fn is None:
                fn = _INTERPRETED[self.fn] = InterpretedFunction(self.fn)
            if self.fn.__module__ in (module, _SHARED_HELPERS):
                # a helper of the launched kernel's module or of _triton_common (the same ``tl``
                # in its globals): the launch already patched ``tl``; skipping the per-call
                # re-patching makes the interpreter several times faster
                return fn.rewrite()(*args, **kwargs)
            return fn(*args, **kwargs)

        original = JITFunction.__call__
        JITFunction.__call__ = call_interpreted
        try:
            yield
        finally:
            JITFunction.__call__ = original

    def launch(kernel, grid, *args, **meta) -> None:
        """Compile for the GPU, or interpret when ``TRITON_INTERPRET=1`` (CPU tensors)."""
        if interpreting():
            meta.pop("num_warps", None)  # launch hints mean nothing to the interpreter
            meta.pop("num_stages", None)
            with _interpreter_calls(kernel.fn.__module__):
                kernel.interpreted[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)

else:  # pragma: no cover

    def jit(fn):
        return fn

    def launch(kernel, grid, *args, **meta) -> None:
        raise RuntimeError(f"triton is not importable ({TRITON_IMPORT_ERROR}); install triton>=3.6")
