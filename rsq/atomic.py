"""Writing files so that a crash leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO

TMP_SUFFIX = ".tmp"


def atomic_write(path, write: Callable[[IO], None], binary: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename over ``path``.

    The temporary is named ``<name>.<random>.tmp``, which ``remove_stale_temporaries`` knows;
    an OSError (full disk, read-only folder) propagates after the temporary is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)  # make the rename itself survive a power cut
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(text: str, path) -> None:
    atomic_write(path, lambda f: f.write(text))


def remove_stale_temporaries(folder, names) -> None:
    """Delete the temporaries a killed ``atomic_write`` of any of ``names`` left in ``folder``."""
    for name in names:
        for leftover in Path(folder).glob(f"{name}.*{TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform / file system; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
