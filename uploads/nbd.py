"""A read-only NBD server of one image, on a unix socket, for qemu-img: how qemu-img checks a
staged object without a local copy of it.

No Django here. `export(read_at, size, folder)` serves `read_at(offset, length)` (for object
staging: ranged GETs of the object, pinned to the ETag that was checked) at a socket in a
private folder, for as long as the block runs; qemu-img opens it with
`file.driver=nbd,file.server.type=unix,file.server.path=<socket>` and reads only what its
format driver asks for (headers, tables), as it would from a file.

Why this and not the alternatives (bench/README.md has the figures):
- a full scratch copy costs a read and a write of the whole file before anything is sent, and
  as much local disk as the file;
- a sparse scratch file holding only the ranges the portal thinks qemu-img touches is unsafe:
  qemu-img would read zeros wherever the guess was wrong, and judge another file than the one
  sent;
- qemu-img's curl driver with a presigned URL puts a secret (the URL's signature) on qemu-img's
  command line, where /proc/<pid>/cmdline shows it to every local user, and needs
  qemu-block-extra;
- checking the whole file while it streams to IMS cannot run qemu-img (it needs random access),
  and would only refuse after IMS holds bytes.
Here no secret leaves the worker: qemu-img gets a socket path in a folder only this user may
enter (0700), the keys stay in boto3, and each read is served from the object version the
check pinned, so a changed object fails the check instead of being half-read.

The protocol subset (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
fixed newstyle handshake, NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_EXPORT_NAME, then simple replies
to NBD_CMD_READ and NBD_CMD_DISC; every other option is answered "unsupported" (qemu then does
without it) and every other command EPERM (the export is read-only).
"""

import contextlib
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_INVALID = 2**31 + 1, 2**31 + 3
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TRANSMISSION_FLAGS = 1 | 2  # NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY
CMD_READ, CMD_DISC = 0, 2
EPERM, EIO, EINVAL = 1, 5, 22

MAX_READ = 32 * 1024 * 1024  # what qemu asks for at most per request (and what we announce)
MAX_OPTION_DATA = 4096  # an option's data: an export name and a few info requests


class Export:
    """The server of one image; `error` is the first exception `read_at` raised (the caller
    re-raises it after qemu-img ran: a storage outage is not a damaged file)."""

    def __init__(self, read_at: Callable[[int, int], bytes], size: int, socket_path: str):
        self.read_at = read_at
        self.size = size
        self.socket_path = socket_path
        self.error: BaseException | None = None
        self.bytes_served = 0
        self.reads = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(socket_path)
        self._listener.listen(4)
        self._stopping = False
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="nbd-export", daemon=True)
        self._thread.start()

    def image_opts(self, driver: str) -> str:
        """qemu-img's --image-opts for this export, read as `driver` (a qemu format name)."""
        return f"driver={driver},file.driver=nbd,file.server.type=unix,file.server.path={self.socket_path}"

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="nbd-conn", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._thread.join(timeout=5)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._handshake(conn):
                self._transmission(conn)
        except (ConnectionError, EOFError, OSError):
            pass  # qemu-img went away (or stop() closed the socket)
        except Exception as exc:  # a bug of ours must not hang qemu-img: close, and say so
            log.exception("nbd: the export failed")
            self.error = self.error or exc
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    # -- handshake ----------------------------------------------------------------------------

    def _handshake(self, conn: socket.socket) -> bool:
        conn.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv(conn, 4))
        no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, option, length = struct.unpack(">QII", _recv(conn, 16))
            if magic != IHAVEOPT or length > MAX_OPTION_DATA:
                return False
            data = _recv(conn, length)
            if option == OPT_EXPORT_NAME:  # the old way in: no reply header, straight to transmission
                conn.sendall(struct.pack(">QH", self.size, TRANSMISSION_FLAGS) + (b"" if no_zeroes else bytes(124)))
                return True
            if option == OPT_ABORT:
                self._reply(conn, option, REP_ACK)
                return False
            if option in (OPT_GO, OPT_INFO):
                if len(data) < 6 or len(data) < 6 + struct.unpack_from(">I", data)[0]:
                    self._reply(conn, option, REP_ERR_INVALID)
                    continue
                self._reply(conn, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size, TRANSMISSION_FLAGS))
                self._reply(conn, option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_READ))
                self._reply(conn, option, REP_ACK)
                if option == OPT_GO:
                    return True
                continue
            self._reply(conn, option, REP_ERR_UNSUP)  # structured replies, meta contexts, TLS ...

    @staticmethod
    def _reply(conn: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, kind, len(data)) + data)

    # -- transmission -------------------------------------------------------------------------

    def _transmission(self, conn: socket.socket) -> None:
        while True:
            magic, _flags, command, handle, offset, length = struct.unpack(">IHHQQI", _recv(conn, 28))
            if magic != REQUEST_MAGIC:
                return
            if command == CMD_DISC:
                return
            if command != CMD_READ:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EPERM, handle))
                continue
            if length > MAX_READ or offset + length > self.size:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, handle))
                continue
            data = self._read(offset, length)
            if data is None:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EIO, handle))
                continue
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
            conn.sendall(data)

    def _read(self, offset: int, length: int) -> bytes | None:
        if self.error is not None:
            return None  # one failure is enough: qemu-img's answer no longer counts
        try:
            data = self.read_at(offset, length)
        except Exception as exc:  # the store away, the object changed: the caller re-raises it
            self.error = exc
            return None
        if len(data) != length:
            self.error = EOFError(f"the image ended at {offset + len(data)} of {self.size} bytes")
            return None
        self.reads += 1
        self.bytes_served += length
        return data


def _recv(conn: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise EOFError("the client closed the connection")
        data += chunk
    return bytes(data)


@contextlib.contextmanager
def export(read_at: Callable[[int, int], bytes], size: int, parent: str | None = None) -> Iterator[Export]:
    """Serve the image for the block's duration, at a socket in a fresh private folder (0700)
    under `parent`; the folder is removed afterwards."""
    folder = tempfile.mkdtemp(prefix=".nbd-", dir=parent)  # mkdtemp makes it 0700
    server = Export(read_at, size, os.path.join(folder, "sock"))
    try:
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            os.unlink(server.socket_path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)
