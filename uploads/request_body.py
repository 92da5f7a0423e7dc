"""The body of a tus PATCH as a reader with `readinto()`: straight from the socket under gunicorn.

Why not just `request.read()`: gunicorn's `wsgi.input` copies every byte several times in Python
(its read-ahead buffers), holding the GIL for each copy; with 20 uploads streaming into one web
process, the status requests of that process waited for the GIL behind those copies
(bench/README.md, load.py). Here one `recv_into()` fills a reused buffer of up to 1 MiB with the
GIL released while it waits, and the caller writes the buffer out the same way: no Python-level
copy at all (web CPU per GiB uploaded: 0.83 s before, 0.5-0.7 s with this).

The socket is used only when gunicorn's request objects are exactly what this code expects
(a body of known length that nobody has read yet, a plain TCP socket); otherwise, and under any
other server (the Django test client, runserver), the portable path reads `request.read()`.
Both keep gunicorn's own count of the unread body right at every step, so a connection goes on
to its next request where the body ends, or is closed when a read failed.

Both give up on a client that sends nothing for REQUEST_IDLE_TIMEOUT_SECONDS (BodyTimeout, an
OSError like any lost connection: the caller keeps what arrived). The socket gets a kernel receive
timeout (SO_RCVTIMEO) rather than a Python one: a Python timeout makes the socket non-blocking,
and MSG_WAITALL would then return after every packet. With SO_RCVTIMEO, one recv_into() still
fills the whole buffer from a fast client, returns what arrived when the timeout runs out with
some bytes in, and fails (EAGAIN) when none came at all.
"""

import socket
import ssl
import struct
import time

from django.conf import settings
from django.http import HttpRequest
from gunicorn.http.body import Body, LengthReader

# How long one recv_into() of the socket path may wait: the longest gap between two writes into
# staging (and so between two looks at the upload's progress) while a client keeps sending.
RECV_SLICE_SECONDS = 1.0


class BodyTimeout(TimeoutError):
    """The client sent nothing for REQUEST_IDLE_TIMEOUT_SECONDS."""


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """A kernel receive timeout on a blocking socket: recv() fails with EAGAIN after `seconds`."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))


def close_if_unread(request: HttpRequest) -> None:
    """When the view answers without reading the whole body (refused, or the client went
    silent), gunicorn is to close the connection at once rather than wait to drain the rest."""
    body = request.META.get("wsgi.input")
    if isinstance(body, Body) and not (isinstance(body.reader, LengthReader) and body.reader.length == 0):
        body.failed = True


class RequestBody:
    """The portable path: Django's request stream, copied into the caller's buffer."""

    def __init__(self, request: HttpRequest):
        self.request = request
        sock = request.META.get("gunicorn.socket")
        if isinstance(sock, socket.socket):
            # gunicorn's reads wait in recv() for as long as the client is silent: not longer
            # than the idle timeout (then recv() fails and the read raises an OSError).
            set_receive_timeout(sock, settings.REQUEST_IDLE_TIMEOUT_SECONDS)

    def readinto(self, buffer: memoryview) -> int:
        try:
            data = self.request.read(len(buffer))
        except OSError as exc:
            if _is_timeout(exc):
                raise BodyTimeout("the client sent nothing for too long") from exc
            raise
        buffer[: len(data)] = data
        return len(data)


class SocketBody:
    """The rest of a gunicorn request body, read from the client's socket.

    `body` is gunicorn's `wsgi.input` (`gunicorn.http.body.Body` around a `LengthReader`): what
    its read-ahead already holds is handed out first, then the socket is read directly, and the
    reader's remaining length goes down by what was taken.
    """

    def __init__(self, sock: socket.socket, body):
        self.sock = sock
        self.body = body
        self.reader = body.reader
        self.held: memoryview | None = None  # taken from gunicorn at the first read
        self.idle_seconds = settings.REQUEST_IDLE_TIMEOUT_SECONDS
        self.last_bytes_at = time.monotonic()
        set_receive_timeout(sock, min(RECV_SLICE_SECONDS, self.idle_seconds))

    def _take_held(self) -> memoryview:
        held = self.reader.unreader.take_buffered()
        if len(held) > self.reader.length:  # the client already sent its next request
            self.reader.unreader.unread(held[self.reader.length:])
            held = held[: self.reader.length]
        return memoryview(held)

    def readinto(self, buffer: memoryview) -> int:
        wanted = min(len(buffer), self.reader.length)
        if wanted <= 0:
            return 0
        if self.held is None:
            self.held = self._take_held()
        if self.held:
            count = min(wanted, len(self.held))
            buffer[:count] = self.held[:count]
            self.held = self.held[count:]
        else:
            try:
                count = self._receive(buffer, wanted)
            except OSError:
                self.body.failed = True  # the connection's position is unknown: gunicorn closes it
                raise
            if count == 0:
                self.body.failed = True
        self.reader.length -= count
        if self.reader.length == 0:  # whatever reads this connection next waits the idle timeout
            set_receive_timeout(self.sock, self.idle_seconds)
        return count

    def _receive(self, buffer: memoryview, wanted: int) -> int:
        """MSG_WAITALL: one system call (GIL released) for the whole buffer, unless the client
        is slower than that (then what came within RECV_SLICE_SECONDS), or goes away, or sends
        nothing for the idle timeout (BodyTimeout)."""
        while True:
            try:
                count = self.sock.recv_into(buffer, wanted, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO ran out with no byte received
                if time.monotonic() - self.last_bytes_at >= self.idle_seconds:
                    raise BodyTimeout("the client sent nothing for too long") from None
                continue
            self.last_bytes_at = time.monotonic()
            return count


def body_of(request: HttpRequest, length: int) -> RequestBody | SocketBody:
    """A reader for the `length` bytes of this request's body."""
    sock = request.META.get("gunicorn.socket")
    body = request.META.get("wsgi.input")
    if _is_plain_socket(sock) and _is_unread_gunicorn_body(body, length):
        return SocketBody(sock, body)
    return RequestBody(request)


def _is_timeout(exc: OSError) -> bool:
    """A read that failed because SO_RCVTIMEO ran out (Django wraps it in UnreadablePostError)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return isinstance(cause, (BlockingIOError, TimeoutError, ssl.SSLWantReadError))


def _is_plain_socket(sock) -> bool:
    # TLS sockets take no recv flags; gunicorn terminating TLS itself gets the portable path.
    return isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket) and sock.gettimeout() is None


def _is_unread_gunicorn_body(body, length: int) -> bool:
    return (
        isinstance(body, Body)
        and isinstance(body.reader, LengthReader)
        and body.reader.length == length
        and body.buf.tell() == 0
    )
