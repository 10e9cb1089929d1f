"""What the machine can hold: the bound on kernel threads and the memory available, checked
before a model, a batch or a beam is allocated rather than after the allocation fails.

Imports nothing heavy: ``rustgpt/__init__.py`` bounds OMP_NUM_THREADS through it before the
C extension (and with it the OpenMP runtime) loads.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from typing import Iterator

from rustgpt.errors import LlmError, ValidationError

log = logging.getLogger(__name__)

# a bound, not advice: beyond one thread per CPU the kernels slow down, and at tens of
# thousands OpenMP crashes or exits the process
THREADS_PER_CPU = 4


def logical_cpus() -> int:
    """The CPUs the OS reports (at least 1)."""
    return os.cpu_count() or 1


def max_threads() -> int:
    """The most kernel threads rustgpt runs: THREADS_PER_CPU x the logical CPUs."""
    return THREADS_PER_CPU * logical_cpus()


def threads_bound_text() -> str:
    """The bound and its reason, for messages: '8 (4 x the 2 logical CPUs)'."""
    return f"{max_threads()} ({THREADS_PER_CPU} x the {logical_cpus()} logical CPUs)"


def bound_omp_num_threads() -> None:
    """Cap each count in OMP_NUM_THREADS ("N" or "N,M,...") at max_threads(), with a
    warning. Run before the OpenMP runtime loads: it reads the variable once, then."""
    value = os.environ.get("OMP_NUM_THREADS")
    if not value:
        return
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        return  # not numbers: OpenMP ignores the variable itself
    bound = max_threads()
    if max(counts) > bound:
        os.environ["OMP_NUM_THREADS"] = ",".join(str(min(n, bound)) for n in counts)
        log.warning("OMP_NUM_THREADS = %s is more than %s: using %s", value,
                    threads_bound_text(), os.environ["OMP_NUM_THREADS"])


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping (Linux MemAvailable,
    else the free physical pages), no more than the room left under the process's cgroup
    (v2) memory limit (a container's), or None when the system does not say."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024  # the value is in kB
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    room = _cgroup_room()
    if room is not None:
        found = room if found is None else min(found, room)
    return found


def _cgroup_room(root: str = "/sys/fs/cgroup", cgroup: str = "/proc/self/cgroup") -> int | None:
    """memory.max - memory.current of this process's cgroup (v2); None without a limit."""
    try:
        with open(cgroup) as f:
            path = next((line.split(":", 2)[2].strip() for line in f
                         if line.startswith("0::")), None)
        if path is None:
            return None
        group = os.path.join(root, path.lstrip("/"))
        with open(os.path.join(group, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(group, "memory.current")) as f:
            return max(int(limit) - int(f.read()), 0)
    except (OSError, ValueError, IndexError):
        return None


def size_text(nbytes: float) -> str:
    """nbytes for people: '512 KB', '3.1 GB', '4.6e+03 TB'."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit in ("bytes", "KB") else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:,.1f} TB" if nbytes < 1e6 else f"{nbytes:.1e} TB"


def check_memory(need: int, what: str, error: type[LlmError] = ValidationError,
                 available: int | None = None) -> None:
    """Raise `error` when `need` bytes exceed the memory available (`available`, else
    available_memory(); nothing is checked when that is unknown). `what` ends in its verb:
    "generate: beam_width = 20000 needs" about 9.8 GB of memory, 1.2 GB is available."""
    if available is None:
        available = available_memory()
    if available is not None and need > available:
        raise error(f"{what} about {size_text(need)} of memory, {size_text(available)} is "
                    f"available")


@contextmanager
def allocating(what: str, error: type[LlmError] = ValidationError) -> Iterator[None]:
    """Turn a failed allocation inside the block (MemoryError from numpy, or OSError ENOMEM
    from mmap) into `error`: one line naming `what` and the memory available."""
    try:
        yield
    except (MemoryError, OSError) as err:
        if isinstance(err, OSError) and err.errno != errno.ENOMEM:
            raise
        available = available_memory()
        have = "" if available is None else f", {size_text(available)} is available"
        raise error(f"{what}: out of memory{have}") from err
