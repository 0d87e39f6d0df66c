"""Keep freed memory in the process instead of handing it back to the kernel after every step.

PyTorch on a CPU frees a step's activations and allocates them again the next step. glibc's malloc gives large
freed blocks back to the kernel (it unmaps them, or trims the heap), and the next step's first write to each page
is a page fault that the kernel answers with a fresh zeroed page: on the shapes model 8,000-11,500 faults a
training step, 5-7% of its time in the kernel. Without them a benchmark arm (`evolve_efficiency.py`'s uniform arm,
two side by side on a 2-core VM) ran 1.07-1.10x as fast, same scores to the last digit; fresh processes measured
alone gain more (`benchmarks/allocator.py`: 1.14-1.25x training, 1.27x sampling; RESULTS.md). PyTorch's CPU
tuning guide removes this by preloading jemalloc or tcmalloc; two of glibc's own settings do it without another
library:

- the trim threshold at 1 GiB: free memory at the top of the heap stays for the next step (never more than the
  process's own peak, as the heap never grew past it);
- the mmap threshold fixed at glibc's largest (32 MiB; glibc starts it at 128 KiB and raises it there itself
  as large blocks are freed): a step's buffers come from the heap, while a block above it (a large weight as a
  model loads, a big attention map) is still mapped alone, and unmapped when freed. On a GPU the CPU's steps
  are small: a GPU run gains nothing, and may keep up to 1 GiB of freed memory it would have given back.

The commands (`cli.main`), the benchmarks' arms and the tests call `keep_freed_memory()` once at start; importing
the library changes nothing. `T2I_EVOLVE_MALLOC=default` leaves malloc as it is, as does a `GLIBC_TUNABLES` that
sets malloc's own (yours win), and any C library but glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, as glibc's <malloc.h> numbers them
TRIM_BYTES = 1 << 30
MMAP_BYTES = 32 << 20  # glibc's upper limit on 64-bit systems (a larger value is refused)
SWITCH = "T2I_EVOLVE_MALLOC"


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds (module docstring); returns whether both were set."""
    if os.environ.get(SWITCH, "").strip().lower() == "default" or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1 and mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1
