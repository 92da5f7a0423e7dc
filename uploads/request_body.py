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
"""

import socket
import ssl

from django.http import HttpRequest
from gunicorn.http.body import Body, LengthReader


class RequestBody:
    """The portable path: Django's request stream, copied into the caller's buffer."""

    def __init__(self, request: HttpRequest):
        self.request = request

    def readinto(self, buffer: memoryview) -> int:
        data = self.request.read(len(buffer))
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
                # MSG_WAITALL: one system call (GIL released) for the whole buffer, unless the
                # client stops sending or goes away.
                count = self.sock.recv_into(buffer, wanted, socket.MSG_WAITALL)
            except OSError:
                self.body.failed = True  # the connection's position is unknown: gunicorn closes it
                raise
            if count == 0:
                self.body.failed = True
        self.reader.length -= count
        return count


def body_of(request: HttpRequest, length: int) -> RequestBody | SocketBody:
    """A reader for the `length` bytes of this request's body."""
    sock = request.META.get("gunicorn.socket")
    body = request.META.get("wsgi.input")
    if _is_plain_socket(sock) and _is_unread_gunicorn_body(body, length):
        return SocketBody(sock, body)
    return RequestBody(request)


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
