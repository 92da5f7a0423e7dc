"""From staged file to active image: the push and poll services against the simulator over HTTP."""

import hashlib
import io
import os
import threading

import pytest

from tests.conftest import connect_cloud, wait_for
from uploads import running_sums, services
from uploads.ims import ImsClient
from uploads.models import Status, Upload

# Each test runs with local staging and with object staging (tests/s3_fixture.py).
pytestmark = pytest.mark.usefixtures("staging_backend")


def received_upload(owner, data: bytes, *, disk_format="raw", name="web-server") -> Upload:
    upload = services.upload_create(
        owner=owner, size=len(data), filename=f"{name}.{disk_format}", name=name, disk_format=disk_format,
        os_version="Ubuntu 22.04 server 64bit", min_disk=1, min_ram=512, tags=["env=test"],
    )
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED
    return upload


def timeline(upload) -> list[str]:
    return [event.message for event in upload.events.all()]


def puts(sim) -> list[int]:
    return [r["status"] for r in sim.requests_seen() if r["method"] == "PUT"]


# A raw disk: an empty boot sector (no stray 55AA signature to look like a broken MBR), then data.
DATA = bytes(512) + os.urandom(300_000)


def test_a_received_upload_ends_ready_with_the_same_bytes(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    assert services.upload_push(upload_id=upload.pk).retry_in is None
    upload.refresh_from_db()
    assert upload.status == Status.READY
    [image] = sim.images()
    assert (upload.ims_image_id, upload.ims_status) == (image["id"], "active")
    assert image["checksum"] == hashlib.md5(DATA).hexdigest() == upload.md5
    assert upload.sha512 == hashlib.sha512(DATA).hexdigest()
    assert open(image["path"], "rb").read() == DATA
    assert upload.sent_bytes == len(DATA) and upload.finished_at
    messages = timeline(upload)
    assert "All bytes received" in messages
    assert any(m.startswith("Image record created in IMS") for m in messages)
    assert messages[-1] == f"Image {image['id']} is active in IMS"


def test_the_timeline_writes_sizes_in_words(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    messages = timeline(upload)
    assert "Upload started: web-server.raw (293 KB)" in messages  # 300,512 bytes
    assert any(m.startswith("Sent 293 KB to IMS (md5 ") for m in messages)


def test_a_cut_connection_says_how_far_it_got_in_words(alice_connected, sim):
    import re

    sim.set_faults(cut_put_after_bytes=100_000)
    upload = received_upload(alice_connected, bytes(512) + os.urandom(16 * 1024**2 - 512))
    assert services.upload_push(upload_id=upload.pk).retry_in
    upload.refresh_from_db()
    assert re.fullmatch(r"The connection to the cloud broke after [\d.]+ (KB|MB) of 16 MB\.", upload.error_message), (
        upload.error_message)


def test_the_image_gets_the_users_details(alice_connected, sim):
    services.upload_push(upload_id=received_upload(alice_connected, DATA).pk)
    [image] = ImsClient(sim.url, services.cloud.owner_token(alice_connected.pk).value).session.get(
        f"{sim.url}/v2/images"
    ).json()["images"]
    assert image["name"] == "web-server" and image["disk_format"] == "raw"
    assert image["__os_version"] == "Ubuntu 22.04 server 64bit"
    assert (image["min_disk"], image["min_ram"], image["tags"]) == (1, 512, ["env=test"])
    assert image["visibility"] == "private" and image["container_format"] == "bare"


def test_a_second_delivery_of_the_push_changes_nothing(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    services.upload_push(upload_id=upload.pk)
    assert len(sim.images()) == 1
    assert puts(sim) == [204]


def test_ims_processing_is_followed_until_active(alice_connected, sim):
    sim.set_faults(processing_seconds=0.5)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert (upload.status, upload.ims_status) == (Status.PROCESSING, "saving")
    assert upload.next_poll_at is not None

    def polled_ready():
        services.upload_poll(upload_id=upload.pk)
        upload.refresh_from_db()
        return upload.status == Status.READY

    wait_for(polled_ready, timeout=10, interval=0.2, what="the image to become active")


def test_due_polls_are_leased_once(alice_connected, sim):
    sim.set_faults(processing_seconds=60)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    Upload.objects.filter(pk=upload.pk).update(next_poll_at=upload.created_at)
    assert services.uploads_due_for_poll() == [upload.pk]
    assert services.uploads_due_for_poll() == []


def test_a_500_on_the_first_put_is_retried_into_the_same_image(alice_connected, sim):
    sim.set_faults(fail_puts=1)
    upload = received_upload(alice_connected, DATA)
    outcome = services.upload_push(upload_id=upload.pk)
    assert outcome.retry_in and outcome.retry_in > 0
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED and upload.retry_at
    assert upload.error_message == "The cloud's image service had a temporary problem."
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.attempt == 2
    assert len(sim.images()) == 1
    assert puts(sim) == [500, 204]
    # The raw reply is kept for admins on the timeline.
    assert any("HTTP 500" in event.detail for event in upload.events.all())


def test_a_broken_connection_is_retried(alice_connected, sim):
    data = bytes(512) + os.urandom(3_000_000)
    sim.set_faults(cut_put_after_bytes=1_000_000)
    upload = received_upload(alice_connected, data)
    assert services.upload_push(upload_id=upload.pk).retry_in
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY
    [image] = sim.images()
    assert image["checksum"] == hashlib.md5(data).hexdigest()


def test_it_gives_up_after_repeated_temporary_failures(alice_connected, sim):
    sim.set_faults(fail_puts=services.MAX_PUSH_ATTEMPTS)
    upload = received_upload(alice_connected, DATA)
    for _ in range(services.MAX_PUSH_ATTEMPTS - 1):
        assert services.upload_push(upload_id=upload.pk).retry_in
    assert services.upload_push(upload_id=upload.pk).retry_in is None
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.can_retry
    assert sim.images() == []  # the half-made image was deleted


def test_a_401_means_reconnect_and_reconnecting_continues(
    alice_connected, sim, django_capture_on_commit_callbacks
):
    sim.set_faults(expire_tokens=True)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.RECONNECT
    assert upload.error_hint == "Reconnect on the Cloud account page: the upload then continues by itself."
    with django_capture_on_commit_callbacks() as callbacks:
        connect_cloud(alice_connected)
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED and not upload.error_message
    assert len(callbacks) == 1  # the push is queued again
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY
    assert len(sim.images()) == 1


def test_no_cloud_account_means_reconnect_before_any_request(alice, sim):
    upload = received_upload(alice, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.RECONNECT
    assert "Your file is kept" in upload.error_hint
    assert sim.requests_seen() == []


def test_a_409_is_explained_and_retry_starts_a_fresh_image(alice_connected, sim, monkeypatch):
    original = ImsClient.create_image

    def create_then_fill(self, **kwargs):
        image = original(self, **kwargs)
        sim.set_image_status(image.id, "active")  # someone else filled it: our PUT conflicts
        return image

    monkeypatch.setattr(ImsClient, "create_image", create_then_fill)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED
    assert upload.error_message == "The cloud refused the file because this image already has data or is busy."
    assert "Retry" in upload.error_hint
    assert sim.images() == []  # the conflicting image was removed: no orphan

    monkeypatch.setattr(ImsClient, "create_image", original)
    services.upload_retry(upload=upload, by="alice")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY
    assert len(sim.images()) == 1


def test_a_killed_image_fails_with_an_explanation(alice_connected, sim):
    sim.set_faults(processing_seconds=60)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    sim.set_image_status(upload.ims_image_id, "killed")
    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "ims_killed"
    assert "could not turn your file into an image" in upload.error_message


def test_a_503_while_polling_just_polls_again(alice_connected, sim):
    sim.set_faults(processing_seconds=60)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    sim.set_faults(fail_gets=1)
    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.PROCESSING
    assert any("Checking the image failed for now" in m for m in timeline(upload))
    sim.set_image_status(upload.ims_image_id, "active")
    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY


def test_a_retry_reuses_a_queued_image_and_replaces_a_stuck_one(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    client = ImsClient(sim.url, services.cloud.owner_token(alice_connected.pk).value)
    stuck = client.create_image(name="old", disk_format="raw")
    sim.set_image_status(stuck.id, "saving")
    Upload.objects.filter(pk=upload.pk).update(ims_image_id=stuck.id)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.ims_image_id != stuck.id
    assert [image["id"] for image in sim.images()] == [upload.ims_image_id]


@pytest.mark.django_db(transaction=True)
def test_cancel_mid_push_stops_the_put_and_removes_everything(alice_connected, sim, staging_dir, task_queue):
    data = bytes(512) + os.urandom(4_000_000)
    sim.set_faults(put_bytes_per_second=1_000_000)
    upload = received_upload(alice_connected, data)
    pusher = threading.Thread(target=services.upload_push, kwargs={"upload_id": upload.pk})
    pusher.start()
    wait_for(lambda: Upload.objects.get(pk=upload.pk).sent_bytes > 0, timeout=20, what="bytes to be sent")
    services.upload_cancel(upload=Upload.objects.get(pk=upload.pk), by="alice")
    pusher.join(timeout=20)
    assert not pusher.is_alive()
    assert task_queue == [("push", upload.pk), ("discard", upload.pk)]
    services.upload_discard(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED
    assert not (staging_dir / upload.staged_name).exists()
    assert sim.images() == []
    assert "Sending stopped" in timeline(upload), " | ".join(timeline(upload))


def test_retry_is_refused_while_an_upload_is_being_sent(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    Upload.objects.filter(pk=upload.pk).update(status=Status.PUSHING)
    upload.refresh_from_db()
    with pytest.raises(services.ServiceError):
        services.upload_retry(upload=upload, by="admin")


def test_retry_needs_the_staged_file(alice_connected, sim, staging_dir):
    upload = received_upload(alice_connected, DATA)
    Upload.objects.filter(pk=upload.pk).update(status=Status.FAILED)
    upload.refresh_from_db()
    (staging_dir / upload.staged_name).unlink()
    with pytest.raises(services.ServiceError, match="upload the file again"):
        services.upload_retry(upload=upload, by="alice")


def test_a_received_upload_whose_message_was_lost_is_queued_again(alice_connected, sim):
    from datetime import timedelta

    from django.utils import timezone

    upload = received_upload(alice_connected, DATA)
    assert services.uploads_to_reconcile() == []  # just received: its message is on its way
    Upload.objects.filter(pk=upload.pk).update(status_changed_at=timezone.now() - timedelta(minutes=5))
    assert services.uploads_to_reconcile() == [upload.pk]
    Upload.objects.filter(pk=upload.pk).update(retry_at=timezone.now() + timedelta(minutes=1))
    assert services.uploads_to_reconcile() == []  # a retry is scheduled: leave it be


def test_a_push_whose_worker_died_is_sent_again_when_its_message_comes_back(alice_connected, sim):
    from datetime import timedelta

    from django.utils import timezone

    upload = received_upload(alice_connected, DATA)
    long_ago = timezone.now() - timedelta(hours=2)
    Upload.objects.filter(pk=upload.pk).update(status=Status.PUSHING, attempt=1, heartbeat_at=long_ago)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.attempt == 2
    assert "The worker that was handling this upload stopped; starting again" in timeline(upload)


def test_a_live_push_is_left_alone_by_a_second_delivery(alice_connected, sim):
    from django.utils import timezone

    upload = received_upload(alice_connected, DATA)
    Upload.objects.filter(pk=upload.pk).update(status=Status.PUSHING, attempt=1, heartbeat_at=timezone.now())
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.PUSHING and upload.attempt == 1
    assert [r for r in sim.requests_seen() if r["path"].startswith("/v2")] == []


def test_retry_while_the_sign_in_is_expired_says_to_reconnect(alice, sim):
    upload = received_upload(alice, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.RECONNECT
    with pytest.raises(services.ServiceError, match="reconnect on the Cloud account page"):
        services.upload_retry(upload=upload, by="alice")


def test_my_uploads_shows_each_kind_of_trouble_in_plain_words(alice_connected, sim, client, monkeypatch):
    client.force_login(alice_connected)
    sim.set_faults(fail_puts=1)
    services.upload_push(upload_id=received_upload(alice_connected, DATA, name="five-hundred").pk)

    original = ImsClient.create_image

    def create_then_fill(self, **kwargs):
        image = original(self, **kwargs)
        sim.set_image_status(image.id, "active")
        return image

    monkeypatch.setattr(ImsClient, "create_image", create_then_fill)
    services.upload_push(upload_id=received_upload(alice_connected, DATA, name="conflict").pk)
    monkeypatch.undo()

    sim.set_faults(expire_tokens=True)
    services.upload_push(upload_id=received_upload(alice_connected, DATA, name="expired").pk)

    page = client.get("/uploads/").content.decode()
    assert "The cloud&#x27;s image service had a temporary problem." in page
    assert "Waiting to be sent again (attempt 2)" in page
    assert "The cloud refused the file because this image already has data or is busy." in page
    assert "Your cloud sign-in has expired or was not accepted." in page
    assert "Reconnect on the Cloud account page" in page


def test_a_token_that_would_expire_mid_push_is_not_used(alice_connected, sim):
    from datetime import timedelta

    from django.utils import timezone

    upload = received_upload(alice_connected, DATA)
    # 20 GiB at the assumed 10 MiB/s takes about 34 minutes; the token has 20 left.
    Upload.objects.filter(pk=upload.pk).update(size=20 * 1024**3)
    alice_connected.cloud_account.expires_at = timezone.now() + timedelta(minutes=20)
    alice_connected.cloud_account.save()
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.RECONNECT
    assert "sending this file takes about 34 minutes, so it was not started" in upload.error_message
    assert [r for r in sim.requests_seen() if r["path"].startswith("/v2")] == []


def test_the_measured_speed_decides_how_long_a_push_takes(alice_connected):
    assert services.expected_send_rate() == services.ASSUMED_SEND_RATE
    for rate in (40e6, 60e6):
        Upload.objects.create(owner=alice_connected, name="x", filename="x.raw", disk_format="raw", size=1,
                              staged_name="x", status=Status.READY, send_rate=rate)
    assert services.expected_send_rate() == 50e6


def test_an_image_left_queued_with_data_after_a_415_is_replaced(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    old_id = upload.ims_image_id
    # What Glance leaves after a 415: back to queued, but holding a checksum and size.
    sim.set_image_status(old_id, "queued")
    Upload.objects.filter(pk=upload.pk).update(status=Status.RECEIVED)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.ims_image_id != old_id
    assert [image["id"] for image in sim.images()] == [upload.ims_image_id]


def test_the_reconciler_finds_pushes_whose_worker_died(alice_connected):
    from datetime import timedelta

    from django.utils import timezone

    def pushing(heartbeat):
        return Upload.objects.create(owner=alice_connected, name="x", filename="x.raw", disk_format="raw", size=1,
                                     staged_name="x", status=Status.PUSHING, heartbeat_at=heartbeat)

    dead = pushing(timezone.now() - timedelta(minutes=5))
    pushing(timezone.now() - timedelta(seconds=20))
    assert services.uploads_to_reconcile() == [dead.pk]


def test_staging_cleanup_deletes_only_what_no_upload_needs(alice_connected, sim, settings):
    from datetime import timedelta

    from django.utils import timezone

    from uploads import staging

    settings.STAGING_RETENTION_HOURS = 24
    old_ready = received_upload(alice_connected, DATA, name="old-ready")
    services.upload_push(upload_id=old_ready.pk)
    Upload.objects.filter(pk=old_ready.pk).update(finished_at=timezone.now() - timedelta(hours=25))
    new_ready = received_upload(alice_connected, DATA, name="new-ready")
    services.upload_push(upload_id=new_ready.pk)
    failed = received_upload(alice_connected, DATA, name="failed")
    Upload.objects.filter(pk=failed.pk).update(status=Status.FAILED)
    waiting = received_upload(alice_connected, DATA, name="waiting")
    expired = services.upload_create(owner=alice_connected, size=10, filename="e.raw", name="e", disk_format="raw")
    Upload.objects.filter(pk=expired.pk).update(receive_expires_at=timezone.now() - timedelta(seconds=1))

    assert services.staging_cleanup() == 2
    kept = {u.name for u in Upload.objects.all() if staging.exists(u.staged_name)}
    assert kept == {"new-ready", "failed", "waiting"}
    old_ready.refresh_from_db()
    assert old_ready.staged_deleted_at is not None
    assert "Deleted the staged copy: no longer needed" in timeline(old_ready)
    assert Upload.objects.get(pk=expired.pk).status == Status.FAILED
    assert services.staging_cleanup() == 0
    assert waiting.pk  # still received: its push is on its way


def test_an_unexpected_error_in_a_push_never_leaves_the_upload_stuck(alice_connected, sim, monkeypatch):
    from uploads import diskimage

    def broken(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(diskimage, "inspect_file", broken)
    upload = received_upload(alice_connected, DATA)
    assert services.upload_push(upload_id=upload.pk).retry_in
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED and upload.error_code == "internal"
    assert upload.error_message == "The portal ran into a problem of its own."
    assert any("OSError: disk gone" in e.detail for e in upload.events.all())


def test_a_push_abandoned_on_its_last_attempt_fails_instead_of_looping(alice_connected, sim):
    from datetime import timedelta

    from django.utils import timezone

    upload = received_upload(alice_connected, DATA)
    Upload.objects.filter(pk=upload.pk).update(status=Status.PUSHING, attempt=services.MAX_PUSH_ATTEMPTS,
                                               heartbeat_at=timezone.now() - timedelta(hours=1))
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "abandoned"


def test_reconnecting_while_ims_processes_goes_on_checking_without_sending_again(alice_connected, sim):
    sim.set_faults(processing_seconds=60)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    sim.set_faults(expire_tokens=True)
    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.RECONNECT
    connect_cloud(alice_connected)
    upload.refresh_from_db()
    assert upload.status == Status.PROCESSING
    sim.set_image_status(upload.ims_image_id, "active")
    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY
    assert puts(sim) == [204]  # sent once


def test_after_a_retry_temporary_faults_are_retried_afresh(alice_connected, sim):
    sim.set_faults(fail_puts=services.MAX_PUSH_ATTEMPTS)
    upload = received_upload(alice_connected, DATA)
    for _ in range(services.MAX_PUSH_ATTEMPTS):
        services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED
    services.upload_retry(upload=upload, by="alice")
    sim.set_faults(fail_puts=1)
    assert services.upload_push(upload_id=upload.pk).retry_in  # a blip after Retry is retried again
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY


# A worker killed just as its PUT ended: IMS has the whole image (active, the right size), the row
# has no sums yet. What the image holds must be compared with the file before anything is Ready.


def a_push_that_died_after_its_last_byte(upload, sim, stored: bytes, *, status=Status.PUSHING) -> str:
    """The image an earlier attempt left, holding `stored`; the row as its dead worker left it."""
    from datetime import timedelta

    from django.utils import timezone

    client = ImsClient(sim.url, services.cloud.owner_token(upload.owner_id).value)
    image = client.create_image(name=upload.name, disk_format="raw")
    client.upload_file(image.id, io.BytesIO(stored), len(stored))
    Upload.objects.filter(pk=upload.pk).update(
        status=status, attempt=1, heartbeat_at=timezone.now() - timedelta(hours=1), ims_image_id=image.id,
        send_format="raw", send_size=len(stored), sent_bytes=len(stored), md5="", sha512="",
        next_poll_at=timezone.now(),
    )
    return image.id


def test_a_taken_over_push_keeps_an_active_image_only_when_it_holds_the_same_bytes(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    image_id = a_push_that_died_after_its_last_byte(upload, sim, DATA)

    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.ims_image_id == image_id
    assert (upload.md5, upload.sha512) == (hashlib.md5(DATA).hexdigest(), hashlib.sha512(DATA).hexdigest())
    assert upload.staged_sha512 == upload.sha512
    assert puts(sim) == [204]  # the dead attempt's only: the file was not sent again


@pytest.mark.parametrize("stored", [
    DATA[:-1] + bytes([DATA[-1] ^ 1]),  # the same size, one bit off: MD5 and SHA-512 differ
    bytes(len(DATA)),
], ids=["one-bit-off", "zeros"])
def test_a_taken_over_push_replaces_an_active_image_of_the_right_size_but_other_bytes(
    alice_connected, sim, stored
):
    upload = received_upload(alice_connected, DATA)
    wrong_image = a_push_that_died_after_its_last_byte(upload, sim, stored)

    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    [image] = sim.images()
    assert upload.status == Status.READY and upload.ims_image_id == image["id"] != wrong_image
    assert image["checksum"] == upload.md5 == hashlib.md5(DATA).hexdigest()
    assert image["os_hash_value"] == upload.sha512 == hashlib.sha512(DATA).hexdigest()
    assert any(m.startswith(f"Deleted unusable IMS image {wrong_image}") for m in timeline(upload))


def test_an_active_image_is_not_ready_while_the_row_has_no_sums_and_the_bytes_differ(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    a_push_that_died_after_its_last_byte(upload, sim, bytes(len(DATA)), status=Status.PROCESSING)

    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "checksum_mismatch"
    assert upload.md5 == hashlib.md5(DATA).hexdigest()  # computed from the staged file
    assert sim.images() == []  # the wrong image is deleted


def test_an_active_image_is_ready_when_the_sums_computed_from_the_file_match(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    a_push_that_died_after_its_last_byte(upload, sim, DATA, status=Status.PROCESSING)

    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY
    assert (upload.md5, upload.sha512) == (hashlib.md5(DATA).hexdigest(), hashlib.sha512(DATA).hexdigest())


def test_an_active_image_whose_sums_cannot_be_compared_is_not_ready(alice_connected, sim, staging_dir):
    upload = received_upload(alice_connected, DATA)
    a_push_that_died_after_its_last_byte(upload, sim, DATA, status=Status.PROCESSING)
    (staging_dir / upload.staged_name).unlink()

    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "unverifiable"
    assert "Upload the file again" in upload.error_hint
    assert sim.images() == []


@pytest.mark.parametrize("unreported", ["checksum", "os_hash_value"])
def test_an_active_image_is_not_ready_while_ims_reports_no_checksum_to_compare(
    alice_connected, sim, monkeypatch, unreported
):
    import dataclasses

    from uploads.ims import ImsClient as Client

    real_get_image = Client.get_image
    monkeypatch.setattr(Client, "get_image",
                        lambda self, image_id: dataclasses.replace(real_get_image(self, image_id), **{unreported: None}))
    upload = received_upload(alice_connected, DATA)
    a_push_that_died_after_its_last_byte(upload, sim, DATA, status=Status.PROCESSING)

    services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "checksum_mismatch"
    assert sim.images() == []


def test_push_and_poll_say_the_same_about_a_sign_in_that_can_no_longer_be_read(alice_connected, sim, settings):
    from cryptography.fernet import Fernet

    sim.set_faults(processing_seconds=60)
    polled = received_upload(alice_connected, DATA, name="polled")
    services.upload_push(upload_id=polled.pk)
    pushed = received_upload(alice_connected, DATA, name="pushed")
    settings.TOKEN_ENCRYPTION_KEY = Fernet.generate_key().decode()  # the key changed: the token is unreadable
    services.upload_poll(upload_id=polled.pk)
    services.upload_push(upload_id=pushed.pk)
    for upload in (polled, pushed):
        upload.refresh_from_db()
        assert upload.status == Status.RECONNECT and upload.error_code == "token_expired"
        assert upload.error_message.startswith("Your stored cloud sign-in can no longer be read"), upload.error_message
        assert upload.error_hint


# MD5 and SHA-512 computed as the file arrives (uploads/running_sums.py), trusted by the push
# while the staged file's seal holds (local staging; object staging hashes while sending).

SEALED_NOTE = "(sums computed as it arrived; sealed since)"


def received_in_chunks(owner, data: bytes, chunks: int, between=None) -> Upload:
    upload = services.upload_create(owner=owner, size=len(data), filename="web.raw", name="web", disk_format="raw")
    step = -(-len(data) // chunks)
    for offset in range(0, len(data), step):
        if between is not None and offset:
            between(upload)
        piece = data[offset:offset + step]
        services.upload_receive(upload=upload, offset=offset, stream=io.BytesIO(piece), length=len(piece))
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED
    return upload


def sent_note(upload) -> str:
    return next(m for m in timeline(upload) if m.startswith("Sent "))


def test_sums_computed_as_the_file_arrives_are_sent_without_hashing_again(alice_connected, sim, staging_backend):
    data = bytes(512) + os.urandom(3_000_000)
    upload = received_in_chunks(alice_connected, data, 4)
    if staging_backend == "local":
        assert upload.received_sums["md5"] == hashlib.md5(data).hexdigest()
        assert upload.received_sums["sha512"] == hashlib.sha512(data).hexdigest()
    else:
        assert "seal" not in upload.received_sums  # object staging: hashed while sending
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY
    [image] = sim.images()
    assert (upload.md5, upload.sha512, upload.staged_sha512) == (
        hashlib.md5(data).hexdigest(), hashlib.sha512(data).hexdigest(), hashlib.sha512(data).hexdigest())
    assert image["checksum"] == upload.md5 and open(image["path"], "rb").read() == data
    assert (SEALED_NOTE in sent_note(upload)) == (staging_backend == "local"), " | ".join(timeline(upload))


def test_an_upload_whose_saved_sums_are_lost_is_hashed_while_sending(alice_connected, sim):
    data = bytes(512) + os.urandom(2_000_000)
    # As when a PATCH's process died after a progress record: the state is not of the offset.
    upload = received_in_chunks(alice_connected, data, 3,
                                between=lambda u: Upload.objects.filter(pk=u.pk).update(received_sums={}))
    assert "seal" not in upload.received_sums
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.md5 == hashlib.md5(data).hexdigest()
    assert upload.sha512 == hashlib.sha512(data).hexdigest()
    assert SEALED_NOTE not in sent_note(upload)


def test_a_chunk_refused_for_its_checksum_leaves_the_running_sums_right(alice_connected, sim, staging_dir):
    data = bytes(512) + os.urandom(1_000_000)
    upload = services.upload_create(owner=alice_connected, size=len(data), filename="w.raw", name="w",
                                    disk_format="raw")
    half = len(data) // 2
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data[:half]), length=half)
    damaged = bytes([data[half] ^ 1]) + data[half + 1:]
    with pytest.raises(services.ChecksumMismatch):
        services.upload_receive(upload=upload, offset=half, stream=io.BytesIO(damaged), length=len(damaged),
                                checksum=("sha1", hashlib.sha1(data[half:]).digest()))
    services.upload_receive(upload=upload, offset=half, stream=io.BytesIO(data[half:]), length=len(data) - half,
                            checksum=("sha1", hashlib.sha1(data[half:]).digest()))
    upload.refresh_from_db()
    assert upload.received_sums["md5"] == hashlib.md5(data).hexdigest()
    assert upload.received_sums["sha512"] == hashlib.sha512(data).hexdigest()


def test_a_client_that_goes_away_mid_chunk_leaves_the_running_sums_right(alice_connected, sim, staging_dir):
    data = bytes(512) + os.urandom(3 * 1024 * 1024)
    upload = services.upload_create(owner=alice_connected, size=len(data), filename="w.raw", name="w",
                                    disk_format="raw")
    cut = 1024 * 1024 + 4096  # one whole buffer and a bit, then the connection breaks

    class GoneAfter(io.BytesIO):
        def readinto(self, buffer):
            if self.tell() >= cut:
                raise ConnectionResetError()
            return super().readinto(buffer[: cut - self.tell()])

    received = services.upload_receive(upload=upload, offset=0, stream=GoneAfter(data), length=len(data))
    assert received == cut
    services.upload_receive(upload=upload, offset=cut, stream=io.BytesIO(data[cut:]), length=len(data) - cut)
    upload.refresh_from_db()
    assert upload.received_sums["md5"] == hashlib.md5(data).hexdigest()
    assert upload.received_sums["sha512"] == hashlib.sha512(data).hexdigest()


def test_with_hashing_on_arrival_off_the_push_hashes_while_sending(alice_connected, sim, settings):
    settings.UPLOAD_HASH_ON_ARRIVAL = False
    data = bytes(512) + os.urandom(1_000_000)
    upload = received_in_chunks(alice_connected, data, 2)
    assert upload.received_sums == {}
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.sha512 == hashlib.sha512(data).hexdigest()
    assert SEALED_NOTE not in sent_note(upload)


def test_hashing_that_cannot_keep_up_is_abandoned_and_the_push_hashes(alice_connected, sim, staging_dir,
                                                                       monkeypatch):
    import time

    from uploads.staging import local

    monkeypatch.setattr(local, "HASH_WAIT_GRACE", 0)
    monkeypatch.setattr(local, "HASH_WAIT_SHARE", 0.0)
    slow = running_sums._Context.update
    monkeypatch.setattr(running_sums._Context, "update", lambda self, data: time.sleep(0.02) or slow(self, data))
    data = bytes(512) + os.urandom(12 * 1024 * 1024)  # 6 MiB chunks: more than the four buffers
    upload = received_in_chunks(alice_connected, data, 2)
    assert upload.received_sums == {}  # the bytes did not wait for the hashes
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.sha512 == hashlib.sha512(data).hexdigest()
    assert SEALED_NOTE not in sent_note(upload)


def test_running_sums_saved_and_restored_equal_hashlibs():
    data = os.urandom(3_000_001)
    sums = running_sums.start_or_restore({}, 0)
    for start, end in ((0, 1), (1, 70_000), (70_000, 1_500_000)):
        sums.md5.update(data[start:end])  # bytes (read-only) as well as buffers
        sums.sha512.update(bytearray(data[start:end]))
    sums.offset = 1_500_000
    again = running_sums.start_or_restore(sums.saved(), 1_500_000)
    again.md5.update(memoryview(bytearray(data[1_500_000:])))
    again.sha512.update(data[1_500_000:])
    assert again.hexdigests() == (hashlib.md5(data).hexdigest(), hashlib.sha512(data).hexdigest())
    assert sums.md5.hexdigest() == hashlib.md5(data[:1_500_000]).hexdigest()  # a digest ends nothing
    assert running_sums.start_or_restore(sums.saved(), 1_500_001) is None  # not of this offset
    assert running_sums.start_or_restore({**sums.saved(), "kind": "openssl-1-arm"}, 1_500_000) is None
    assert running_sums.start_or_restore({}, 5) is None


def test_the_sums_go_on_from_a_state_saved_in_the_row_by_another_process(alice_connected, sim, staging_dir):
    import json
    import subprocess
    import sys

    data = bytes(512) + os.urandom(2_500_000)
    upload = services.upload_create(owner=alice_connected, size=len(data), filename="w.raw", name="w",
                                    disk_format="raw")
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data[:1_000_000]), length=1_000_000)
    upload.refresh_from_db()
    # Another process (another interpreter, its own OpenSSL contexts) goes on from the saved state.
    script = (
        "import sys, json, hashlib; from uploads import running_sums; "
        "sums = running_sums.start_or_restore(json.loads(sys.argv[1]), 1_000_000); "
        "sums.md5.update(sys.stdin.buffer.read()); print(sums.md5.hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", script, json.dumps(upload.received_sums)], input=data[1_000_000:],
                           capture_output=True, check=True, cwd=os.getcwd())
    assert other.stdout.decode().strip() == hashlib.md5(data).hexdigest()
    services.upload_receive(upload=upload, offset=1_000_000, stream=io.BytesIO(data[1_000_000:]),
                            length=len(data) - 1_000_000)
    upload.refresh_from_db()
    assert upload.received_sums["md5"] == hashlib.md5(data).hexdigest()
    assert upload.received_sums["sha512"] == hashlib.sha512(data).hexdigest()


def test_a_staged_file_touched_after_it_arrived_is_hashed_again_while_sending(alice_connected, sim, staging_dir):
    upload = received_upload(alice_connected, DATA)
    assert upload.received_sums
    os.utime(staging_dir / upload.staged_name)  # same bytes, but the seal no longer proves it
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.md5 == hashlib.md5(DATA).hexdigest()
    assert "The staged file changed since it arrived: its sums are computed again while sending" in timeline(upload)
    assert SEALED_NOTE not in sent_note(upload)


def test_a_sealed_file_changed_while_it_is_sent_never_becomes_an_image(alice_connected, sim, staging_dir,
                                                                        monkeypatch):
    from uploads.filebody import SealedBody

    data = bytes(512) + os.urandom(3_000_000)
    upload = received_upload(alice_connected, data)
    original = SealedBody.confirmed_tail

    def change_then_confirm(body):
        with open(staging_dir / upload.staged_name, "r+b") as staged:  # the head, already sent
            staged.write(b"\x01")
        return original(body)

    monkeypatch.setattr(SealedBody, "confirmed_tail", change_then_confirm)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "file_changed"
    assert sim.images() == []  # the half-sent image was deleted
