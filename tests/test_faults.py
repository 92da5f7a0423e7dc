"""Faults injected for real into a running portal, and how each upload comes out of them.

Every test drives real processes (tests/fault_stack.py): gunicorn serving /tus/, Celery workers
and beat on a private Redis, and the IMS simulator, all on the test database. The faults are
real too: signals, a stopped Redis, the simulator's fault switches, a full staging file system.
Each test ends with the upload ready in IMS with the same MD5 and exactly one image, or with a
clear error and the staged file kept for Retry; never with two images for one upload, nor with
an image left over from a failed attempt.
"""

import hashlib
import http.client
import json
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings as django_settings
from django.test import Client
from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError

from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER
from tests.conftest import CSRF_SECRET, connect_cloud, make_image, tus_headers, wait_for
from tests.fault_stack import FaultStack, fault_stack, faults_stack  # noqa: F401  (fixtures)
from uploads.models import Status, Upload

pytestmark = [pytest.mark.faults, pytest.mark.slow]

MiB = 1024 * 1024
DONE = (Status.READY, Status.FAILED, Status.RECONNECT, Status.CANCELLED)


# ---------------------------------------------------------------------------------------------
# The browser's side, and what to look at


def browser(stack: FaultStack, client) -> requests.Session:
    """A requests session signed in as the test client's user, against the gunicorn server."""
    session = requests.Session()
    session.cookies.set(django_settings.SESSION_COOKIE_NAME, client.cookies[django_settings.SESSION_COOKIE_NAME].value)
    session.cookies.set(django_settings.CSRF_COOKIE_NAME, CSRF_SECRET)
    session.headers["X-CSRFToken"] = CSRF_SECRET
    return session


def uploader(stack: FaultStack, client, path: Path, *, chunk_size: int = MiB, url: str | None = None):
    tus = TusClient(f"{stack.web_url}/tus/", headers=tus_headers(client))
    return tus.uploader(str(path), chunk_size=chunk_size, url=url, metadata={"filename": path.name})


def upload_of(tus_uploader) -> Upload:
    return Upload.objects.get(uid=tus_uploader.url.rstrip("/").rsplit("/", 1)[-1])


def tus_upload(stack: FaultStack, client, path: Path, **options) -> Upload:
    tus_uploader = uploader(stack, client, path, **options)
    tus_uploader.upload()
    return upload_of(tus_uploader)


def timeline(upload: Upload) -> list[str]:
    return [event.message for event in upload.events.all()]


def explain(stack: FaultStack, upload: Upload) -> str:
    upload.refresh_from_db()
    return (f"upload is {upload.status} (attempt {upload.attempt}, {upload.error_message!r})\n"
            + "\n".join(timeline(upload)) + f"\nIMS requests: {stack.sim.requests_seen()}\n{stack.logs_text()}")


def wait_status(stack: FaultStack, upload: Upload, *statuses: str, timeout: float = 60) -> Upload:
    def reached():
        upload.refresh_from_db()
        return upload.status in statuses

    try:
        wait_for(reached, timeout=timeout, interval=0.1, what=f"upload {upload.pk} to be {'/'.join(statuses)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{explain(stack, upload)}") from None
    return upload


def ims_requests(stack: FaultStack, method: str) -> list[int | None]:
    """Statuses of IMS's answers to `method`, in order (None: the client went away mid-request)."""
    return [r["status"] for r in stack.sim.requests_seen() if r["method"] == method and r["path"].startswith("/v2/")]


def wait_mid_push(stack: FaultStack, upload: Upload) -> Upload:
    """Until the worker streams the file to IMS: bytes have gone out and IMS has not answered the PUT."""
    def sending():
        upload.refresh_from_db()
        return upload.status == Status.PUSHING and upload.sent_bytes > 0

    try:
        wait_for(sending, timeout=30, interval=0.05, what=f"upload {upload.pk} to be sent to IMS")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{explain(stack, upload)}") from None
    assert ims_requests(stack, "PUT") == [], "the PUT ended before the fault: make the push slower"
    return upload


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_ready_in_ims(stack: FaultStack, uploads_and_files: list[tuple[Upload, Path]]) -> None:
    """Each upload ready with the same MD5 as its file, and IMS holding one image for each, no other."""
    images = {image["id"]: image for image in stack.sim.images()}
    for upload, path in uploads_and_files:
        upload.refresh_from_db()
        assert upload.status == Status.READY, explain(stack, upload)
        image = images.get(upload.ims_image_id)
        assert image is not None, f"the image of upload {upload.pk} is not in IMS: {images}"
        assert image["status"] == "active"
        assert image["checksum"] == upload.md5 == md5_of(path)
        assert image["size"] == path.stat().st_size
    assert sorted(images) == sorted(u.ims_image_id for u, _ in uploads_and_files), f"extra images in IMS: {images}"


@pytest.fixture
def stack(faults_stack, alice, client) -> FaultStack:
    """The processes, reset; alice connected to the simulator's cloud and signed in."""
    connect_cloud(alice)
    client.force_login(alice)
    return faults_stack


# ---------------------------------------------------------------------------------------------
# 1. A worker killed mid-push


def test_a_push_whose_worker_is_killed_is_sent_again_by_a_new_worker_into_the_same_image(stack, client, tmp_path):
    stack.sim.set_faults(put_bytes_per_second=2 * MiB)
    path = make_image(tmp_path / "killed-worker.raw", 8 * MiB)
    upload = wait_mid_push(stack, tus_upload(stack, client, path))
    first_image = upload.ims_image_id

    stack.workers["w1"].kill(signal.SIGKILL)
    stack.sim.set_faults(put_bytes_per_second=None)
    stack.workers["w1"].start().wait_ready()  # a new worker; beat finds the push whose heartbeat stopped

    wait_status(stack, upload, *DONE, timeout=90)
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.ims_image_id == first_image  # the killed attempt's empty image is reused
    assert upload.attempt == 2
    assert ims_requests(stack, "POST") == [201]
    assert ims_requests(stack, "PUT") == [None, 204]
    assert any(m.startswith("The worker that was") and "stopped" in m for m in timeline(upload))


# ---------------------------------------------------------------------------------------------
# 2. Redis stopped for 30 s mid-push, back without its data


def test_a_redis_outage_mid_push_loses_no_upload_not_even_those_whose_messages_it_lost(stack, client, tmp_path):
    """A is being pushed when Redis stops; B's push message waits in Redis (the only worker is
    busy) and is lost with Redis's data; C finishes its browser upload while Redis is down."""
    stack.sim.set_faults(put_bytes_per_second=1 * MiB)
    path_a = make_image(tmp_path / "a.raw", 6 * MiB)
    path_b = make_image(tmp_path / "b.raw", 1 * MiB)
    path_c = make_image(tmp_path / "c.raw", 1 * MiB)
    upload_a = wait_mid_push(stack, tus_upload(stack, client, path_a))
    upload_b = tus_upload(stack, client, path_b)
    queue = stack.redis_client()
    wait_for(lambda: queue.llen("uploads") >= 1, timeout=10, what="B's push message to wait in Redis")
    lost = {json.loads(message)["headers"]["id"] for message in queue.lrange("uploads", 0, -1)}

    stack.redis.stop()
    stopped = time.monotonic()
    c_refused = None
    try:
        upload_c = tus_upload(stack, client, path_c)
    except TusCommunicationError as exc:
        c_refused = exc
        upload_c = Upload.objects.get(filename=path_c.name)
    time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))  # hold the outage for 30 s
    stack.redis.start().wait_ready()  # empty: --save "" --appendonly no
    for upload in (upload_a, upload_b, upload_c):
        wait_status(stack, upload, *DONE, timeout=90)

    assert_ready_in_ims(stack, [(upload_a, path_a), (upload_b, path_b), (upload_c, path_c)])
    worker_log = stack.workers["w1"].output()
    assert not any(task_id in worker_log for task_id in lost), "B's first message was not lost after all"
    assert c_refused is None, (
        "the browser's last chunk, sent while Redis was down, was refused although its bytes were "
        f"stored: {c_refused} {c_refused.status_code} {c_refused.response_content!r}"
    )


# ---------------------------------------------------------------------------------------------
# 3. The web server killed mid-tus-upload


def test_a_tus_upload_cut_by_a_killed_web_server_resumes_from_the_servers_offset(stack, client, tmp_path):
    path = make_image(tmp_path / "killed-web.raw", 6 * MiB)
    data = path.read_bytes()
    first = uploader(stack, client, path)
    first.upload_chunk()
    upload = upload_of(first)
    staged = stack.staged_path(upload)

    # The next PATCH is half on its way (2 of its 5 MiB sent) when the web server is killed.
    web = urlsplit(stack.web_url)
    patch = http.client.HTTPConnection(web.hostname, web.port, timeout=10)
    patch.putrequest("PATCH", urlsplit(first.url).path)
    for name, value in {**tus_headers(client), "Tus-Resumable": "1.0.0", "Upload-Offset": str(MiB),
                        "Content-Type": "application/offset+octet-stream", "Content-Length": str(5 * MiB)}.items():
        patch.putheader(name, value)
    patch.endheaders()
    patch.send(data[MiB:3 * MiB])
    wait_for(lambda: staged.stat().st_size >= 2 * MiB, timeout=10, what="the web server to store part of the PATCH")
    stack.web.kill(signal.SIGKILL)
    patch.close()
    stack.web.start().wait_ready()

    again = uploader(stack, client, path, url=first.url)  # the same file chosen again
    offset = again.get_offset()
    upload.refresh_from_db()
    assert offset == upload.received_bytes and MiB <= offset <= 3 * MiB
    assert upload.status == Status.RECEIVING
    again.upload()
    assert staged.read_bytes() == data

    wait_status(stack, upload, *DONE)
    assert_ready_in_ims(stack, [(upload, path)])


def test_gunicorn_answers_a_head_pipelined_behind_a_patch_on_the_same_connection(stack, client, tmp_path):
    """The PATCH body is read from the socket, past gunicorn's buffers (uploads/request_body.py):
    the request sent right behind it must still reach gunicorn whole, even when gunicorn's first
    read took in both (a small chunk)."""
    path = make_image(tmp_path / "pipelined.raw", 3 * MiB)
    data = path.read_bytes()[:1000]
    first = uploader(stack, client, path)
    first.set_url(first.create_url())
    upload = upload_of(first)
    resource = urlsplit(first.url).path
    headers = {**tus_headers(client), "Host": "127.0.0.1", "Tus-Resumable": "1.0.0"}

    def request(method: str, extra: dict, body: bytes = b"") -> bytes:
        lines = [f"{method} {resource} HTTP/1.1", *(f"{k}: {v}" for k, v in {**headers, **extra}.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    web = urlsplit(stack.web_url)
    with socket.create_connection((web.hostname, web.port), timeout=30) as connection:
        connection.sendall(
            request("PATCH", {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
                              "Content-Length": str(len(data))}, data)
            + request("HEAD", {})
        )
        replies = b""
        while replies.count(b"\r\n\r\n") < 2:  # neither answer has a body (204; HEAD)
            received = connection.recv(65536)
            assert received, f"the connection closed after {replies!r}"
            replies += received
    patch, head = (dict(header_lines(block)) for block in replies.split(b"\r\n\r\n")[:2])

    assert patch["status"] == "204" and patch["upload-offset"] == "1000", replies
    assert head["status"] == "200" and head["upload-offset"] == "1000", replies
    assert stack.staged_path(upload).read_bytes() == data


def header_lines(block: bytes):
    status_line, *lines = block.decode("latin-1").split("\r\n")
    yield "status", status_line.split()[1]
    for line in lines:
        name, _, value = line.partition(":")
        yield name.strip().lower(), value.strip()


# ---------------------------------------------------------------------------------------------
# 4. IMS answers 500 to two PUTs, 503 to a GET while polling, resets the connection mid-PUT


def test_ims_500s_on_the_first_two_puts_and_a_503_while_polling_end_in_one_ready_image(stack, client, tmp_path):
    stack.sim.set_faults(fail_puts=2, fail_put_status=500, processing_seconds=3)
    path = make_image(tmp_path / "flaky.raw", 1 * MiB)
    upload = tus_upload(stack, client, path)
    wait_status(stack, upload, Status.PROCESSING, *DONE, timeout=60)  # after 5 s and 15 s of backoff
    stack.sim.set_faults(fail_gets=1, fail_get_status=503)

    wait_status(stack, upload, *DONE, timeout=30)
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.attempt == 3
    assert ims_requests(stack, "POST") == [201]  # one image, reused by every attempt
    assert ims_requests(stack, "PUT") == [500, 500, 204]
    assert 503 in ims_requests(stack, "GET")
    assert any(m.startswith("Checking the image failed for now") for m in timeline(upload))


def test_a_connection_reset_halfway_through_the_put_is_sent_again_into_the_same_image(stack, client, tmp_path):
    path = make_image(tmp_path / "reset.raw", 2 * MiB)
    stack.sim.set_faults(cut_put_after_bytes=MiB)
    upload = tus_upload(stack, client, path)

    wait_status(stack, upload, *DONE, timeout=60)
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.attempt == 2
    assert ims_requests(stack, "POST") == [201]
    assert ims_requests(stack, "PUT") == [None, 204]
    assert any("Trying again in 5 seconds" in m for m in timeline(upload))


# ---------------------------------------------------------------------------------------------
# 5. The token expires between upload and push


def test_a_sign_in_that_expires_before_the_push_waits_for_a_reconnect_then_continues(stack, client, tmp_path):
    path = make_image(tmp_path / "expired.raw", 2 * MiB)
    tus_uploader = uploader(stack, client, path)
    tus_uploader.upload_chunk()
    stack.sim.set_faults(expire_tokens=True)  # IAM ends the token while the browser still sends
    tus_uploader.upload()
    upload = wait_status(stack, upload_of(tus_uploader), *DONE)

    assert upload.status == Status.RECONNECT, explain(stack, upload)
    assert stack.sim.images() == []
    page = browser(stack, client)
    status = page.get(f"{stack.web_url}/uploads/{upload.uid}/status").json()
    assert "sign-in has expired" in status["error_message"] and status["error_hint"]
    assert stack.staged_path(upload).read_bytes() == path.read_bytes()

    reconnect = page.post(f"{stack.web_url}/cloud/", allow_redirects=False, data={
        "domain": DEMO_DOMAIN, "user_name": DEMO_USER, "password": DEMO_PASSWORD, "project": DEMO_PROJECT_NAME})
    assert reconnect.status_code == 302
    wait_status(stack, upload, Status.READY, Status.FAILED, Status.CANCELLED)
    assert_ready_in_ims(stack, [(upload, path)])


# ---------------------------------------------------------------------------------------------
# 6. The image goes `killed` in IMS


def test_an_image_killed_in_ims_fails_clearly_leaves_no_image_and_retry_makes_it_ready(stack, client, tmp_path):
    stack.sim.set_faults(processing_seconds=60)
    path = make_image(tmp_path / "doomed.raw", 1 * MiB)
    upload = wait_status(stack, tus_upload(stack, client, path), Status.PROCESSING, *DONE)
    stack.sim.set_image_status(upload.ims_image_id, "killed")

    wait_status(stack, upload, *DONE)
    assert upload.status == Status.FAILED, explain(stack, upload)
    assert "could not turn your file into an image" in upload.error_message and upload.error_hint
    assert upload.can_retry
    assert stack.staged_path(upload).read_bytes() == path.read_bytes()
    images_after_failure = stack.sim.images()

    stack.sim.set_faults(processing_seconds=0.3)
    retry = browser(stack, client).post(f"{stack.web_url}/uploads/{upload.uid}/retry", allow_redirects=False)
    assert retry.status_code == 302
    wait_status(stack, upload, Status.READY, Status.FAILED, Status.CANCELLED)
    assert_ready_in_ims(stack, [(upload, path)])
    assert images_after_failure == [], "the killed image stayed in IMS after the upload had failed"


# ---------------------------------------------------------------------------------------------
# 7. The staging disk fills up


def test_a_full_staging_disk_refuses_the_chunk_clearly_and_the_upload_resumes_once_there_is_room(
    stack, client, tmp_path
):
    """The browser's half only: there is no conversion step yet whose output could fill the disk."""
    if not stack.small_disk:
        pytest.skip(stack.small_disk_missing)
    path = make_image(tmp_path / "big.raw", 10 * MiB)
    # Chunks larger than the room left (the upload page sends 50 MiB chunks).
    first = uploader(stack, client, path, chunk_size=4 * MiB)
    first.set_url(first.create_url())  # while there was room: the disk fills up after creation
    stack.fill_staging(leave_free=6 * MiB)
    with pytest.raises(TusCommunicationError) as no_room:  # a new upload is refused at once
        uploader(stack, client, path).upload()
    assert no_room.value.status_code == 507 and b"does not have room" in no_room.value.response_content
    with pytest.raises(TusCommunicationError) as refused:
        first.upload()
    assert refused.value.status_code == 507, refused.value
    assert b"staging disk is full" in refused.value.response_content
    upload = upload_of(first)
    assert upload.status == Status.RECEIVING
    offset = first.get_offset()
    assert offset == upload.received_bytes and 4 * MiB <= offset < path.stat().st_size
    # What was stored is the upload's offset: no unrecorded bytes keep taking the disk's last space.
    assert stack.staged_path(upload).stat().st_size == offset

    stack.free_staging()  # an administrator makes room
    again = uploader(stack, client, path, chunk_size=4 * MiB, url=first.url)
    again.upload()
    assert stack.staged_path(upload).read_bytes() == path.read_bytes()
    wait_status(stack, upload, *DONE)
    assert_ready_in_ims(stack, [(upload, path)])


# ---------------------------------------------------------------------------------------------
# 8. The same message delivered twice at once


def test_one_push_message_delivered_to_two_workers_at_once_sends_the_file_once(stack, client, tmp_path):
    w1, w2 = stack.workers["w1"], stack.worker("w2")
    w1.stop()  # nobody takes the push message yet
    stack.sim.set_faults(put_bytes_per_second=2 * MiB)
    path = make_image(tmp_path / "twice.raw", 6 * MiB)
    upload = tus_upload(stack, client, path)
    queue = stack.redis_client()
    wait_for(lambda: queue.llen("uploads") == 1, timeout=10, what="the push message")
    message = queue.lindex("uploads", 0)
    task_id = json.loads(message)["headers"]["id"]
    queue.lpush("uploads", message)  # the broker hands out the same message a second time

    stack.start_all([w1, w2])
    wait_status(stack, upload, *DONE, timeout=60)
    for worker in (w1, w2):
        assert f"push_upload[{task_id}] received" in worker.output(), f"{worker.name} did not get the message"
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.attempt == 1
    assert ims_requests(stack, "POST") == [201]
    assert ims_requests(stack, "PUT") == [204]


# ---------------------------------------------------------------------------------------------
# 9. The owner cancels mid-push


def test_cancel_mid_push_stops_the_put_and_deletes_the_image_and_the_staged_file(stack, client, tmp_path):
    stack.sim.set_faults(put_bytes_per_second=1 * MiB)
    path = make_image(tmp_path / "unwanted.raw", 6 * MiB)
    upload = wait_mid_push(stack, tus_upload(stack, client, path))
    image_id = upload.ims_image_id

    cancel = browser(stack, client).post(f"{stack.web_url}/uploads/{upload.uid}/cancel", allow_redirects=False)
    assert cancel.status_code == 302
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED

    [put] = wait_for(lambda: ims_requests(stack, "PUT"), timeout=5, what="the PUT to stop")
    assert put != 204
    wait_for(lambda: not stack.sim.images() and not stack.staged_path(upload).exists(), timeout=20,
             what="the image and the staged file to be deleted")
    messages = timeline(upload)
    assert "Sending stopped" in messages
    assert f"Deleted IMS image {image_id}" in messages
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED


# ---------------------------------------------------------------------------------------------
# 10. An admin retries an upload that a worker is still pushing


def test_an_admin_retry_of_an_upload_being_pushed_is_refused_with_a_message(
    stack, client, tmp_path, django_user_model
):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "root-pw-1234")
    admin_client = Client()
    admin_client.force_login(admin)
    stack.sim.set_faults(put_bytes_per_second=2 * MiB)
    path = make_image(tmp_path / "busy.raw", 6 * MiB)
    upload = wait_mid_push(stack, tus_upload(stack, client, path))

    page = browser(stack, admin_client).post(f"{stack.web_url}/admin/uploads/upload/", data={
        "action": "retry_uploads", "_selected_action": [upload.pk], "index": 0})
    assert page.status_code == 200
    assert "can be retried" in page.text
    upload.refresh_from_db()
    assert (upload.status, upload.attempt) == (Status.PUSHING, 1)

    wait_status(stack, upload, *DONE)
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.attempt == 1
    assert ims_requests(stack, "PUT") == [204]
