"""comm: the processes of a data-parallel training run, over MPI.

The only module that imports mpi4py, and only when an MPI launcher started the program
(``mpiexec -n N rustgpt-cli train ...``; the launcher's environment says so): a run
started any other way is one process and never loads MPI. ``world()`` returns the run's
communicator: rank, size, whether this is rank 0 (``is_main``, the rank that writes files),
and the few collective operations training needs.

Every rank must make the same collective calls in the same order; a rank that fails alone
ends the whole job (``abort``) rather than leave the others waiting.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from rustgpt.errors import ConfigError

# Variables an MPI launcher sets in every process it starts: the number of processes
# (MPICH's Hydra and PMI-based launchers, Open MPI, PMIx, MVAPICH)
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


class SingleProcess:
    """The communicator of a run of one process: every collective is the identity."""

    rank = 0
    size = 1
    local_size = 1
    is_main = True

    def allreduce(self, buffer: np.ndarray) -> None:
        """Sum `buffer` over the ranks, in place (here: it is the sum)."""

    def sum(self, values) -> np.ndarray:
        """The sums over the ranks of a few numbers, float64 (here: the numbers)."""
        return np.asarray(values, np.float64)

    def broadcast(self, buffer: np.ndarray) -> None:
        """Copy rank 0's `buffer` into every rank's, in place."""

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` (any picklable value), on every rank."""
        return obj

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def abort(self, code: int) -> None:
        """End every process of the job with exit code `code`."""
        sys.exit(code)


class MpiComm(SingleProcess):
    """The communicator of an MPI job (MPI.COMM_WORLD through mpi4py)."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise ConfigError(f"started by an MPI launcher ({_launcher()}) but mpi4py is not "
                              f"installed: pip install 'rustgpt[mpi]'") from None
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.is_main = self.rank == 0
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = local.Get_size()
        local.Free()

    def allreduce(self, buffer: np.ndarray) -> None:
        self._comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)

    def sum(self, values) -> np.ndarray:
        out = np.array(values, np.float64)
        self._comm.Allreduce(self._mpi.IN_PLACE, out, op=self._mpi.SUM)
        return out

    def broadcast(self, buffer: np.ndarray) -> None:
        self._comm.Bcast(buffer, root=0)

    def share(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def gather(self, obj: Any) -> list:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._comm.Abort(code)


def _launcher() -> str:
    """The launcher variable that says how many processes there are, as NAME=VALUE."""
    for name in _SIZE_VARIABLES:
        if name in os.environ:
            return f"{name}={os.environ[name]}"
    return "no launcher"


def launched_size(environ=os.environ) -> int:
    """The number of processes an MPI launcher started, from its variables (1 without
    one, or when they do not parse)."""
    for name in _SIZE_VARIABLES:
        try:
            return max(int(environ[name]), 1)
        except (KeyError, ValueError):
            continue
    return 1


_WORLD: SingleProcess | None = None


def world() -> SingleProcess:
    """The run's communicator: an MpiComm when an MPI launcher started more than one
    process, else a SingleProcess (and mpi4py is never imported). Raises ConfigError when
    launched by MPI without mpi4py installed."""
    global _WORLD
    if _WORLD is None:
        _WORLD = MpiComm() if launched_size() > 1 else SingleProcess()
    return _WORLD


def current() -> SingleProcess | None:
    """The communicator world() made, or None before any (error paths: no MPI start-up)."""
    return _WORLD
