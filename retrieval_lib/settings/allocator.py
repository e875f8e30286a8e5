"""Keep freed CPU memory for the next step instead of handing it back to the kernel.

glibc's ``malloc`` serves every block above its mmap threshold (which it raises as blocks are
freed, but never above 32 MiB on 64-bit Linux) with a fresh ``mmap`` and returns it to the kernel
on ``free``. A training step on the CPU allocates activations, logits and gradients larger than
that every step, so every step maps them afresh and pays one page fault (and the kernel's
zeroing) per 4 KiB page. ``benchmarks/throughput.py`` measures the same switch on the peer
(its rows with and without "freed memory kept"), and ``tests/test_allocator.py`` counts the
page faults it saves. The PyTorch tuning guide's advice for the CPU is the same in kind
(tcmalloc or jemalloc); this does it inside glibc, so nothing has to be installed or preloaded.

:func:`keep_freed_memory` tells glibc (``mallopt``) to serve large blocks from the heap
(``M_MMAP_MAX = 0``) and to keep freed memory at the top of the heap (``M_TRIM_THRESHOLD``
at its maximum), so later steps reuse pages that are already mapped. Arithmetic is untouched:
runs give bit-identical numbers. The cost is memory the process keeps after a peak (the
resident size does not shrink until the process ends; the benchmark records each
contender's peak). It applies to this process from the call on, on Linux with glibc;
elsewhere, or with ``RETRIEVAL_CPU_ALLOCATOR=default`` in the environment, malloc is left as
it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["ENV_VAR", "keep_freed_memory"]

#: ``RETRIEVAL_CPU_ALLOCATOR=default`` leaves glibc's malloc settings as they are.
ENV_VAR = "RETRIEVAL_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_INT_MAX = 2**31 - 1  # mallopt takes an int

_state: dict | None = None


def keep_freed_memory() -> dict:
    """Apply the setting once per process; returns what was done and why (for ``env.json``)."""
    global _state
    if _state is None:
        _state = _apply()
    return dict(_state)


def _apply() -> dict:
    choice = os.environ.get(ENV_VAR, "").strip().lower()
    if choice in ("default", "off", "0"):
        return {"applied": False, "why": f"{ENV_VAR}={choice}: malloc left as it is"}
    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc":
        return {"applied": False,
                "why": f"{platform.system()} {libc or 'without glibc'}: malloc left as it is"}
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    return {"applied": ok, "why": (f"glibc {version}: large blocks from the heap, freed memory "
                                   f"kept (mallopt)" if ok else f"glibc {version}: mallopt "
                                   f"refused the setting")}
