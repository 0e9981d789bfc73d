"""interbrain.allocator: freed memory stays mapped, so a buffer reallocated every update costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# a 40 MB buffer (over glibc's largest automatic mmap threshold, 32 MB) allocated and freed 20 times; prints whether
# the setting took and the page faults of the 20 allocations after 5 warm-up rounds
PROBE = """
import resource, sys, torch
from interbrain import allocator
took = allocator.keep_freed_memory() and allocator.mmap_threshold > 40_000_000 if sys.argv[1] == "keep" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(10_000_000).sum()
before = faults()
for _ in range(20):
    torch.ones(10_000_000).sum()
print(took, faults() - before)
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True).stdout.split()
    return out[0], int(out[1])


def test_keep_freed_memory_removes_the_page_faults_of_a_reallocated_buffer():
    took, kept = _probe("keep")
    if took != "True":
        pytest.skip("no glibc mallopt here, or it capped the mmap threshold under the probe's 40 MB buffer")
    _, default = _probe("default")
    pages = 20 * 40_000_000 // 4096  # every page of every allocation, when each is a fresh mapping
    assert default > pages // 2  # glibc's default: each 40 MB buffer is a new mapping, touched page by page
    # kept: the same heap memory every time (an occasional reallocation still faults on this VM: at most 3 of 20 in
    # 10 runs on the development machine; glibc's default faults on all 20)
    assert kept < default // 4
