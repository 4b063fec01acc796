"""The memory a decoding run will need, known before it runs, against what the device has free.

XLA's compiled program reports the buffers it will allocate (``memory_analysis``: working
memory, outputs); its arguments (params, the prompt batch) are already on the device. A run is
refused before it starts when that exceeds a share of the free memory of the device: on an
accelerator its allocator's limit minus what is in use, on the CPU the host's available memory
(``MemAvailable`` of ``/proc/meminfo``). The batch planner of the binaries
(:func:`rows_that_fit`) uses the same numbers to split a long list of prompts into batches that
fit.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax

# Refuse a run whose buffers exceed this share of the free memory: the estimate leaves out
# XLA's scratch allocations outside the program and the host's own use (Python, the tokenizer).
BUDGET_FRACTION = 0.8
GB = 1 << 30


class MemoryBudgetError(ValueError):
    """A run whose buffers would not fit in the free device memory."""


def available_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
    """Free memory of ``device`` (default: the first device), or None when unknown."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements it  # noqa: BLE001
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def required_bytes(compiled) -> Optional[int]:
    """Bytes a compiled program allocates when it runs (working memory plus outputs that do not
    alias an input), from XLA's ``memory_analysis``; None when the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes) + int(m.output_size_in_bytes) - int(
        getattr(m, "alias_size_in_bytes", 0))


def check_fits(compiled, what: str, advice: str, available: Optional[int] = None) -> None:
    """Raises :class:`MemoryBudgetError` (saying ``what`` needs how much, what is free, and
    ``advice``) when the program's buffers exceed :data:`BUDGET_FRACTION` of the free memory;
    silent when either number is unknown."""
    need = required_bytes(compiled)
    free = available_bytes() if available is None else available
    if need is None or free is None or need <= BUDGET_FRACTION * free:
        return
    raise MemoryBudgetError(f"{what} needs about {need / GB:.1f} GB of device memory but "
                            f"{free / GB:.1f} GB are free: {advice}")


def rows_that_fit(bytes_for_rows: Callable[[int], Optional[int]], rows: int,
                  available: Optional[int] = None) -> int:
    """How many rows (prompts) one batch may hold: the largest ``b <= rows`` whose estimated
    bytes (``bytes_for_rows(b)``, e.g. :func:`required_bytes` of the program compiled for ``b``
    rows) fit in :data:`BUDGET_FRACTION` of the free memory. Memory grows linearly with the
    rows, so two estimates (1 row and ``rows`` rows) give the slope. At least 1."""
    free = available_bytes() if available is None else available
    if free is None or rows <= 1:
        return max(1, rows)
    full = bytes_for_rows(rows)
    if full is None or full <= BUDGET_FRACTION * free:
        return rows
    one = bytes_for_rows(1) or 0
    per_row = max(1, (full - one) // max(1, rows - 1))
    fit = 1 + int((BUDGET_FRACTION * free - one) // per_row)
    return max(1, min(rows, fit))
