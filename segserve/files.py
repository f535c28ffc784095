"""Publishing a file atomically: written under a temporary name, renamed into place only once complete.

A reader (or a crash) sees the old file or the new one, never half of one; a failed write leaves nothing behind.
Every file segserve publishes goes through :func:`publish`: checkpoints, run records, exported and quantized
models, and the batch command's outputs (whose temporaries live in a private folder of OUT_DIR instead of
beside the target, so that they are easy to find and remove after a kill).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

_counter = itertools.count()


@contextlib.contextmanager
def publish(path: str | os.PathLike[str], *, temp_dir: Path | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (a file, or a folder the caller creates).

    On a clean exit it replaces ``path`` (an existing folder is replaced whole); on an exception it is removed.
    ``durable`` also fsyncs the file and its folder, so the rename survives a power cut (checkpoints).
    """
    path = Path(path)
    folder = temp_dir if temp_dir is not None else path.parent
    temporary = folder / f".{path.name}.{os.getpid()}-{threading.get_ident()}-{next(_counter)}.tmp"
    try:
        yield temporary
        if durable and temporary.is_file():
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        if temporary.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(temporary, path)
        if durable:
            _fsync_folder(path.parent)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def write_atomic(
    path: str | os.PathLike[str], payload: bytes | Mapping[str, bytes], *, temp_dir: Path | None = None
) -> None:
    """Bytes to a file, or {file name: bytes} to a folder, appearing at ``path`` at once."""
    with publish(path, temp_dir=temp_dir) as temporary:
        if isinstance(payload, Mapping):
            temporary.mkdir()
            for name, data in payload.items():
                (temporary / name).write_bytes(data)
        else:
            temporary.write_bytes(payload)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
