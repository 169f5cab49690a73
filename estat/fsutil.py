"""
Durable file writes, shared by the directory store and the dead-letter
queue.  Every function here blocks on disk and must run in a worker thread.
"""

from __future__ import annotations

import os

__all__ = ["TEMP_PREFIX", "atomic_write", "fsync_directory", "process_running"]

#: Files whose names start with this are unfinished writes.
TEMP_PREFIX = ".tmp-"


def process_running(pid: int) -> bool:
    """
    Whether process C{pid} exists (the writer of a temporary file, the
    owner of a directory), without blocking.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """
    Write C{data} to C{path} so that a reader (or a crash) sees either the
    whole file or no file: a temporary file in the same directory, fsync,
    rename, fsync of the directory.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_directory(directory)
