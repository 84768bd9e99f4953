"""One writer per run folder: ``<save_dir>/run.lock``.

The lock is an ``flock`` on ``run.lock``, held for as long as the training process writes into
the folder; the kernel drops it when the process dies, however it dies, so a lock can never be
left held by a dead run. The file's text says who holds it (pid, host, start time, command) so
that a refused run can name the owner. A file still naming an owner when the lock is free was
left by a run that was killed; it is taken over with a message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ..common.errors import RunLockedError


LOCK_FILE = "run.lock"


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started_unix": time.time(),
            "command": " ".join(sys.argv)}


def _describe(owner: dict) -> str:
    started = owner.get("started_unix")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {when}: {owner.get('command', '?')})"


def _read_owner(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return {"pid": "?", "host": "?", "command": f"unreadable lock text {text[:60]!r}"}
    return owner if isinstance(owner, dict) else None


class RunLock:
    """``with RunLock(save_dir):`` — or ``acquire()`` / ``release()`` — around every write into a
    run folder. A second holder, in this process or another, gets :class:`RunLockedError`."""

    def __init__(self, save_dir):
        self.path = Path(save_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd) or {}
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another training run: {_describe(owner)}. "
                "Wait for it to finish (or stop it), or write this run into another logging.save_dir."
            ) from None
        stale = _read_owner(fd)
        if stale is not None and stale.get("pid") != os.getpid():
            print(f"{self.path}: taking over the lock of a run that is no longer running: {_describe(stale)}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_owner()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clears the owner text (a free, clean lock) and drops the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()
