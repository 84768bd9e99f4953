"""Writing files atomically: write a temp file in the target directory, then ``os.replace``, so an
interrupted run never leaves a half-written file under the final name (data, checkpoints' small
files, logs and metrics all write through here)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


def _temp_name(path: Path) -> Path:
    # One temp name per (process, thread) and directory: writers never collide, and reusing the
    # name is several times faster than a fresh random name per file on large directories.
    return path.parent / f".writing-{os.getpid()}-{threading.get_ident()}.tmp"


def atomic_write_with(path: str | os.PathLike, writer) -> None:
    """``writer(f)`` on a binary file that appears under ``path`` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            writer(f)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=indent) + "\n").encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    atomic_write_with(path, lambda f: np.save(f, array, allow_pickle=False))


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    atomic_write_with(path, lambda f: np.savez(f, **arrays))


def check_output(key: str, out: Optional[str], inputs: Sequence[str], overwrite: bool) -> None:
    """A command's output ``key=out`` is never one of its ``inputs`` and never a folder, and an
    existing file is replaced only with ``overwrite=true`` (ConfigError naming the key otherwise)."""
    from .errors import ConfigError
    if out is None:
        return
    target = Path(out).expanduser().resolve()
    if any(Path(i).expanduser().resolve() == target for i in inputs):
        raise ConfigError(f"{key}={out} is also an input of this command: write to another file")
    if target.is_dir():
        raise ConfigError(f"{key}={out} is a folder: give a file name")
    if target.exists() and not overwrite:
        raise ConfigError(f"{key}={out} exists: give another file, or overwrite=true to replace it")


def os_error_message(e: OSError, key: str, path) -> str:
    """An OSError from writing under ``path`` (the value of setting ``key``) as a sentence that
    names the setting, the path, the cause and the fix."""
    import errno
    code = getattr(e, "errno", None)
    where = f"{key}={path}" if key else str(path)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "it is not writable (read-only folder or file system, or no permission): choose a writable place"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        fix = "the disk is full: free space there, or choose a place on another disk"
    elif code == errno.ENOTDIR:
        fix = "a part of that path is a file, not a folder: choose another path"
    elif code == errno.EISDIR:
        fix = "it is a folder where a file is written: give a file name"
    else:
        fix = "choose another place"
    return f"{where}: cannot write there ({e.strerror or e}); {fix}"

