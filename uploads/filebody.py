"""The body of a file PUT: a fixed-size buffer at a time, hashed on the way in threads of its own.

No Django here; uploads/ims.py sends it. It never holds the whole file, and it computes the MD5
and SHA-512 of exactly the bytes sent in the same pass, so the file is read once.
"""

import hashlib
import queue
import threading
from collections.abc import Iterator


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
            if self.on_progress is not None and self.on_progress(self.sent) is False:
                self.aborted = True
                raise Aborted()


class Hashing:
    """MD5 and SHA-512 of the bytes sent, each computed in a thread of its own beside the sending one.

    Hashing costs more CPU than sending (bench/README.md has the figures): in the sending thread it
    would halve the speed. hashlib lets go of the GIL while it hashes, so the three threads run
    on whatever cores are free. At most QUEUED buffers wait for each hash, so memory stays
    bounded. Use it as a context manager: leaving it waits for the last buffer to be hashed.
    """

    QUEUED = 8

    def __init__(self):
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha512 = hashlib.sha512()
        self._queues = [queue.Queue(maxsize=self.QUEUED) for _ in range(2)]
        self._threads = [
            threading.Thread(target=self._run, args=(hasher, line), name=f"push-{hasher.name}", daemon=True)
            for hasher, line in zip((self.md5, self.sha512), self._queues)
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

    def add(self, chunk: bytes) -> None:
        for line in self._queues:
            line.put(chunk)

    @staticmethod
    def _run(hasher, line: queue.Queue) -> None:
        while (chunk := line.get()) is not None:
            hasher.update(chunk)


class Aborted(IOError):
    """Raised inside the body iterator to stop a PUT; requests turns it into a ConnectionError."""
