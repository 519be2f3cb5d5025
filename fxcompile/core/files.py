"""Writing files so that a crash or a failed write never leaves a half file behind.

    >>> with atomic_write("model.onnx") as f:
    ...     f.write(data)

The data goes to a private temporary file beside the target (so concurrent writers never
share one), which replaces the target only once it is complete.  The file gets the
permissions any new file of the user gets (``0o666`` less the umask), not the temporary
file's private ``0o600``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False,
                 encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it atomically becomes ``path``.

    ``fsync`` flushes the data to disk before the rename (checkpoints want that); on any
    exception the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
