"""Where uploaded bytes wait between the browser and IMS: the storage named "staging".

Files get server-made names (never the user's file name) and are written in place at an offset,
one fixed-size buffer at a time, so that a chunk of any size never sits in memory.
"""

import errno
import fcntl
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from django.core.files.storage import storages

BUFFER_SIZE = 1024 * 1024

# One write into staging at a time in a process. Writing into the page cache is kernel work that
# a thread does at gigabytes a second, far above any upload's network rate, so one writer keeps
# up with every upload; with twenty at once, twenty threads in the kernel took both cores and the
# status requests of the same process waited behind them (bench/load.py with PostgreSQL, status
# p95: 269 ms with twenty writers, 59 ms with one).
_ONE_WRITER = threading.Lock()


class StagingBusy(Exception):
    """Another request is writing to the same staged file right now."""


class StagingFull(Exception):
    """The staging disk has no room left for the bytes being written."""


def storage():
    return storages["staging"]


def name_for(upload_uid, suffix: str = "img") -> str:
    return f"{upload_uid}.{suffix}"


def path(name: str) -> str:
    # The staging storage is a local folder (FileSystemStorage); path() is how it names a file.
    return storage().path(name)


def free_bytes() -> int:
    """Free space on the staging disk, as an unprivileged process may use it (statvfs)."""
    folder = storage().location
    os.makedirs(folder, exist_ok=True)
    return shutil.disk_usage(folder).free


def create(name: str) -> None:
    """Make an empty staged file (and the staging folder when it is missing)."""
    staged = path(name)
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    with open(staged, "xb"):
        pass


@contextmanager
def locked_for_writing(name: str) -> Iterator[BinaryIO]:
    """The staged file, opened for writing and locked against any other writer (StagingBusy)."""
    # Unbuffered, so that a full disk shows up at write() and not later at close().
    with open(path(name), "r+b", buffering=0) as staged:
        try:
            fcntl.flock(staged, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StagingBusy(name) from None
        yield staged


def write_at(staged: BinaryIO, offset: int, body, length: int, hasher=None) -> int:
    """Copy up to `length` bytes from `body` (anything with `readinto()`, see request_body.py)
    into the staged file at `offset`, through one reused buffer.

    Returns how many bytes were written; a client that goes away mid-chunk leaves what arrived,
    and the caller records that as the new offset. Bytes past the offset from an earlier,
    interrupted write are cut off first, so the file always ends at the recorded offset.
    `hasher` (a hashlib object), when given, sees every byte written.
    """
    written = 0
    staged.truncate(offset)
    staged.seek(offset)
    buffer = memoryview(bytearray(min(BUFFER_SIZE, max(length, 1))))
    while written < length:
        try:
            count = body.readinto(buffer[: min(len(buffer), length - written)])
        except OSError:  # the client went away mid-chunk
            break
        if not count:
            break
        chunk = buffer[:count]
        if hasher is not None:
            hasher.update(chunk)
        try:
            with _ONE_WRITER:
                _write_all(staged, chunk)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                staged.truncate(offset)  # give the space back: the chunk is sent again
                raise StagingFull(staged.name) from None
            raise
        written += count
    return written


def _write_all(staged, view: memoryview) -> None:
    while view:
        view = view[staged.write(view):]


def size(name: str) -> int | None:
    try:
        return os.path.getsize(path(name))
    except FileNotFoundError:
        return None


def exists(name: str) -> bool:
    return size(name) is not None


def open_for_reading(name: str) -> BinaryIO:
    return open(path(name), "rb")


def delete(name: str) -> None:
    if name:
        storage().delete(name)
