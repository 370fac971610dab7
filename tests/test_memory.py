"""task/memory.py: freed heap pages really go back to the OS."""

from __future__ import annotations

import sys

import psutil
import pytest
import torch

from task.memory import release_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_returns_the_holes_of_a_fragmented_heap():
    process = psutil.Process()
    # 2,000 tensors of 64 KiB come from the heap (below glibc's mmap threshold); freeing every
    # other one leaves 64 MiB of holes that free() alone keeps resident.
    tensors = [torch.ones(16 * 1024) for _ in range(2000)]
    del tensors[::2]
    before = process.memory_info().rss
    assert release_freed_memory()
    after = process.memory_info().rss
    assert before - after > 32 * 2**20, (before, after)
    assert all(float(t[0]) == 1.0 for t in tensors)  # what is still held is intact
