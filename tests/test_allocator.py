"""A node reuses freed chunk buffers instead of faulting fresh pages in (allocator.py).

Each case runs in its own Python process: allocator settings are per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys, threading
from gateway.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False

def work():  # a transfer thread's pattern: chunk buffers taken and freed, over and over
    for _ in range(30):
        bufs = [bytearray(1 << 20) for _ in range(8)]
        del bufs

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=work)
t.start()
t.join()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_chunk_buffers_are_reused_instead_of_faulted_in_again() -> None:
    """Rounds of 8 x 1 MiB buffers in a thread: glibc's defaults fault every page in again.

    With the defaults the thread's arena returns each round's memory to the kernel and
    faults it in again (about one fault per 4 KiB page); kept, only the first round faults."""
    env = {"GLIBC_TUNABLES": ""}
    default_set, default_faults = _run("default", **env)
    tuned_set, tuned_faults = _run("tuned", **env)
    assert (default_set, tuned_set) == ("False", "True")
    pages = 30 * 8 * (1 << 20) // 4096
    assert default_faults > pages // 2, default_faults  # the cost being removed is real
    assert tuned_faults < default_faults // 10, (tuned_faults, default_faults)


def test_malloc_tunables_chosen_by_the_operator_are_left_alone() -> None:
    """GLIBC_TUNABLES with malloc settings: the node changes nothing."""
    chosen, _ = _run("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert chosen == "False"
