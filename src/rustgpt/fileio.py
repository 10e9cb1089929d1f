"""File I/O with rustgpt's errors: reads that name the path and the reason, and atomic writes
(readers see the old file or the new one, never a partial one)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from rustgpt.errors import LlmError, SerializationError


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory: write, fsync,
    rename over `path`, fsync the directory. Raises SerializationError (OSError as cause);
    on failure the temporary file is removed and any previous `path` is untouched."""
    import tempfile  # here, not at the top: config.py reads files and must start fast

    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise SerializationError(f"{path}: cannot write ({err.strerror or err})") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def reading(path: str | os.PathLike, error: type[LlmError],
            max_bytes: int | None = None) -> Iterator[BinaryIO]:
    """`path` open for reading, in binary, for the block. Every failure, in opening or in
    reading inside the block, raises `error` naming the path (the OSError as cause):
    missing, not a regular file, permission denied, larger than `max_bytes`."""
    path = Path(path)
    try:
        if not path.is_file():
            reason = "not a regular file" if path.exists() else "no such file"
            raise error(f"{path}: {reason}")
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise error(f"{path}: {size:,} bytes, more than the limit of {max_bytes:,}; "
                        f"split the file or raise the limit")
        with open(path, "rb") as f:
            yield f
    except PermissionError as err:
        raise error(f"{path}: permission denied") from err
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from err


def read_bytes(path: str | os.PathLike, error: type[LlmError],
               max_bytes: int | None = None) -> bytes:
    """The contents of `path`, with `reading`'s errors."""
    with reading(path, error, max_bytes) as f:
        return f.read()


class DirectoryLock:
    """An exclusive lock on a directory for the life of a run: ``.lock`` inside it, locked
    with flock (so the kernel releases it when the holder dies, even by kill -9) and holding
    the holder's PID. A context manager; a second holder raises SerializationError naming
    the first one's PID."""

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise SerializationError(f"{self.path}: cannot create the run's lock file "
                                     f"({err.strerror or err})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SerializationError(f"{self.path.parent}: another run is writing here (PID "
                                     f"{holder}); wait for it to end or choose another "
                                     f"--output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays for the next run
            self._fd = None
