"""Through the front door: Debian's nginx with deploy/nginx/'s config, over real TLS, in front of
two web and two ingest gunicorn processes (tests/nginx_fixture.py), with SECURE_HTTPS=1.

Each test acts as a browser from outside: uploads go through nginx to whichever ingest process
it picks, pages to whichever web process, and the upload must come out Ready with the same bytes.
"""

import hashlib
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from django.conf import settings as django_settings
from tusclient.client import TusClient

from tests.conftest import CSRF_SECRET, connect_cloud, make_image, wait_for
from tests.nginx_fixture import (  # noqa: F401  (nginx_stack: a fixture)
    CLIENT_BODY_TIMEOUT_SECONDS, THREADS_PER_PROCESS, NginxStack, nginx_stack)
from uploads.models import Status, Upload

pytestmark = [pytest.mark.nginx, pytest.mark.e2e, pytest.mark.slow]

MiB = 1024 * 1024
DONE = (Status.READY, Status.FAILED, Status.RECONNECT, Status.CANCELLED)
SECURITY_HEADERS = ("Strict-Transport-Security", "X-Content-Type-Options", "Referrer-Policy",
                    "X-Frame-Options", "Cross-Origin-Opener-Policy")


@pytest.fixture
def stack(nginx_stack, transactional_db, settings, monkeypatch, alice, client) -> NginxStack:
    """The stack, reset; alice connected to the simulator's cloud and signed in; this process
    trusts the stack's certificate (tuspy's requests read REQUESTS_CA_BUNDLE)."""
    nginx_stack.reset()
    settings.IMS_ENDPOINT = nginx_stack.sim.url
    settings.IAM_ENDPOINT = f"{nginx_stack.sim.url}/v3"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(nginx_stack.certificate))
    connect_cloud(alice)
    client.force_login(alice)
    return nginx_stack


def signed_in_headers(stack: NginxStack, client) -> dict:
    """What a signed-in browser sends with a tus request: cookies, the CSRF header, its Origin."""
    session = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    return {
        "Cookie": f"{django_settings.SESSION_COOKIE_NAME}={session}; {django_settings.CSRF_COOKIE_NAME}={CSRF_SECRET}",
        "X-CSRFToken": CSRF_SECRET,
        "Origin": stack.url,
    }


def uploader(stack: NginxStack, client, path: Path, *, url: str | None = None):
    tus = TusClient(f"{stack.url}/tus/", headers=signed_in_headers(stack, client))
    return tus.uploader(str(path), chunk_size=MiB, url=url, metadata={"filename": path.name})


def upload_of(tus_uploader) -> Upload:
    return Upload.objects.get(uid=tus_uploader.url.rstrip("/").rsplit("/", 1)[-1])


def wait_done(stack: NginxStack, upload: Upload, timeout: float = 60) -> Upload:
    def done():
        upload.refresh_from_db()
        return upload.status in DONE

    try:
        wait_for(done, timeout=timeout, interval=0.1, what=f"upload {upload.pk} to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (it is {upload.status})\n{stack.logs_text()}") from None
    return upload


def assert_ready_with_the_same_bytes(stack: NginxStack, upload: Upload, path: Path) -> None:
    assert upload.status == Status.READY, (upload.error_message, stack.logs_text())
    [image] = stack.sim.images()
    assert image["id"] == upload.ims_image_id
    assert image["checksum"] == upload.md5 == hashlib.md5(path.read_bytes()).hexdigest()
    assert image["size"] == path.stat().st_size


def served(process, method: str, path: str) -> int:
    """How many `method path` requests this gunicorn's access log shows."""
    return process.full_output().count(f'"{method} {path}"')


def served_by(processes, method: str, path: str, expected: list[int]) -> list[int]:
    """The counts of `served` for each process, once they are `expected`: gunicorn writes its
    access log line just after the answer, so the client can be a moment ahead of it."""
    def counts():
        return [served(process, method, path) for process in processes]

    try:
        wait_for(lambda: counts() == expected, timeout=5, what=f"{method} {path} in the access logs")
    except AssertionError:
        pass  # the caller's assertion shows what was served instead
    return counts()


def test_an_upload_through_nginx_goes_to_the_ingest_processes_in_turn_and_ends_ready(stack, client, tmp_path):
    path = make_image(tmp_path / "front-door.raw", 3 * MiB + 123)
    tus_uploader = uploader(stack, client, path)
    tus_uploader.upload()
    upload = upload_of(tus_uploader)
    resource = urlsplit(tus_uploader.url).path

    # The portal knew it was reached over https, on nginx's port (X-Forwarded-Proto, Host).
    assert tus_uploader.url.startswith(f"{stack.url}/tus/")
    # Four PATCHes, nginx taking the two ingest processes in turn; no web process saw one.
    assert served_by(stack.ingest, "PATCH", resource, [2, 2]) == [2, 2]
    assert [served(process, "PATCH", resource) for process in stack.web] == [0, 0]

    upload = wait_done(stack, upload)
    assert_ready_with_the_same_bytes(stack, upload, path)
    # The live status, through nginx, from the web pool.
    page = requests.Session()
    page.headers.update(signed_in_headers(stack, client))
    for _ in range(2):
        status = page.get(f"{stack.url}/uploads/{upload.uid}/status", timeout=10)
        assert status.status_code == 200 and status.json()["status"] == "ready"
    assert served_by(stack.web, "GET", f"/uploads/{upload.uid}/status", [1, 1]) == [1, 1]


def test_an_upload_resumed_in_a_new_session_continues_on_the_other_ingest_process(stack, client, tmp_path):
    path = make_image(tmp_path / "resumed.raw", 3 * MiB)
    first = uploader(stack, client, path)
    first.upload_chunk()  # then the tab closes
    upload = upload_of(first)
    resource = urlsplit(first.url).path
    wait_for(lambda: sum(served(process, "PATCH", resource) for process in stack.ingest) == 1, timeout=5,
             what="the first PATCH in an ingest process's access log")
    [first_patch] = [process for process in stack.ingest if served(process, "PATCH", resource)]

    again = uploader(stack, client, path, url=first.url)  # the same file chosen again
    assert again.get_offset() == MiB
    again.upload()

    other = next(process for process in stack.ingest if process is not first_patch)
    assert served(other, "PATCH", resource) >= 1, "the resumed upload never reached the other ingest process"
    assert (stack.staging / upload.staged_name).read_bytes() == path.read_bytes()
    assert_ready_with_the_same_bytes(stack, wait_done(stack, upload), path)


def tls_connection(stack: NginxStack) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(stack.certificate))
    address = urlsplit(stack.url)
    raw = socket.create_connection((address.hostname, address.port), timeout=30)
    return context.wrap_socket(raw, server_hostname=address.hostname)


def start_patch(stack: NginxStack, client, resource: str, length: int) -> ssl.SSLSocket:
    """A PATCH from offset 0 whose headers are sent, and none of its `length` bytes yet."""
    headers = {**signed_in_headers(stack, client), "Host": urlsplit(stack.url).netloc, "Tus-Resumable": "1.0.0",
               "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
               "Content-Length": str(length)}
    connection = tls_connection(stack)
    connection.sendall(f"PATCH {resource} HTTP/1.1\r\n".encode()
                       + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n")
    return connection


def test_a_client_that_stalls_mid_body_is_cut_by_nginx_and_the_upload_resumes_from_what_arrived(
    stack, client, tmp_path
):
    path = make_image(tmp_path / "stalled.raw", 6 * MiB)
    data = path.read_bytes()
    first = uploader(stack, client, path)
    first.set_url(first.create_url())
    upload = upload_of(first)
    resource = urlsplit(first.url).path

    # A PATCH that announces 5 MiB, sends 2 MiB and goes quiet.
    stalled = start_patch(stack, client, resource, 5 * MiB)
    stalled.sendall(data[: 2 * MiB])
    went_quiet = time.monotonic()

    # nginx cuts it after client_body_timeout; the ingest process's PATCH then ends too.
    stalled.settimeout(CLIENT_BODY_TIMEOUT_SECONDS + 20)
    try:
        while stalled.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    cut_after = time.monotonic() - went_quiet
    stalled.close()
    assert CLIENT_BODY_TIMEOUT_SECONDS - 0.5 <= cut_after < CLIENT_BODY_TIMEOUT_SECONDS + 10
    wait_for(lambda: sum(served(process, "PATCH", resource) for process in stack.ingest) == 1, timeout=10,
             what="the ingest process to end the cut PATCH")

    again = uploader(stack, client, path, url=first.url)
    offset = again.get_offset()
    upload.refresh_from_db()
    assert 0 < offset <= 2 * MiB and offset == upload.received_bytes
    assert (stack.staging / upload.staged_name).read_bytes() == data[:offset]
    again.upload()
    assert_ready_with_the_same_bytes(stack, wait_done(stack, upload), path)


def test_pages_and_the_live_status_answer_while_slow_uploads_hold_every_ingest_thread(stack, client, tmp_path):
    path = make_image(tmp_path / "slow.raw", MiB)
    uploaders = [uploader(stack, client, path) for _ in range(THREADS_PER_PROCESS * len(stack.ingest) + 2)]
    for tus_uploader in uploaders:
        tus_uploader.set_url(tus_uploader.create_url())
    slow = [start_patch(stack, client, urlsplit(u.url).path, MiB) for u in uploaders]
    stop = threading.Event()

    def trickle():  # a byte each on every connection, often enough that nginx never cuts them
        while not stop.wait(CLIENT_BODY_TIMEOUT_SECONDS / 4):
            for connection in slow:
                connection.sendall(b"\0")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        def ingest_is_full() -> bool:
            try:
                requests.head(uploaders[0].url, headers={**signed_in_headers(stack, client), "Tus-Resumable": "1.0.0"},
                              timeout=1)
            except requests.Timeout:
                return True
            return False

        wait_for(ingest_is_full, timeout=20, interval=0.1, what="the slow uploads to hold every ingest thread")
        page = requests.Session()
        page.headers.update(signed_in_headers(stack, client))
        for url in (f"{stack.url}/uploads/{upload_of(uploaders[0]).uid}/status", f"{stack.url}/uploads/"):
            started = time.monotonic()
            assert page.get(url, timeout=10).status_code == 200
            assert time.monotonic() - started < 1, f"{url} waited behind the uploads"
    finally:
        stop.set()
        trickler.join(timeout=5)
        for connection in slow:
            connection.close()


def test_https_only_redirects_secure_cookies_and_hsts_over_real_tls(stack, client, alice):
    redirect = requests.get(f"{stack.http_url}/accounts/login/?next=/upload/", allow_redirects=False, timeout=10)
    assert redirect.status_code == 301
    assert redirect.headers["Location"] == f"{stack.url}/accounts/login/?next=/upload/"

    browser = requests.Session()
    page = browser.get(f"{stack.url}/accounts/login/", timeout=10)
    assert page.status_code == 200
    assert page.headers["Strict-Transport-Security"] == "max-age=3600; includeSubDomains; preload"
    csrf = next(cookie for cookie in browser.cookies if cookie.name == django_settings.CSRF_COOKIE_NAME)
    assert csrf.secure
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    signed_in = browser.post(f"{stack.url}/accounts/login/", allow_redirects=False, timeout=10,
                             headers={"Referer": f"{stack.url}/accounts/login/"},
                             data={"username": "alice", "password": "alice-pw-1234", "csrfmiddlewaretoken": token})
    assert signed_in.status_code == 302, signed_in.text[:500]
    assert urljoin(stack.url, signed_in.headers["Location"]).startswith(f"{stack.url}/")
    session = next(cookie for cookie in browser.cookies if cookie.name == django_settings.SESSION_COOKIE_NAME)
    assert session.secure and session.has_nonstandard_attr("HttpOnly")
    assert browser.get(f"{stack.url}/upload/", timeout=10).status_code == 200

    # nginx overwrites an X-Forwarded-Proto the client made up: no redirect loop, no false https.
    spoofed = requests.get(f"{stack.url}/accounts/login/", headers={"X-Forwarded-Proto": "http"},
                           allow_redirects=False, timeout=10)
    assert spoofed.status_code == 200


def long_cache_for(asset: str) -> str:
    """A name with its content's hash (portal.0123456789ab.css) never changes: a year. Any other
    may change with a release: an hour, so that pages and their scripts never disagree for long."""
    if re.search(r"\.[0-9a-f]{12}\.[A-Za-z0-9]+$", asset):
        return "public, max-age=31536000, immutable"
    return "public, max-age=3600"


def test_long_cache_headers_only_for_names_that_change_with_their_content(stack):
    css = stack.static_root / "css"
    (css / "portal.0123456789ab.css").write_bytes((css / "portal.css").read_bytes())  # a hashed name
    for asset in ("css/portal.css", "css/portal.0123456789ab.css", "vendor/uppy/uppy.min.js"):
        static = requests.get(f"{stack.url}/static/{asset}", timeout=10)
        assert static.status_code == 200, asset
        assert static.headers["Cache-Control"] == long_cache_for(asset), asset


def test_pages_keep_the_portals_security_headers_and_static_files_get_them_from_nginx(stack, client):
    page = requests.get(f"{stack.url}/accounts/login/", timeout=10)
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for name in SECURITY_HEADERS:
        assert name in page.headers, name
        assert "," not in page.headers[name], f"{name} sent twice: {page.headers[name]}"

    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text)
    assert assets, page.text[:1000]
    for asset in assets:
        static = requests.get(f"{stack.url}{asset}", timeout=10)
        assert static.status_code == 200, asset
        for name in SECURITY_HEADERS:
            assert static.headers.get(name) == page.headers[name], (asset, name)
        assert static.headers["Cache-Control"] == long_cache_for(asset), asset
    assert not any(served(process, "GET", assets[0]) for process in stack.web), "static went to gunicorn"


def test_sign_in_attempts_beyond_the_burst_get_a_429_in_plain_words(stack):
    """Last in this module: it uses up 127.0.0.1's sign-in allowance for a while."""
    answers = [requests.post(f"{stack.url}/accounts/login/", data={"username": "x", "password": "y"},
                             headers={"Referer": f"{stack.url}/accounts/login/"}, timeout=10)
               for _ in range(15)]
    statuses = [answer.status_code for answer in answers]
    assert 429 in statuses and statuses[0] != 429, statuses
    refused = answers[statuses.index(429)]
    assert "Wait a minute, then try again" in refused.text
    assert refused.headers["Retry-After"] == "60"
    # Only POSTs count: the sign-in page itself still opens.
    assert requests.get(f"{stack.url}/accounts/login/", timeout=10).status_code == 200


def test_upload_creations_beyond_the_burst_get_a_429_and_other_tus_requests_do_not_count(stack, client):
    """Last in this module too: it uses up 127.0.0.1's upload-creation allowance for a while."""
    tus = {"Tus-Resumable": "1.0.0", "Upload-Length": "1", "Origin": stack.url}
    session = requests.Session()
    for _ in range(60):  # HEADs and OPTIONS of uploads are not creations
        assert session.options(f"{stack.url}/tus/", headers=tus, timeout=10).status_code == 204
    # Unsigned-in creations are refused by the portal, but nginx counts them all the same.
    statuses = [session.post(f"{stack.url}/tus/", headers=tus, timeout=10).status_code for _ in range(60)]
    assert statuses[0] == 403 and 429 in statuses, statuses
    assert statuses.count(403) >= 30  # the burst, less what this module's uploads have used
