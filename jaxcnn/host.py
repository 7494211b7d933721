"""The host's C allocator, set up so that XLA:CPU's buffers stay mapped from one call to the next.

Every execution of a compiled program on the CPU allocates the program's temporary buffer (tens of MB for a
CNN train step: 45 MB for ``small_cnn``'s at batch 128, 69 MB for its per-example norms) with the C library's
``malloc`` and frees it when the call ends. glibc serves a block larger than its mmap threshold (which grows
to at most 32 MB by itself), and a block larger than 64 MB asked for by a worker thread, with a fresh
``mmap`` and returns it with ``munmap`` on ``free``. The kernel then maps and zeroes every page of the buffer
again on the next call: for ``small_cnn``'s per-example norms, 16,821 page faults per call, and 112 ms per
call against 72.5 ms with :func:`keep_freed_memory` on a 2-core AMD EPYC (``python
experiments/host_allocator.py``, ``experiments/results/host_allocator/``). Inside ``lax.scan`` the buffer is
allocated once for all the steps, so the training loop hardly pays this; a jitted step called from Python
pays it every call.

:func:`keep_freed_memory` tells glibc to serve every thread from the main arena and to keep what is freed
(``mallopt``: one arena, mmap threshold and trim threshold of 1 GiB), so the next call reuses the pages.
The process keeps its peak heap instead of returning memory to the system between calls. ``jaxcnn`` (the
command) does this for its own process unless ``JAXCNN_KEEP_FREED_MEMORY=0``; a program that imports jaxcnn
calls it itself, before its first JAX computation (threads that already have their own arena keep it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
KEEP = 1 << 30  # bytes: blocks up to this size come from the heap, and up to this much free memory stays mapped
ENV = "JAXCNN_KEEP_FREED_MEMORY"  # "0": the jaxcnn command leaves the allocator as it is


def keep_freed_memory() -> bool:
    """Configures glibc's ``malloc`` for the whole process: one arena, blocks up to :data:`KEEP` from the heap,
    freed memory kept mapped (see the module docstring). Returns whether it was applied: ``False`` where the C
    library is not glibc (macOS, musl), which is left unchanged."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = ctypes.CDLL(name).mallopt
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, KEEP), (_M_TRIM_THRESHOLD, KEEP))
    applied = [mallopt(param, value) == 1 for param, value in settings]  # every setting, even after a refusal
    return all(applied)


def configure_command() -> bool:
    """:func:`keep_freed_memory` unless the environment variable :data:`ENV` is ``"0"``: what the ``jaxcnn``
    command runs first. Returns whether the allocator was configured."""
    return os.environ.get(ENV, "1") != "0" and keep_freed_memory()
