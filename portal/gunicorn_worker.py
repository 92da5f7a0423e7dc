"""gunicorn's threaded worker, but no thread waits for a client that is slow to send a request.

gthread gives every connection to a thread of its pool as soon as it is accepted (or, when kept
alive, as soon as it is readable), and that thread then waits for the headers and for the body:
64 clients that send half a request (a sign-in POST whose body never comes) held all 2 x 32
threads and the sign-in page stopped answering. Here the worker's main loop, which waits on many
sockets at once without threads, collects each request first: its headers, and the whole body
when it is a small one (every request but a tus PATCH, whose chunks are streamed to disk by a
thread, uploads/request_body.py). A body larger than REQUEST_BODY_MAX_BYTES is refused (413), a
chunked one (411), and a client silent for REQUEST_IDLE_TIMEOUT_SECONDS is disconnected,
without ever taking a thread. gunicorn's own parser then reads the same bytes, so what a request
is (its length, its headers) is decided by gunicorn alone, as before.

A connection handed to a thread carries kernel timeouts (SO_RCVTIMEO, SO_SNDTIMEO) of the same
idle length, so a thread that does wait on the client (an upload's body, a response the client
does not read) is freed by then too.

And a connection that ends is closed without stopping the main loop. gthread closes it
"gracefully" there (RFC 9112 9.6: send FIN, then read until the client closes too, for up to
2 s, so that unread request bytes do not turn into a reset that loses the response): 100 stalled
clients cut off at once stopped the loop for 100 x 2 s, and with it every other connection of
the worker. Here that lingering is one more socket the loop waits on.
"""

import errno
import selectors
import socket
import time
from functools import partial

from gunicorn import http
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from uploads.request_body import set_receive_timeout, set_send_timeout

READ_SIZE = 64 * 1024
# More than this before the end of the headers is not a request gunicorn would take (its
# limit_request_line and limit_request_fields * limit_request_field_size are far below): handed
# to gunicorn, which answers it with its own error.
MAX_HEADER_BYTES = 256 * 1024
# How long a closed connection's last bytes are read and dropped (gunicorn's close_graceful).
LINGER_SECONDS = 2.0


class Connection(TConn):
    """gthread's connection, whose graceful close lingers in the worker's loop (see above)."""

    def __init__(self, worker: "PortalWorker", *args):
        super().__init__(*args)
        self.worker = worker

    def close(self, graceful=False):
        if graceful:
            self.worker.linger(self.sock)
        else:
            super().close()


class Pending:
    """What a connection has sent so far of its next request."""

    def __init__(self, idle_seconds: float):
        self.data = bytearray()
        self.idle_seconds = idle_seconds
        self.deadline = time.monotonic() + idle_seconds

    def add(self, data: bytes) -> None:
        self.data += data
        self.deadline = time.monotonic() + self.idle_seconds


class PortalWorker(ThreadWorker):
    """Threads get only requests that are complete, or tus PATCHes whose headers are in."""

    def init_process(self):
        self.pending: dict = {}  # Connection -> Pending
        self.lingering: dict = {}  # socket -> when to close it at the latest
        super().init_process()  # loads the application (and with it Django's settings), then runs

    def run(self):
        from django.conf import settings

        self.idle_seconds = settings.REQUEST_IDLE_TIMEOUT_SECONDS
        self.body_max_bytes = settings.REQUEST_BODY_MAX_BYTES
        super().run()

    def accept(self, listener):
        """gthread's accept(), making a Connection."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(Connection(self, self.cfg, client_sock, client_addr, listener.getsockname()))

    def enqueue_req(self, conn):
        """Every way gthread hands a connection to a thread passes here: collect first."""
        if getattr(conn, "collected", False) or not self._can_collect(conn):
            conn.collected = False
            self._set_timeouts(conn)
            super().enqueue_req(conn)
            return
        pending = Pending(self.idle_seconds)
        if conn.parser is not None:  # a kept-alive connection may hold the start already
            pending.add(conn.parser.unreader.take_buffered())
        conn.sock.setblocking(False)
        self.pending[conn] = pending
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        self._decide(conn, pending)

    def _can_collect(self, conn) -> bool:
        # TLS and HTTP/2 start with their own handshakes, done by gunicorn in the thread.
        return not self.cfg.is_ssl and not conn.is_http2 and not negotiation.prior_knowledge_allowed(
            self.cfg, conn.client)

    def _on_readable(self, conn, _sock):
        pending = self.pending.get(conn)
        if pending is None:
            return
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop(conn)
            return
        pending.add(data)
        self._decide(conn, pending)

    def _decide(self, conn, pending: Pending) -> None:
        """Hand the request over, refuse it, or keep waiting for more of it."""
        verdict = request_state(bytes(pending.data), self.body_max_bytes)
        if verdict == WAIT:
            return
        if verdict == READY:
            self._hand_over(conn, pending)
        else:
            self._refuse(conn, verdict)

    def _hand_over(self, conn, pending: Pending) -> None:
        self._forget(conn)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(pending.data))
        conn.data_ready = True
        conn.collected = True
        self.enqueue_req(conn)

    def _refuse(self, conn, status: bytes) -> None:
        text = REFUSALS[status]
        reply = (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Length: " + str(len(text)).encode() + b"\r\nConnection: close\r\n\r\n" + text)
        try:
            conn.sock.send(reply)  # a short reply: it fits the socket's buffer, or is lost
        except OSError:
            pass
        self._forget(conn)
        self.nr_conns -= 1
        conn.close(graceful=True)  # so that the client reads the reply, not a reset

    def _forget(self, conn) -> None:
        self.pending.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, conn) -> None:
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()

    def _set_timeouts(self, conn) -> None:
        try:
            set_receive_timeout(conn.sock, self.idle_seconds)
            set_send_timeout(conn.sock, self.idle_seconds)
        except OSError:
            pass  # the connection is gone; the thread finds out

    def linger(self, sock) -> None:
        """Close `sock` as gunicorn's close_graceful does, but waiting in the loop: FIN now, then
        drop what the client still sends until it closes too, or LINGER_SECONDS have passed."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self._on_lingering_readable)
        except (OSError, ValueError, KeyError):
            sock.close()
            return
        self.lingering[sock] = time.monotonic() + LINGER_SECONDS

    def _on_lingering_readable(self, sock):
        try:
            if sock.recv(READ_SIZE):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._end_linger(sock)

    def _end_linger(self, sock) -> None:
        self.lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        sock.close()

    def murder_pending(self):
        """Called every second by the main loop: also disconnect clients silent for too long,
        and end the lingering closes that took too long."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c, p in self.pending.items() if p.deadline <= now]:
            self._drop(conn)
        for sock in [s for s, deadline in self.lingering.items() if deadline <= now]:
            self._end_linger(sock)


WAIT, READY = "wait", "ready"
REFUSALS = {
    b"413 Content Too Large": b"This request's body is larger than the portal takes.\n",
    b"411 Length Required": b"Send this request with a Content-Length.\n",
}


def request_state(data: bytes, body_max_bytes: int):
    """WAIT for more, READY for a thread, or the status line to refuse the request with.

    Only for deciding when: anything this does not understand goes to gunicorn, which decides
    what the request is and answers malformed ones itself."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return READY if len(data) > MAX_HEADER_BYTES else WAIT
    request_line, *header_lines = data[:end].split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return READY
    method, target = parts[0], parts[1]
    if method == b"PATCH" and target.startswith(b"/tus/"):
        return READY  # an upload's chunk: streamed by the thread, under its idle timeout
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if b"transfer-encoding" in headers:
        return b"411 Length Required"
    lengths = headers.get(b"content-length", [b"0"])
    if len(lengths) != 1 or not lengths[0].isdigit():
        return READY  # gunicorn refuses it
    if len(lengths[0]) > 18 or int(lengths[0]) > body_max_bytes:
        return b"413 Content Too Large"
    length = int(lengths[0])
    return READY if len(data) - (end + 4) >= length else WAIT
