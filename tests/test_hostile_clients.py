"""Clients that send bad headers, stall their bodies, or hold connections open (issue 14, 3/5/7/12).

The unit tests drive uploads/tus.py, uploads/request_body.py and uploads/staging/ directly;
the last test runs the real gunicorn (gunicorn.conf.py, portal/gunicorn_worker.py) against 200
stalled connections.
"""

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings as django_settings
from django.core.handlers.wsgi import WSGIRequest
from django.db import connection as db_connection
from gunicorn.http.body import Body as GunicornBody
from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader

from tests.conftest import _database_url, _wait_for_worker_sessions_to_end, tus_headers, wait_for
from tests.fault_stack import PYTHON, Process, free_port, http_ok
from tests.test_request_body import gunicorn_request, send_in_background
from tests.test_tus import OCTETS, TUS, create, metadata
from uploads import request_body, services, staging
from uploads.models import Status, Upload

BAD_NUMBERS = ["²", "١٢", "٥", "+5", " 5", "5 ", "-1", "0x10", "1e3", "5.0", "9" * 30, "1" * 5000, ""]


def short(value: str) -> str:
    return repr(value if len(value) < 20 else value[:8] + "…")


@pytest.fixture
def tus_client(alice_with_token, client):
    client.force_login(alice_with_token)
    return client


# ---------------------------------------------------------------------------------------------
# 5. Every number in a header: ASCII digits only, a clear 400, never a 500


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=short)
def test_a_bad_upload_length_is_a_clear_400(tus_client, value):
    response = tus_client.post("/tus/", headers={**TUS, "Upload-Length": value,
                                                  "Upload-Metadata": metadata(filename="disk.raw")})
    assert response.status_code == 400, response.content
    assert "Upload-Length" in response.content.decode()
    assert not Upload.objects.exists()


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=short)
def test_a_bad_upload_offset_is_a_clear_400(tus_client, staging_dir, value):
    url = create(tus_client, length=10)["Location"]
    response = tus_client.generic("PATCH", url, b"hello", content_type=OCTETS, headers={**TUS, "Upload-Offset": value})
    assert response.status_code == 400, response.content
    assert "Upload-Offset" in response.content.decode()
    upload = Upload.objects.get()
    assert upload.received_bytes == 0 and (staging_dir / upload.staged_name).read_bytes() == b""


@pytest.mark.parametrize("value", ["²", "-1", "0x10", "1" * 5000], ids=short)
def test_a_bad_content_length_is_a_clear_400(tus_client, value):
    url = create(tus_client, length=10)["Location"]
    response = tus_client.generic("PATCH", url, b"hello", content_type=OCTETS,
                                  headers={**TUS, "Upload-Offset": "0"}, CONTENT_LENGTH=value)
    assert response.status_code == 400, response.content
    assert "Content-Length" in response.content.decode()
    assert Upload.objects.get().received_bytes == 0


@pytest.mark.parametrize("header", ["sha1 ²²²²", "sha1 AAAA", "md5 " + "é" * 24, "sha256"])
def test_a_bad_upload_checksum_is_a_clear_400(tus_client, header):
    url = create(tus_client, length=10)["Location"]
    response = tus_client.generic("PATCH", url, b"hello", content_type=OCTETS,
                                  headers={**TUS, "Upload-Offset": "0", "Upload-Checksum": header})
    assert response.status_code == 400, response.content
    assert "Upload-Checksum" in response.content.decode()


@pytest.mark.parametrize("header", ["filename ²²²²", "filename ZGlzay5yYXc=,image_name é", "filename !!"])
def test_bad_upload_metadata_is_a_clear_400(tus_client, header):
    response = tus_client.post("/tus/", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": header})
    assert response.status_code == 400, response.content
    assert "Upload-Metadata" in response.content.decode()
    assert not Upload.objects.exists()


# ---------------------------------------------------------------------------------------------
# 7 and 12. The row moves during a PATCH, forward only, and never once the upload stopped


class Body:
    """A PATCH body in pieces; `between(n)` runs before piece n is handed over (n from 1)."""

    def __init__(self, pieces: list[bytes], between=None):
        self.pieces = list(pieces)
        self.handed = 0
        self.between = between

    def readinto(self, buffer: memoryview) -> int:
        if not self.pieces:
            return 0
        if self.between and self.handed:
            self.between(self.handed)
        piece = self.pieces.pop(0)
        buffer[: len(piece)] = piece
        self.handed += 1
        return len(piece)


def new_upload(owner, size: int) -> Upload:
    return services.upload_create(owner=owner, size=size, filename="disk.raw", name="disk", disk_format="raw")


def test_the_bytes_received_move_during_a_patch(alice, monkeypatch):
    monkeypatch.setattr(services.receive, "RECEIVE_PROGRESS_SECONDS", 0)
    upload = new_upload(alice, 300)
    seen = []
    body = Body([b"a" * 100, b"b" * 100, b"c" * 100],
                between=lambda n: seen.append(Upload.objects.get(pk=upload.pk).received_bytes))

    assert services.upload_receive(upload=upload, offset=0, stream=body, length=300) == 300
    assert seen == [100, 200]  # what the row said while the chunk was still arriving
    assert Upload.objects.get(pk=upload.pk).status == Status.RECEIVED


def test_the_progress_is_throttled(alice):
    upload = new_upload(alice, 300)
    seen = []
    body = Body([b"a" * 100, b"b" * 100, b"c" * 100],
                between=lambda n: seen.append(Upload.objects.get(pk=upload.pk).received_bytes))

    services.upload_receive(upload=upload, offset=0, stream=body, length=300)
    assert seen == [0, 0]  # within RECEIVE_PROGRESS_SECONDS: written once, at the end


def test_a_cancel_during_a_patch_is_not_undone_when_the_patch_ends(alice, monkeypatch, staging_dir):
    monkeypatch.setattr(services.receive, "RECEIVE_PROGRESS_SECONDS", 3600)  # only the end of the chunk writes
    upload = new_upload(alice, 300)

    def cancel(n):  # DELETE /tus/<id> arrives while the body is still coming
        other = Upload.objects.get(pk=upload.pk)
        services.upload_cancel(upload=other, by="alice")
        services.upload_discard(upload_id=upload.pk)

    body = Body([b"a" * 100, b"b" * 100], between=cancel)
    with pytest.raises(services.UploadStopped):
        services.upload_receive(upload=upload, offset=0, stream=body, length=200)
    row = Upload.objects.get(pk=upload.pk)
    assert (row.status, row.received_bytes) == (Status.CANCELLED, 0)
    assert list(staging_dir.iterdir()) == []  # nor is the staged file, or its writer file, made again


def test_a_cancel_during_a_patch_stops_its_progress(alice, monkeypatch, staging_dir):
    monkeypatch.setattr(services.receive, "RECEIVE_PROGRESS_SECONDS", 0)
    upload = new_upload(alice, 400)
    body = Body([b"a" * 100] * 4, between=lambda n: n == 1 and Upload.objects.filter(pk=upload.pk).update(
        status=Status.CANCELLED))

    with pytest.raises(services.UploadStopped):
        services.upload_receive(upload=upload, offset=0, stream=body, length=400)
    assert Upload.objects.get(pk=upload.pk).received_bytes == 100
    assert body.pieces  # it stopped reading instead of taking the rest


def test_a_cancel_during_a_patch_is_a_409_over_http(tus_client, monkeypatch):
    url = create(tus_client, length=10)["Location"]
    real = services.upload_receive

    def cancelled_meanwhile(**kwargs):
        Upload.objects.update(status=Status.CANCELLED)
        return real(**kwargs)

    monkeypatch.setattr(services, "upload_receive", cancelled_meanwhile)
    response = tus_client.generic("PATCH", url, b"hello", content_type=OCTETS, headers={**TUS, "Upload-Offset": "0"})
    assert response.status_code == 409
    assert "cancelled" in response.content.decode()
    assert Upload.objects.get().received_bytes == 0


# ---------------------------------------------------------------------------------------------
# 3. Every body read has an idle timeout; a silent writer is taken over


@pytest.fixture
def connection():
    server, browser = socket.socketpair()
    yield server, browser
    server.close()
    browser.close()


def store_in_thread(request, length: int, tmp_path, timeout: float) -> bytes:
    """staging.write_at as upload_receive calls it, failing (not hanging) after `timeout`."""
    target = tmp_path / "staged.img"
    target.write_bytes(b"")
    done = threading.Event()

    def store():
        with open(target, "r+b", buffering=0) as staged:
            staging.write_at(staged, 0, request_body.body_of(request, length), length)
        done.set()

    threading.Thread(target=store, daemon=True).start()
    assert done.wait(timeout), f"the body read was still waiting after {timeout}s"
    return target.read_bytes()


def test_a_silent_client_is_cut_off_on_the_socket_path_and_what_arrived_is_kept(connection, tmp_path, settings):
    settings.REQUEST_IDLE_TIMEOUT_SECONDS = 1.5
    server, browser = connection
    request, body = gunicorn_request(server, 100_000, read_ahead=b"h" * 200)
    browser.sendall(b"x" * 800)
    assert isinstance(request_body.body_of(request, 100_000), request_body.SocketBody)

    started = time.monotonic()
    assert store_in_thread(request, 100_000, tmp_path, timeout=10) == b"h" * 200 + b"x" * 800
    assert 1.4 < time.monotonic() - started < 5
    assert body.failed  # gunicorn closes the connection: the rest of the body will not come


def test_a_silent_client_is_cut_off_on_the_portable_path(connection, tmp_path, settings):
    settings.REQUEST_IDLE_TIMEOUT_SECONDS = 1.5
    server, browser = connection
    unreader = SocketUnreader(server)
    unreader.unread(b"0123456789")
    body = GunicornBody(LengthReader(unreader, 100_000))
    browser.sendall(b"y" * 2000)
    assert body.read(3) == b"012"  # begun by someone else: gunicorn's own reads are used
    request = WSGIRequest({"REQUEST_METHOD": "PATCH", "PATH_INFO": "/tus/x", "CONTENT_TYPE": OCTETS,
                           "CONTENT_LENGTH": "99997", "wsgi.input": body, "gunicorn.socket": server})
    assert isinstance(request_body.body_of(request, 99_997), request_body.RequestBody)

    started = time.monotonic()
    data = store_in_thread(request, 99_997, tmp_path, timeout=10)
    assert 1.4 < time.monotonic() - started < 5
    # gunicorn reads a buffer's worth before handing any of it over: a read cut off by the
    # timeout loses what it held (not written, so not counted: the client sends it again).
    assert (b"3456789" + b"y" * 2000).startswith(data)
    assert body.failed


def test_a_slow_client_that_keeps_sending_is_not_cut_off(connection, tmp_path, settings):
    settings.REQUEST_IDLE_TIMEOUT_SECONDS = 1.5
    server, browser = connection
    request, body = gunicorn_request(server, 10 * 100)

    def trickle():
        for _ in range(10):  # 100 bytes every 0.4 s: 4 s in all, far beyond the idle timeout
            browser.sendall(b"z" * 100)
            time.sleep(0.4)

    threading.Thread(target=trickle, daemon=True).start()
    assert store_in_thread(request, 1000, tmp_path, timeout=20) == b"z" * 1000
    assert not body.failed


def test_a_writer_that_has_been_silent_for_the_idle_timeout_is_taken_over(alice, staging_dir):
    upload = new_upload(alice, 300)
    silent = staging.locked_for_writing(upload.staged_name, idle_seconds=60)
    with silent:
        silent.seek(0)
        silent.write(memoryview(b"a" * 100))
        services.receive.record_received(upload, 100)
        staged = staging.path(upload.staged_name)

        with pytest.raises(staging.StagingBusy) as busy:  # still within the idle timeout
            services.upload_receive(upload=upload, offset=100, stream=Body([b"b" * 200]), length=200)
        assert 55 <= busy.value.retry_after <= 60

        long_ago = time.time() - 61
        os.utime(staged, (long_ago, long_ago))
        assert services.upload_receive(upload=upload, offset=100, stream=Body([b"b" * 200]), length=200) == 300

        # The silent writer wakes up: it must not write at its stale offset, nor record anything.
        with pytest.raises(staging.TakenOver):
            silent.write(memoryview(b"STALE"))
        with pytest.raises(staging.TakenOver):
            silent.record(lambda: services.receive.record_received(upload, 105))
    assert (staging_dir / upload.staged_name).read_bytes() == b"a" * 100 + b"b" * 200
    assert Upload.objects.get(pk=upload.pk).received_bytes == 300


def test_a_second_writer_gets_423_with_retry_after(tus_client):
    url = create(tus_client, length=10)["Location"]
    with staging.locked_for_writing(Upload.objects.get().staged_name, idle_seconds=60):
        response = tus_client.generic("PATCH", url, b"hello", content_type=OCTETS,
                                      headers={**TUS, "Upload-Offset": "0"})
    assert response.status_code == 423
    assert 1 <= int(response["Retry-After"]) <= 60


def test_a_writer_of_a_process_that_died_is_no_obstacle(alice, staging_dir):
    """A writer's lock goes with its process: the next PATCH need not wait for the idle timeout."""
    upload = new_upload(alice, 10)
    (staging_dir / (upload.staged_name + staging.local.WRITER_SUFFIX)).write_bytes(b"7")  # and its lock is gone
    assert services.upload_receive(upload=upload, offset=0, stream=Body([b"x" * 10]), length=10) == 10


def test_deleting_a_staged_file_deletes_its_writer_file(alice, staging_dir):
    upload = new_upload(alice, 10)
    services.upload_receive(upload=upload, offset=0, stream=Body([b"x" * 4]), length=4)
    assert (staging_dir / (upload.staged_name + staging.local.WRITER_SUFFIX)).exists()
    staging.delete(upload.staged_name)
    assert list(staging_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 3. The sign-in page answers while 200 connections stall, under the real gunicorn

IDLE_SECONDS = 3
STALLED_UPLOADS = 100
STALLED_SIGN_INS = 100


@pytest.fixture
def web(transactional_db, staging_dir, tmp_path):
    """gunicorn as deployed (gunicorn.conf.py), on the test database, with a 3 s idle timeout."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DATABASE_URL": _database_url(db_connection.settings_dict),
        "STAGING_DIR": str(staging_dir),
        "SECRET_KEY": django_settings.SECRET_KEY,  # the test client's sessions must be valid
        "TOKEN_ENCRYPTION_KEY": django_settings.TOKEN_ENCRYPTION_KEY,
        "REDIS_URL": "redis://127.0.0.1:1/0",  # no upload is completed: no task is sent
        "ALLOWED_HOSTS": "127.0.0.1",
        "DEBUG": "0",
        "REQUEST_IDLE_TIMEOUT_SECONDS": str(IDLE_SECONDS),
    }
    url = f"http://127.0.0.1:{port}"
    process = Process("web", [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
                              "portal.wsgi:application"],
                      env, tmp_path / "web.log", lambda p: http_ok(f"{url}/accounts/login/"))
    process.start().wait_ready()
    try:
        yield url, process
    finally:
        process.stop()
        _wait_for_worker_sessions_to_end()


def raw_request(method: str, path: str, headers: dict, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_the_sign_in_page_answers_while_200_connections_stall(web, alice, client, settings):
    url, process = web
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = STALLED_UPLOADS  # one person's many stalled uploads
    address = (urlsplit(url).hostname, urlsplit(url).port)
    client.force_login(alice)
    session = tus_headers(client)
    uploads = [new_upload(alice, 100_000) for _ in range(STALLED_UPLOADS)]
    stalled: list[socket.socket] = []
    try:
        for upload in uploads:  # each says 100 000 bytes, sends 1 000 and goes quiet
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(raw_request("PATCH", f"/tus/{upload.uid}", {
                **session, **TUS, "Upload-Offset": "0", "Content-Type": OCTETS, "Content-Length": "100000",
            }, b"s" * 1000))
            stalled.append(sock)
        for _ in range(STALLED_SIGN_INS):  # nobody signed in: a sign-in form whose body stops short
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(raw_request("POST", "/accounts/login/", {
                "Content-Type": "application/x-www-form-urlencoded", "Content-Length": "1000",
            }, b"username=alice&password="))
            stalled.append(sock)

        started = time.monotonic()
        page = requests.get(f"{url}/accounts/login/", timeout=30)
        assert page.status_code == 200
        assert time.monotonic() - started < 10, f"the sign-in page took {time.monotonic() - started:.1f}s"

        # A form body larger than REQUEST_BODY_MAX_BYTES is refused before any thread waits for it.
        with socket.create_connection(address, timeout=10) as big:
            big.sendall(raw_request("POST", "/accounts/login/", {
                "Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(10 * 1024 * 1024),
            }, b"username=alice"))
            assert big.recv(100).startswith(b"HTTP/1.1 413 ")

        # Each stalled PATCH either got a thread (until the idle timeout) or was told to come back
        # (503: too many uploads at once). One that got a thread let go after the idle timeout,
        # kept the bytes it had received, and resumes from a new connection.
        def received():
            return set(Upload.objects.filter(pk__in=[u.pk for u in uploads]).values_list("received_bytes", flat=True))

        wait_for(lambda: received() == {0, 1000} or received() == {1000},
                 timeout=3 * IDLE_SECONDS + 10, what="the stalled PATCHes to end")
        upload = Upload.objects.filter(pk__in=[u.pk for u in uploads], received_bytes=1000).first()
        resume = requests.Session()
        resume.headers.update({**session, **TUS})
        where = f"{url}/tus/{upload.uid}"
        assert resume.head(where, timeout=10).headers["Upload-Offset"] == "1000"

        def send_more():  # as a tus client does, come back after a 503 (stalled PATCHes still ending)
            response = resume.patch(where, data=b"r" * 49_000, timeout=30,
                                    headers={"Upload-Offset": "1000", "Content-Type": OCTETS})
            return response if response.status_code != 503 else None

        more = wait_for(send_more, timeout=3 * IDLE_SECONDS + 10, interval=0.5, what="a thread for the PATCH")
        assert more.status_code == 204, more.text
        assert more.headers["Upload-Offset"] == "50000"
        assert Upload.objects.get(pk=upload.pk).received_bytes == 50_000
        assert staging.open_for_reading(upload.staged_name).read() == b"s" * 1000 + b"r" * 49_000
    finally:
        for sock in stalled:
            sock.close()
    log = process.output()
    assert "Socket error" not in log and '" 500 ' not in log, log[-3000:]
