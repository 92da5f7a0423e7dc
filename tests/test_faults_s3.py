"""The object store away for 30 s, for real, while the portal's own processes use it.

The fault stack of tests/fault_stack.py (gunicorn, a Celery worker, beat, a private Redis, the
simulator) stages in the Swift store of tests/s3_fixture.py; the fault is its S3 endpoint (the
proxy) stopped for OUTAGE_SECONDS, during a PATCH and during a push. Nothing may be lost: a
PATCH is refused with words the uploader can act on and keeps what the store confirmed, the
push is a temporary fault that Celery retries, and both uploads end Ready with the same MD5.
"""

import threading
import time

import pytest
import requests

from tests.conftest import connect_cloud, make_image, wait_for
from tests.fault_stack import s3_fault_stack, s3_faults_stack  # noqa: F401  (fixtures)
from tests.s3_fixture import PART, objects_under
from tests.test_faults import (
    DONE, MiB, assert_ready_in_ims, browser, explain, start_patch, tus_upload, upload_of, uploader, wait_mid_push,
    wait_status,
)
from uploads.models import StagedMultipart, Status

pytestmark = [pytest.mark.faults, pytest.mark.slow]

OUTAGE_SECONDS = 30
STORE_AWAY = "cannot reach its file storage just now. Nothing is lost"


@pytest.fixture
def stack(s3_faults_stack, alice, client):
    connect_cloud(alice)
    client.force_login(alice)
    return s3_faults_stack


def store_away_for(stack, seconds: float, *, meanwhile) -> None:
    """The store's S3 endpoint stays stopped until `seconds` after it was stopped (the caller
    stopped it), while `meanwhile()` is checked every few seconds; then it is started again."""
    stopped_at = stack.store_stopped_at
    pause = threading.Event()  # nothing sets it: a paced wait between checks of a fixed outage
    try:
        while time.monotonic() - stopped_at < seconds:
            meanwhile()
            pause.wait(min(3.0, max(0.0, seconds - (time.monotonic() - stopped_at))))
    finally:
        stack.store.start(["proxy"])


def stop_store(stack) -> None:
    stack.store.stop(["proxy"])
    stack.store_stopped_at = time.monotonic()


def parts_in_store(stack, upload) -> int:
    row = StagedMultipart.objects.get(name=upload.staged_name)
    reply = stack.store.client().list_parts(Bucket=stack.store.bucket, Key=stack.prefix + upload.staged_name,
                                            UploadId=row.multipart_id)
    return len(reply.get("Parts", []))


def test_the_store_away_for_30_s_during_a_patch_is_a_clear_503_nothing_is_lost_and_the_upload_resumes(
    stack, client, tmp_path
):
    path = make_image(tmp_path / "store-away.raw", 3 * PART + 10)
    data = path.read_bytes()
    first = uploader(stack, client, path, chunk_size=MiB)
    first.upload_chunk()  # 1 MiB, waiting in an incomplete part
    upload = upload_of(first)

    # The next PATCH carries the rest; its first part is in the store when the store goes away.
    patch = start_patch(stack, client, first.url, offset=MiB, length=len(data) - MiB)
    patch.send(data[MiB: PART + MiB])
    wait_for(lambda: parts_in_store(stack, upload) == 1, timeout=30, what="the PATCH's first part in the store")
    stop_store(stack)
    session = browser(stack, client)

    def meanwhile():  # the offset stays readable, and a new PATCH is refused in plain words
        again = uploader(stack, client, path, url=first.url)
        assert again.get_offset() == PART
        refused = session.patch(first.url, data=data[PART: 2 * PART], timeout=30, headers={
            "Tus-Resumable": "1.0.0", "Upload-Offset": str(PART), "Content-Type": "application/offset+octet-stream"})
        assert refused.status_code == 503 and STORE_AWAY in refused.text, refused.text

    try:
        patch.send(data[PART + MiB:])
        reply = patch.getresponse()
        assert reply.status == 503 and STORE_AWAY in reply.read().decode()
        upload.refresh_from_db()
        assert upload.received_bytes == PART, explain(stack, upload)  # the part the store confirmed is kept
    finally:
        patch.close()
        store_away_for(stack, OUTAGE_SECONDS, meanwhile=meanwhile)

    again = uploader(stack, client, path, url=first.url, chunk_size=len(data))
    assert again.get_offset() == PART
    again.upload()
    wait_status(stack, upload, *DONE, timeout=90)
    assert_ready_in_ims(stack, [(upload, path)])
    assert objects_under(stack.store, stack.prefix)[upload.staged_name] == len(data)


def test_the_store_away_for_30_s_during_a_push_is_retried_by_celery_and_ends_ready(stack, client, tmp_path):
    stack.sim.set_faults(put_bytes_per_second=2 * MiB)
    path = make_image(tmp_path / "push-away.raw", 24 * MiB)
    upload = wait_mid_push(stack, tus_upload(stack, client, path, chunk_size=8 * MiB))
    stop_store(stack)

    def waiting_to_retry():
        upload.refresh_from_db()
        return upload.status == Status.RECEIVED and upload.retry_at is not None

    try:
        wait_for(waiting_to_retry, timeout=OUTAGE_SECONDS, interval=0.1, what="the push to stop for the store")
        assert "cannot reach its file storage" in upload.error_message, explain(stack, upload)
        stack.sim.set_faults(put_bytes_per_second=None)
    finally:
        store_away_for(stack, OUTAGE_SECONDS, meanwhile=lambda: None)
    wait_status(stack, upload, *DONE, timeout=180)  # Celery's backoff: 5, 15, 45 s between attempts
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.attempt >= 2
    assert any("cannot reach its file storage" in message for message in
               upload.events.values_list("message", flat=True)), explain(stack, upload)
    assert requests.get(f"{stack.web_url}/accounts/login/", timeout=10).ok
