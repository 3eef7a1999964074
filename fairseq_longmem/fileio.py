"""Files a user points us at or that we write for them: reading JSON with a one-line error instead
of a traceback, and the one atomic write (checkpoints, memory files, the converter's outputs)."""

import contextlib
import json
import os
import shutil
from typing import Callable

INCOMPLETE = ".incomplete"  # suffix of a write in progress


def _fsync_dir(folder: str):
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write: Callable):
    """``write(f)`` into ``path + '.incomplete'``, fsync, then ``os.replace`` it onto ``path``:
    a reader finds the old file or the new one, never part of one, whenever the writer is killed.
    The file is created like any file the user writes (0666 less the umask)."""
    tmp = path + INCOMPLETE
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_copy(src: str, dst: str):
    """Copy ``src`` onto ``dst`` through :func:`atomic_write`."""
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 16 << 20))


def read_json(path: str, what: str):
    """The JSON value stored at ``path``.

    ``what`` names the file for the user (a flag such as ``--suffix-data`` or a description such as
    ``the model's config.json``). A missing file raises FileNotFoundError, an unreadable or
    malformed one ValueError, each in one line that starts with ``what`` and names ``path``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{what}: cannot read {path}: not valid JSON ({e})") from None
