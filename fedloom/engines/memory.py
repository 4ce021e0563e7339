"""Keeping freed memory in the process (Linux with glibc only).

A round allocates fresh tensors of a few hundred KB to a few MB (the stacked local models, their
gradients, the rows). glibc serves every allocation above its mmap threshold (128 KB to start) with a
new mmap and returns it on free, so each round pays the page faults of touching fresh pages again:
on W1 (100 clients of an MLP) that was half of the round. ``keep_freed_memory`` raises the threshold
to 64 MB and the trim threshold to 256 MB with ``mallopt``, so those blocks come from malloc's heap
and are reused; a dataset (larger than 64 MB) is still mapped and returned as before.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's environment tunables


def keep_freed_memory() -> bool:
    """Ask glibc to serve allocations under 64 MB from its heap and keep up to 256 MB freed; True when it
    took them. Not on other systems or C libraries, nor when the user set glibc's own variables."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc, no mallopt
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
