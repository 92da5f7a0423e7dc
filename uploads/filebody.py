"""The body of a file PUT, and the MD5 + SHA-512 pair computed beside the bytes as they pass.

No Django here; uploads/ims.py sends the bodies. Two kinds of body:

- `FileBody`: reads a fixed-size buffer at a time and hashes exactly the bytes sent in the same
  pass (`Hashing`), so the file is read once. Used whenever the sums are not known yet.
- `SealedBody`: a file whose MD5 and SHA-512 were computed while it arrived (the tus PATCHes,
  uploads/running_sums.py) and which was sealed then (uploads/staging/local.py `seal`). Nothing
  is hashed while sending: on plain HTTP the kernel sends it (`sendfile`, uploads/httpput.py),
  elsewhere it is read without a hash. Its last `Sealed.tail_size` bytes are held back, read,
  and shown to `Sealed.confirm` before they go: the PUT ends only if the file is still the one
  that was hashed (and checked) since it arrived; otherwise the body stops short and IMS never
  gets a whole file.
"""

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


BUFFER_FLOOR = 1024 * 1024  # the smallest slice sendfile() is given (but the file's last one)


class FileBody:
    """A request body that reads a fixed-size buffer at a time and never holds the whole file.

    `__len__` lets requests send a Content-Length; iterating yields the buffers.
    """

    def __init__(self, fileobj, size, buffer_size, on_progress):
        self.fileobj = fileobj
        self.size = size
        self.buffer_size = buffer_size
        self.on_progress = on_progress
        self.sent = 0
        self.aborted = False
        self.hashing = Hashing()

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.size:
            chunk = self.fileobj.read(min(self.buffer_size, self.size - self.sent))
            if not chunk:
                return
            self.hashing.add(chunk)
            self.sent += len(chunk)
            yield chunk
            self.progressed()

    def progressed(self) -> None:
        if self.on_progress is not None and self.on_progress(self.sent) is False:
            self.aborted = True
            raise Aborted()


@dataclass
class Sealed:
    """What the sender needs of a file sealed when it arrived (see the module's docstring).

    md5, sha512: hex digests of the whole file, computed as it arrived;
    tail_size: how many bytes at the end were sealed by digest (at most the file's size);
    confirm(tail): called with the last `tail_size` bytes, read just before they are sent; it
    raises (e.g. diskimage.FileChanged) when the file is no longer the sealed one.
    """

    md5: str
    sha512: str
    tail_size: int
    confirm: Callable[[bytes], None]


class SealedBody(FileBody):
    """A sealed file's body: nothing hashed on the way, the tail confirmed before it goes.

    Iterating (requests, TLS) yields buffers read from the file; `send_to(sock)` (plain HTTP)
    lets the kernel copy the file into the socket, a slice per sendfile() call, with
    `on_progress` between the slices. Either way the first `size - tail_size` bytes go first,
    then the tail, read once and confirmed.
    """

    # A slice takes about SLICE_SECONDS at the rate so far (so progress and a cancel are seen as
    # often as with requests' buffers), and SLICE_SIZE at the most: a few dozen calls per GiB.
    SLICE_SIZE = 64 * 1024 * 1024
    FIRST_SLICE = 1024 * 1024
    SLICE_SECONDS = 0.5

    def __init__(self, fileobj, size, buffer_size, on_progress, sealed: Sealed):
        super().__init__(fileobj, size, buffer_size, on_progress)
        self.sealed = sealed
        self.hashing = None
        self.head_size = size - min(sealed.tail_size, size)

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.head_size:
            chunk = os.pread(self.fileobj.fileno(), min(self.buffer_size, self.head_size - self.sent), self.sent)
            if not chunk:
                return  # shorter than sealed: upload_file says so, and the body stops short
            self.sent += len(chunk)
            yield chunk
            self.progressed()
        tail = self.confirmed_tail()
        if tail:
            self.sent += len(tail)
            yield tail
            self.progressed()

    def confirmed_tail(self) -> bytes:
        tail = os.pread(self.fileobj.fileno(), self.size - self.head_size, self.head_size)
        self.sealed.confirm(tail)
        return tail

    def send_to(self, sock) -> None:
        """Send the body into a connected, blocking socket (plain TCP): sendfile() for all but
        the tail, then the confirmed tail with one send."""
        file_fd, sock_fd = self.fileobj.fileno(), sock.fileno()
        started = time.monotonic()
        slice_size = min(self.FIRST_SLICE, self.SLICE_SIZE)
        while self.sent < self.head_size:
            slice_end = min(self.sent + slice_size, self.head_size)
            while self.sent < slice_end:  # one call moves the whole slice unless interrupted
                done = os.sendfile(sock_fd, file_fd, self.sent, slice_end - self.sent)
                if not done:  # the file ended early: upload_file says so; the body stops short
                    return
                self.sent += done
            self.progressed()
            rate = self.sent / max(time.monotonic() - started, 1e-3)
            slice_size = min(self.SLICE_SIZE, max(BUFFER_FLOOR, int(rate * self.SLICE_SECONDS)))
        tail = self.confirmed_tail()
        sock.sendall(tail)
        self.sent += len(tail)
        self.progressed()


class Hashing:
    """MD5 and SHA-512 of the bytes added, each computed in a thread of its own beside the caller.

    Hashing costs more CPU than sending or receiving (bench/README.md has the figures): in the
    caller's thread it would halve the speed. hashlib (and running_sums' OpenSSL contexts) let
    go of the GIL while they hash, so the three threads run on whatever cores are free. At most
    QUEUED buffers wait for each hash, so memory stays bounded. Use it as a context manager:
    leaving it waits for the last buffer.

    `add()` takes bytes the caller will not change and returns a ticket; a caller that reuses
    its buffers calls `wait(ticket)` (that buffer, and every one before it, is hashed) before it
    writes into a buffer it added. `md5`, `sha512`: objects with update() to continue (the sums
    of what came before), or new hashlib ones.
    """

    QUEUED = 8

    def __init__(self, md5=None, sha512=None):
        self.md5 = md5 if md5 is not None else hashlib.md5(usedforsecurity=False)
        self.sha512 = sha512 if sha512 is not None else hashlib.sha512()
        self.abandoned = False
        self._queues = [queue.Queue(maxsize=self.QUEUED) for _ in range(2)]
        self._added = 0
        self._hashed = [0, 0]
        self._progress = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, args=(index, hasher, line), name=f"hash-{hasher.name}",
                             daemon=True)
            for index, (hasher, line) in enumerate(zip((self.md5, self.sha512), self._queues))
        ]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        for line in self._queues:
            line.put(None)
        for thread in self._threads:
            thread.join()

    def add(self, chunk) -> int:
        for line in self._queues:
            line.put(chunk)
        self._added += 1
        return self._added

    def wait(self, ticket: int | None = None) -> None:
        """Until the buffer of `ticket` (by default: the last one added) is hashed by both."""
        upto = self._added if ticket is None else ticket
        with self._progress:
            self._progress.wait_for(lambda: min(self._hashed) >= upto)

    def done(self, ticket: int) -> bool:
        return min(self._hashed) >= ticket

    def abandon(self) -> None:
        """Stop hashing: what is queued is skipped, the sums are worth nothing from now on."""
        self.abandoned = True
        self.wait()

    def _run(self, index: int, hasher, line: queue.Queue) -> None:
        while (chunk := line.get()) is not None:
            if not self.abandoned:
                hasher.update(chunk)
            with self._progress:
                self._hashed[index] += 1
                self._progress.notify_all()


class Aborted(IOError):
    """Raised inside the body to stop a PUT; requests turns it into a ConnectionError."""
