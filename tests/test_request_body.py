"""The tus PATCH body read straight from gunicorn's socket (uploads/request_body.py).

gunicorn's own request objects (SocketUnreader, LengthReader, Body) around one end of a real
socket pair stand for the connection of a request whose headers gunicorn has parsed; the test
writes what the browser sends into the other end.
"""

import io
import socket
import threading

import pytest
from django.test import RequestFactory
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader

from uploads import request_body, staging

MiB = 1024 * 1024


@pytest.fixture
def connection():
    server, browser = socket.socketpair()
    server.setblocking(True)
    yield server, browser
    server.close()
    browser.close()


def gunicorn_request(server: socket.socket, length: int, read_ahead: bytes = b""):
    """A Django request as gunicorn hands it over: `read_ahead` is what gunicorn's parser
    received beyond the headers, already in its buffer."""
    unreader = SocketUnreader(server)
    unreader.unread(read_ahead)
    body = Body(LengthReader(unreader, length))
    request = RequestFactory().generic("PATCH", "/tus/x", content_type="application/offset+octet-stream")
    request.META.update({"gunicorn.socket": server, "wsgi.input": body, "CONTENT_LENGTH": str(length)})
    return request, body


def send_in_background(browser: socket.socket, data: bytes, *, then_close: bool = False) -> threading.Thread:
    """The browser sends while the server reads: a socket pair holds far less than a chunk."""
    def send():
        browser.sendall(data)
        if then_close:
            browser.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def store(request, length: int, tmp_path) -> bytes:
    """What staging.write_at makes of the body (as upload_receive calls it)."""
    target = tmp_path / "staged.img"
    target.write_bytes(b"")
    with open(target, "r+b", buffering=0) as staged:
        written = staging.write_at(staged, 0, request_body.body_of(request, length), length)
    data = target.read_bytes()
    assert written == len(data)
    return data


def test_it_reads_gunicorns_buffered_bytes_then_the_socket(connection, tmp_path):
    server, browser = connection
    payload = bytes(range(256)) * (3 * MiB // 256) + b"tail"
    request, body = gunicorn_request(server, len(payload), read_ahead=payload[:5000])
    send_in_background(browser, payload[5000:])

    assert isinstance(request_body.body_of(request, len(payload)), request_body.SocketBody)
    assert store(request, len(payload), tmp_path) == payload
    assert body.reader.length == 0  # gunicorn knows the body is consumed
    assert not body.failed


def test_it_leaves_the_next_request_on_the_connection_to_gunicorn(connection, tmp_path):
    server, browser = connection
    payload = b"x" * 1000
    following = b"HEAD /tus/x HTTP/1.1\r\nHost: portal\r\n\r\n"
    request, body = gunicorn_request(server, len(payload), read_ahead=payload + following)

    assert store(request, len(payload), tmp_path) == payload
    assert body.reader.unreader.read() == following
    assert not body.failed


def test_a_browser_that_goes_away_mid_body_leaves_what_arrived_and_the_connection_is_closed(connection, tmp_path):
    server, browser = connection
    request, body = gunicorn_request(server, 4 * MiB)
    send_in_background(browser, b"y" * (MiB + 123), then_close=True)

    assert store(request, 4 * MiB, tmp_path) == b"y" * (MiB + 123)
    assert body.failed  # gunicorn must not read a next request from where this one broke off


def test_a_body_gunicorn_has_begun_to_read_is_read_through_gunicorn(connection, tmp_path):
    server, browser = connection
    request, body = gunicorn_request(server, 10, read_ahead=b"0123456789")
    assert body.read(3) == b"012"

    assert isinstance(request_body.body_of(request, 10), request_body.RequestBody)


def test_other_servers_get_the_portable_path(tmp_path):
    payload = b"z" * (2 * MiB + 5)
    request = RequestFactory().generic("PATCH", "/tus/x", data=payload,
                                       content_type="application/offset+octet-stream")

    assert isinstance(request_body.body_of(request, len(payload)), request_body.RequestBody)
    assert store(request, len(payload), tmp_path) == payload


class StalledBrowser:
    """A body whose first bytes arrive, then nothing until `go` is set (a stalled connection)."""

    def __init__(self):
        self.go = threading.Event()
        self.stalled = threading.Event()
        self.sent_first = False

    def readinto(self, buffer: memoryview) -> int:
        if self.sent_first:
            self.stalled.set()
            self.go.wait()
            return 0  # then it goes away
        self.sent_first = True
        buffer[:3] = b"abc"
        return 3


def test_a_stalled_upload_does_not_hold_up_the_writes_of_another(tmp_path):
    """Staging writes take turns (staging._ONE_WRITER), but waiting for the network is not a turn."""
    stalled = StalledBrowser()
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(b"")
    second.write_bytes(b"")

    def write(target, body, length):
        with open(target, "r+b", buffering=0) as staged:
            return staging.write_at(staged, 0, body, length)

    waiting = threading.Thread(target=write, args=(first, stalled, MiB), daemon=True)
    waiting.start()
    try:
        assert stalled.stalled.wait(timeout=10)
        other = threading.Thread(target=write, args=(second, io.BytesIO(b"x" * (3 * MiB)), 3 * MiB), daemon=True)
        other.start()
        other.join(timeout=10)
        assert not other.is_alive(), "the second upload waited for the stalled one"
        assert second.read_bytes() == b"x" * (3 * MiB)
    finally:
        stalled.go.set()
        waiting.join(timeout=10)
    assert first.read_bytes() == b"abc"
