"""File I/O with rustgpt's errors: reads that name the path and the reason, and atomic writes
(readers see the old file or the new one, never a partial one)."""

from __future__ import annotations

import os
from pathlib import Path

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


def read_bytes(path: str | os.PathLike, error: type[LlmError],
               max_bytes: int | None = None) -> bytes:
    """The contents of `path`. Every failure raises `error` naming the path (the OSError as
    cause): missing, not a regular file, permission denied, larger than `max_bytes`."""
    path = Path(path)
    try:
        if not path.is_file():
            reason = "not a regular file" if path.exists() else "no such file"
            raise error(f"{path}: {reason}")
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise error(f"{path}: {size:,} bytes, more than the limit of {max_bytes:,}; "
                        f"split the file or raise the limit")
        return path.read_bytes()
    except PermissionError as err:
        raise error(f"{path}: permission denied") from err
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from err
