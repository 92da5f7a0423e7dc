"""Staging in a local folder (the storage "staging" is a FileSystemStorage).

Files get server-made names (never the user's file name) and are written in place at an offset,
one fixed-size buffer at a time, so that a chunk of any size never sits in memory.
"""

import errno
import fcntl
import hashlib
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from django.core.files.storage import storages

from uploads.staging.errors import StagedFileChanged, StagingBusy, StagingFull, TakenOver

BUFFER_SIZE = 1024 * 1024
# Buffers of a chunk whose bytes are hashed on the way in (write_at's `hashing`): 4 MiB per PATCH.
HASHED_BUFFERS = 4
# Hashing on the way in is abandoned when the received bytes waited for it more than this share
# of a PATCH's time, once HASH_WAIT_GRACE bytes are in (bench/README.md, issue 12).
HASH_WAIT_SHARE = 0.25
HASH_WAIT_GRACE = 32 * 1024 * 1024
# The file beside a staged file that names the request writing into it (see Writer).
WRITER_SUFFIX = ".writer"
# How long a write waits for another request's write into the same file to end.
TURN_WAIT_SECONDS = 10

# One write into staging at a time in a process. Writing into the page cache is kernel work that
# a thread does at gigabytes a second, far above any upload's network rate, so one writer keeps
# up with every upload; with twenty at once, twenty threads in the kernel took both cores and the
# status requests of the same process waited behind them (bench/load.py with PostgreSQL, status
# p95: 269 ms with twenty writers, 59 ms with one).
_ONE_WRITER = threading.Lock()


def storage():
    return storages["staging"]


def path(name: str) -> str:
    # The staging storage is a local folder (FileSystemStorage); path() is how it names a file.
    return storage().path(name)


def free_bytes() -> int:
    """Free space on the staging disk, as an unprivileged process may use it (statvfs)."""
    folder = storage().location
    os.makedirs(folder, exist_ok=True)
    return shutil.disk_usage(folder).free


def create(name: str, size: int) -> None:
    """Make an empty staged file (and the staging folder when it is missing)."""
    staged = path(name)
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    with open(staged, "xb"):
        pass


class Writer:
    """The one request writing into a staged file, fenced against a request that took over.

    The file beside the staged file (`<name>.writer`) holds a generation number: the writer
    that may write. Each writer holds a lock on the byte of its own generation for as long as it
    lives (an open-file-description lock: per request, not per process, and gone with its
    process), and the lock of byte 0 for a moment around each write and each record of
    progress, so that checking the generation and writing are one step. A new writer takes the
    next generation when the current one's byte is free (it ended, or its process died), or when
    nothing was written into the staged file for `idle_seconds` (its mtime; a writer touches it
    when it starts): the silent one, should it wake up, finds another generation and stops
    (TakenOver) before it writes a byte at its stale offset. Otherwise StagingBusy.
    """

    def __init__(self, name: str, idle_seconds: float):
        self.name = name
        self.idle_seconds = idle_seconds
        self.generation = 0
        self.file: BinaryIO | None = None
        self.writer_fd: int | None = None

    def __enter__(self) -> "Writer":
        # Unbuffered, so that a full disk shows up at write() and not later at close().
        self.file = open(path(self.name), "r+b", buffering=0)
        try:
            self.writer_fd = os.open(writer_path(self.name), os.O_RDWR | os.O_CREAT, 0o600)
            self._claim()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if not os.path.exists(path(self.name)):  # deleted meanwhile (cancelled): no leftovers
            _unlink(writer_path(self.name))
        self._close()  # frees this generation's byte: the next writer may start at once

    def _claim(self) -> None:
        with self._turn():
            current = self._current()
            if current and not _lock_byte(self.writer_fd, current):
                silent_for = time.time() - os.fstat(self.file.fileno()).st_mtime
                if silent_for < self.idle_seconds:
                    raise StagingBusy(self.name, self.idle_seconds - silent_for)
            elif current:
                _unlock_byte(self.writer_fd, current)  # it was free: only tested
            self.generation = current + 1
            _lock_byte(self.writer_fd, self.generation)
            os.ftruncate(self.writer_fd, 0)
            os.pwrite(self.writer_fd, str(self.generation).encode(), 0)
            os.utime(self.file.fileno())  # "written now": nobody takes over a writer just started

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Byte 0's lock: held around one write, never while waiting for the network."""
        deadline = time.monotonic() + TURN_WAIT_SECONDS
        while not _lock_byte(self.writer_fd, 0):
            if time.monotonic() > deadline:  # a write stuck in the disk: not ours to wait on
                raise StagingBusy(self.name)
            time.sleep(0.01)
        try:
            yield
        finally:
            _unlock_byte(self.writer_fd, 0)

    def _current(self) -> int:
        text = os.pread(self.writer_fd, 32, 0)
        return int(text) if text.isdigit() else 0

    def _check(self) -> None:
        if self._current() != self.generation:
            raise TakenOver(self.name)

    def _close(self) -> None:
        if self.writer_fd is not None:
            os.close(self.writer_fd)  # releases its locks
            self.writer_fd = None
        if self.file is not None:
            self.file.close()

    # What write_at() uses: a file's truncate/seek/write, each write checked against the token.
    def truncate(self, size: int) -> None:
        with self._turn():
            self._check()
            self.file.truncate(size)

    def seek(self, offset: int) -> None:
        self.file.seek(offset)

    def write(self, view: memoryview) -> int:
        with self._turn():
            self._check()
            return self.file.write(view)

    def seal(self) -> dict:
        """The staged file's seal (see seal()), taken after this writer's last write."""
        return seal(self.file.fileno())

    def record(self, update: Callable[[], bool]) -> bool:
        """Run `update` (a database write of the progress) only while still the writer."""
        with self._turn():
            self._check()
            return update()


def _lock_byte(fd: int, offset: int) -> bool:
    """An exclusive open-file-description lock on one byte; False when another holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, offset))
    except (BlockingIOError, PermissionError):  # EAGAIN, or EACCES on some systems
        return False
    return True


def _unlock_byte(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, offset))


def _flock(kind: int, offset: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padded to 32 bytes
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


def writer_path(name: str) -> str:
    return path(name) + WRITER_SUFFIX


def _unlink(file_path: str) -> None:
    try:
        os.unlink(file_path)
    except FileNotFoundError:
        pass


def locked_for_writing(name: str, idle_seconds: float = 60) -> Writer:
    """The staged file, opened for writing by this request alone (StagingBusy when another
    request is writing and has not been silent for `idle_seconds`); a context manager."""
    return Writer(name, idle_seconds)


def write_at(staged, offset: int, body, length: int, hasher=None,
             progress: Callable[[int], None] | None = None, hashing=None) -> int:
    """Copy up to `length` bytes from `body` (anything with `readinto()`, see request_body.py)
    into the staged file (a Writer, or a plain file) at `offset`, through reused buffers.

    Returns how many bytes were written; a client that goes away mid-chunk, or sends nothing
    for the idle timeout, leaves what arrived, and the caller records that as the new offset.
    Bytes past the offset from an earlier, interrupted write are cut off first, so the file
    always ends at the recorded offset. `hasher` (a hashlib object), when given, sees every
    byte written; `progress`, when given, is told the count written after each buffer.
    `hashing` (a started filebody.Hashing), when given, is handed each buffer once it is
    written, exactly the bytes written and nothing else; it hashes in threads of its own while
    the next buffers arrive (HASHED_BUFFERS take turns, so that a hashing thread that waits a
    moment for a core does not stop the receiving), and all of it is hashed on return. Hashing
    never slows the receiving for long: when the bytes wait for it more than HASH_WAIT_SHARE of
    the time (the cores are busy, the client is faster than the hashes), it is abandoned
    (`hashing.abandoned`: its sums are worth nothing, the push hashes instead).
    """
    written = 0
    staged.truncate(offset)
    staged.seek(offset)
    size = min(BUFFER_SIZE, max(length, 1))
    buffers = [memoryview(bytearray(size)) for _ in range(HASHED_BUFFERS if hashing is not None else 1)]
    tickets = [0] * len(buffers)
    turn = 0
    started, waited = time.monotonic(), 0.0
    try:
        while written < length:
            buffer = buffers[turn]
            if tickets[turn] and not hashing.done(tickets[turn]):
                began = time.monotonic()
                hashing.wait(tickets[turn])  # this buffer's bytes are hashed: it may be filled again
                waited += time.monotonic() - began
                if written >= HASH_WAIT_GRACE and waited > HASH_WAIT_SHARE * (time.monotonic() - started):
                    hashing.abandon()
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
                    # Give back the space of the buffer that did not fit; what came before it stays.
                    staged.truncate(offset + written)
                    raise StagingFull(staged.name, written) from None
                raise
            if hashing is not None and not hashing.abandoned:
                tickets[turn] = hashing.add(chunk)
                turn = (turn + 1) % len(buffers)
            written += count
            if progress is not None:
                progress(written)
    finally:
        if hashing is not None:
            hashing.wait()
    return written


def _write_all(staged, view: memoryview) -> None:
    while view:
        view = view[staged.write(view):]


def size(name: str) -> int | None:
    try:
        return os.path.getsize(path(name))
    except FileNotFoundError:
        return None


def version(name: str) -> list | None:
    return _current_version(name)


def _current_version(name: str) -> list | None:
    try:
        return _version_of(os.stat(path(name)))
    except FileNotFoundError:
        return None


def _version_of(stat: os.stat_result) -> list:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def exists(name: str) -> bool:
    return size(name) is not None


# How many bytes at each end of a sealed file are also sealed by digest (see seal()).
SEAL_SAMPLE = 1024 * 1024


def seal(fd: int) -> dict:
    """What proves later that a received file is still the one whose sums were computed as it
    arrived: its size, inode, device and modification time (every write or truncation sets the
    modification time, a replacement brings another inode; since Linux 6.13 a change right after
    a stat() gets a fine-grained time, so no write hides in the clock's tick), and the SHA-256 of
    its first and last SEAL_SAMPLE bytes. Not the change time: the check's hard link to the file
    (uploads/qemu.py `_alone`) changes it without touching a byte. Taken by the writer after its
    last write; `seal_holds()` and `tail_holds()` compare."""
    stat = os.fstat(fd)
    size = stat.st_size
    tail_size = min(SEAL_SAMPLE, size)
    return {
        **_stat_fields(stat),
        "head": hashlib.sha256(os.pread(fd, min(SEAL_SAMPLE, size), 0)).hexdigest(),
        "tail_size": tail_size,
        "tail": hashlib.sha256(os.pread(fd, tail_size, size - tail_size)).hexdigest(),
    }


def _stat_fields(stat: os.stat_result) -> dict:
    return {"size": stat.st_size, "ino": stat.st_ino, "dev": stat.st_dev, "mtime_ns": stat.st_mtime_ns}


def seal_holds(fd: int, sealed: dict) -> bool:
    """The open file is still the sealed one: same stat fields, same first and last bytes."""
    if not sealed or _stat_fields(os.fstat(fd)) != {key: sealed.get(key) for key in _STAT_KEYS}:
        return False
    head = os.pread(fd, min(SEAL_SAMPLE, sealed["size"]), 0)
    return hashlib.sha256(head).hexdigest() == sealed["head"] and tail_holds(
        fd, sealed, os.pread(fd, sealed["tail_size"], sealed["size"] - sealed["tail_size"]))


def tail_holds(fd: int, sealed: dict, tail: bytes) -> bool:
    """`tail`, just read from the open file, is its sealed tail, and the file is unchanged."""
    return (_stat_fields(os.fstat(fd)) == {key: sealed.get(key) for key in _STAT_KEYS}
            and hashlib.sha256(tail).hexdigest() == sealed["tail"])


_STAT_KEYS = ("size", "ino", "dev", "mtime_ns")


def open_for_reading(name: str, version: list | None = None) -> BinaryIO:
    """The file; with `version` (see version()), only while it is still that version."""
    staged = open(path(name), "rb")
    if version is not None and _version_of(os.fstat(staged.fileno())) != list(version):
        staged.close()
        raise StagedFileChanged(name)
    return staged


def image(name: str):
    """The staged file as diskimage's Image (a local file: qemu-img reads it directly), with
    the version it had when the check started."""
    from uploads.diskimage import FileImage  # diskimage does not need Django; loaded when used

    found = FileImage(path(name))
    found.version = version(name)
    if found.version is None:
        raise FileNotFoundError(name)
    return found


def delete(name: str) -> None:
    if name:
        storage().delete(name)
        _unlink(writer_path(name))


@contextmanager
def local_copy(name: str, version: list | None = None) -> Iterator[str]:
    """The staged file itself: it is already on a local disk."""
    found = _current_version(name)
    if found is None:
        raise FileNotFoundError(name)
    if version is not None and found != list(version):
        raise StagedFileChanged(name)
    yield path(name)


@contextmanager
def local_output(name: str) -> Iterator[str]:
    """Where a local program (qemu-img) writes a new staged file: in place."""
    yield path(name)


def abort_orphans(older_than) -> int:
    """Nothing to do: a local file that no upload names is never made."""
    return 0
